"""The shard format: one sample schema for every dataset, reason codes, and the content hash.

Every dataset (``single/``, ``diptych_random/``, ``diptych_same_category/``) shares one schema, so a
training reader (stage 2 mixes diptych and single samples in one micro-batch) needs one code path.
Per-condition fields are lists with one entry per condition (1 for single, 2 for diptych).

``content_hash`` is computed from exactly the columns stored in a row, so anyone can re-verify a
shard with :func:`row_content_hash`; sample ids are never part of it (the manifest pairs the two).
"""

from __future__ import annotations

import hashlib
import struct

import pyarrow as pa

FORMAT_VERSION = "musar-shards/1"

DATASETS = ("single", "diptych_random", "diptych_same_category")
QUARANTINE_DIR = "quarantine"
ENCODED_DIR = "encoded"
MANIFEST = "manifest.json"

# Outcome of every input row: kept, filtered (by rule) or quarantined (bad data), never two.
KEPT, FILTERED, QUARANTINED = "kept", "filtered", "quarantined"
# Filter reasons: the row is valid but not wanted.
FILTER_COLLECTION = "collection"
FILTER_QUALITY = "quality"  # a score below min_score, or a null / partial quality assessment
# Quarantine reasons, in the order they are checked (a row gets the first that applies).
MISSING_DESCRIPTION = "missing_description"
NON_UTF8_TEXT = "non_utf8_text"
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
WRONG_IMAGE_SIZE = "wrong_image_size"
QUARANTINE_REASONS = (MISSING_DESCRIPTION, NON_UTF8_TEXT, MISSING_IMAGE, UNDECODABLE_IMAGE, WRONG_IMAGE_SIZE)

# The description fields a sample needs (Subject200K may carry more, e.g. description_valid).
TEXT_FIELDS = ("item", "category", "description_0", "description_1")
QUALITY_FIELDS = ("compositeStructure", "objectConsistency", "imageQuality")

SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("subjects", pa.list_(pa.string())),  # source row id per condition
        ("sources", pa.list_(pa.string())),  # single sample id per condition ("row/cond>target")
        ("items", pa.list_(pa.string())),
        ("categories", pa.list_(pa.string())),
        ("condition_images", pa.list_(pa.binary())),
        ("condition_prompts", pa.list_(pa.string())),
        ("condition_spans", pa.list_(pa.list_(pa.int32()))),  # [start, end) in target_prompt; null for single
        ("target_image", pa.binary()),
        ("target_width", pa.int32()),
        ("target_height", pa.int32()),
        ("target_prompt", pa.string()),
        ("content_hash", pa.string()),
    ]
)

# What each processed input row reports back to the driver (small: no image bytes).
ROW_REPORT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("category_key", pa.string()),  # normalised category, kept rows only
        ("shard", pa.string()),  # single/ shard holding this subject's two samples, kept rows only
        ("shard_row", pa.int64()),  # row of its "0>1" sample in that shard; "1>0" follows it
    ]
)

QUARANTINE_SCHEMA = pa.schema([("row_id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def _feed(h, value) -> None:
    """Length-prefixed, typed encoding, so field boundaries can never be confused."""
    if value is None:
        h.update(b"N")
    elif isinstance(value, bytes):
        h.update(b"B" + struct.pack("<Q", len(value)) + value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        h.update(b"S" + struct.pack("<Q", len(data)) + data)
    elif isinstance(value, int):
        h.update(b"I" + struct.pack("<q", value))
    elif isinstance(value, (list, tuple)):
        h.update(b"L" + struct.pack("<Q", len(value)))
        for item in value:
            _feed(h, item)
    else:
        raise TypeError(f"cannot hash {type(value).__name__}")


def content_hash(condition_images, condition_prompts, condition_spans, target_image, target_prompt) -> str:
    """sha256 over what a sample teaches: its images, prompts and spans (not its ids)."""
    h = hashlib.sha256(FORMAT_VERSION.encode())
    _feed(h, list(condition_images))
    _feed(h, list(condition_prompts))
    _feed(h, None if condition_spans is None else [[int(v) for v in span] for span in condition_spans])
    _feed(h, target_image)
    _feed(h, target_prompt)
    return h.hexdigest()


def row_content_hash(row: dict) -> str:
    """:func:`content_hash` of a row read back from a shard (``table.to_pylist()`` item)."""
    return content_hash(row["condition_images"], row["condition_prompts"], row["condition_spans"],
                        row["target_image"], row["target_prompt"])  # fmt: skip
