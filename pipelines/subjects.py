"""Stage 1, per batch of input rows: filter, validate, cut panels, write ``single/`` shards.

Runs inside Ray tasks. Each input row comes out as exactly one report row (kept, filtered or
quarantined with a reason and a human-readable detail); nothing here raises on bad data. Kept rows
become two single samples, written straight to shards by the same task so panels never travel
back to the driver; the report says which shard and row holds them, for the diptych stage.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from .filters import filter_reasons
from .images import ImageCodec
from .panels import PanelGeometry, cut_panels
from .samples import normalise, single_samples
from .schema import (
    FILTERED,
    KEPT,
    MISSING_DESCRIPTION,
    MISSING_IMAGE,
    NON_UTF8_TEXT,
    QUARANTINED,
    ROW_REPORT_SCHEMA,
    SAMPLE_SCHEMA,
    TEXT_FIELDS,
)
from .shards import write_shards
from .source import read_fragments


def check_texts(raw: dict) -> tuple[dict | None, str | None, str | None]:
    """Decoded, stripped description fields, or ``(None, reason, detail)``."""
    for name in TEXT_FIELDS:
        value = raw[name]
        if value is None or not value.strip():
            return None, MISSING_DESCRIPTION, f"description.{name} is missing"
    texts = {}
    for name in TEXT_FIELDS:
        try:
            texts[name] = raw[name].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            return None, NON_UTF8_TEXT, f"description.{name} is not valid UTF-8 ({err.reason} at byte {err.start})"
    return texts, None, None


def process_rows(raw: pa.Table, *, collection: str | None, min_score: int, geometry: PanelGeometry,
                 codec: ImageCodec) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """``(reports, single sample rows)`` for a batch of RAW_SCHEMA rows."""
    reasons = filter_reasons(raw, collection, min_score).to_pylist()
    reports, samples = [], []
    for row, filtered in zip(raw.to_pylist(), reasons):
        report = dict(row_id=row["row_id"], status=FILTERED, reason=filtered, detail=None,
                      category_key=None, shard=None, shard_row=None)  # fmt: skip
        reports.append(report)
        if filtered is not None:
            continue
        texts, reason, detail = check_texts(row)
        panels = None
        if texts is not None:
            if not row["image_bytes"]:
                reason, detail = MISSING_IMAGE, "image.bytes is missing or empty"
            else:
                panels, reason, detail = cut_panels(row["image_bytes"], geometry)
        if panels is None:
            report.update(status=QUARANTINED, reason=reason, detail=detail)
            continue
        report.update(status=KEPT, category_key=normalise(texts["category"]))
        samples += single_samples(
            row["row_id"], texts["item"], texts["category"], (texts["description_0"], texts["description_1"]),
            (codec.encode(panels[0]), codec.encode(panels[1])), (panels[0].size, panels[1].size),
        )  # fmt: skip
    return reports, samples


def subjects_to_singles(raw: pa.Table, *, out_dir: str, max_rows: int, max_bytes: int, **kwargs) -> pa.Table:
    """RAW_SCHEMA rows in, ROW_REPORT_SCHEMA rows out; writes their samples to ``out_dir/single``."""
    reports, samples = process_rows(raw, **kwargs)
    if samples:
        table = pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA)
        kept = [r for r in reports if r["status"] == KEPT]
        for name, start, stop in write_shards(table, f"{out_dir}/single", max_rows=max_rows,
                                              max_bytes=max_bytes, unit=2):  # fmt: skip
            for i in range(start, stop, 2):
                kept[i // 2].update(shard=name, shard_row=i - start)
    return pa.Table.from_pylist(reports, schema=ROW_REPORT_SCHEMA)


def fragments_to_singles(fragments: pa.Table, *, filesystem, out_dir: str, max_rows: int, **kwargs) -> Iterator[pa.Table]:
    """Ray Data UDF: row-group fragments in, one report per input row out (stage 1 in one task).

    Reading and processing share a task on purpose: as separate ``map_batches`` Ray fuses them and
    bundles many one-row fragment items into a single task to fill the second stage's batch size,
    which serialises the whole stage. Each chunk of ``max_rows // 2`` input rows makes at most one
    shard of ``max_rows`` single samples.
    """
    for raw in read_fragments(fragments, filesystem=filesystem, batch_rows=max_rows // 2):
        yield subjects_to_singles(raw, out_dir=out_dir, max_rows=max_rows, **kwargs)
