"""``musar data synth``: a synthetic Subject200K-format parquet set for tests, demos and benchmarks.

Same schema as the real dataset (``image{bytes, path}``, ``collection``,
``quality_assessment{compositeStructure, objectConsistency, imageQuality}``,
``description{item, category, description_0, description_1, description_valid}``) and the same
composite geometry (:class:`~pipelines.panels.PanelGeometry`, scalable): each row shows one
procedurally drawn subject twice, in two scenes, with Subject200K-style item, category and scene
descriptions. Some rows are in other collections or have low scores, and chosen otherwise-good rows
can be corrupted on purpose (bad or truncated bytes, wrong size, a missing description field,
non-UTF-8 text, null or partial quality). ``synthetic_manifest.json`` beside the shards states the
outcome the build must report for every row, so tests can demand exact counts.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from .panels import PanelGeometry
from .schema import (
    FILTER_COLLECTION,
    FILTER_QUALITY,
    MISSING_DESCRIPTION,
    NON_UTF8_TEXT,
    UNDECODABLE_IMAGE,
    WRONG_IMAGE_SIZE,
)

CATALOGUE: dict[str, tuple[str, ...]] = {
    "Personal Care": ("Nourishing scalp oil for healthy hair", "Bamboo toothbrush with charcoal bristles",
                      "Lavender scented body lotion", "Electric facial cleansing brush"),
    "Furniture": ("Mid-century walnut armchair", "Minimalist oak bookshelf", "Velvet tufted ottoman",
                  "Rattan hanging egg chair"),
    "Kitchenware": ("Cast iron skillet with wooden handle", "Ceramic pour-over coffee dripper",
                    "Copper whistling tea kettle", "Bamboo cutting board set"),
    "Electronics": ("Wireless noise-cancelling headphones", "Retro-style portable radio",
                    "Compact mirrorless camera", "Smart speaker with fabric cover"),
    "Toys": ("Wooden stacking rainbow", "Plush teddy bear with bow tie", "Remote control monster truck",
             "Tin wind-up robot"),
    "Clothing": ("Denim jacket with embroidered patches", "Wool knit beanie", "Silk floral scarf",
                 "Canvas high-top sneakers"),
    "Jewelry": ("Silver pendant necklace with sapphire", "Gold hoop earrings", "Beaded friendship bracelet"),
    "Stationery": ("Leather-bound travel journal", "Fountain pen with gold nib", "Watercolor paint set"),
    "Sports Equipment": ("Carbon fiber tennis racket", "Leather basketball", "Yoga mat with alignment lines"),
    "Home Decor": ("Hand-blown glass vase", "Macrame wall hanging", "Brass table lamp with linen shade"),
    "Musical Instruments": ("Acoustic ukulele", "Brass trumpet", "Wooden djembe drum"),
    "Bags and Luggage": ("Leather messenger bag", "Canvas tote bag", "Hard-shell carry-on suitcase"),
}  # fmt: skip
RARE_CATEGORIES = (("Meteorites", "Polished iron meteorite slice"), ("Ship Models", "Bottled clipper ship model"),
                   ("Fossils", "Ammonite fossil on a slate base"))  # fmt: skip
SETTINGS = (
    "In an upscale city salon", "Placed elegantly on a stone ledge beside a bubbling stream",
    "On a rustic wooden table in a sunlit farmhouse kitchen", "Resting on a white marble countertop",
    "In a cozy reading nook with knitted blankets", "On a sandy beach at sunset", "Displayed in a minimalist gallery",
    "Amid the bustle of a night market", "In a snowy mountain cabin", "On a glass shelf in a modern boutique",
    "Beside a rain-streaked window in a quiet cafe", "On a moss-covered log deep in a pine forest",
)  # fmt: skip
POSES = ("this item stands against", "this item rests in front of", "this item harmonizes with",
         "this item is framed by", "this item sits beside", "this item catches the light from")  # fmt: skip
DETAILS = (
    "a backdrop of sleek black and white decor, illuminated by the modern track lighting above",
    "the dappled sunlight filtering through the overhead foliage", "a bowl of fresh lemons and a linen napkin",
    "the soft glow of morning light from a nearby window", "a stack of well-worn books and a mug of cocoa",
    "gentle waves rolling onto the shore", "a smooth concrete wall under a single spotlight",
    "strings of paper lanterns and colorful stalls", "a crackling fireplace and frosted windowpanes",
    "neatly arranged accessories and potted ferns",
)  # fmt: skip
OTHER_COLLECTIONS = ("collection_1", "collection_3")
CORRUPTIONS = ("corrupt_bytes", "truncated", "wrong_size", "missing_description", "non_utf8", "null_quality",
               "partial_quality")  # fmt: skip
EXPECTED = {"corrupt_bytes": ("quarantined", UNDECODABLE_IMAGE), "truncated": ("quarantined", UNDECODABLE_IMAGE),
            "wrong_size": ("quarantined", WRONG_IMAGE_SIZE), "missing_description": ("quarantined", MISSING_DESCRIPTION),
            "non_utf8": ("quarantined", NON_UTF8_TEXT), "null_quality": ("filtered", FILTER_QUALITY),
            "partial_quality": ("filtered", FILTER_QUALITY)}  # fmt: skip
MANIFEST = "synthetic_manifest.json"


@dataclass
class SynthConfig:
    output: str
    rows: int = 200
    seed: int = 0
    rows_per_file: int = 100
    row_group_rows: int = 25
    collection_2_fraction: float = 0.85  # the rest is split over collection_1 / collection_3
    low_quality_fraction: float = 0.15  # rows with a score below 5
    rare_categories: int = 1  # good rows given a category no other row has (single-subject categories)
    noise: float = 4.0  # pixel noise, so images compress like photos rather than flat drawings
    image_format: Literal["jpeg", "png"] = "jpeg"
    overwrite: bool = False
    geometry: PanelGeometry = field(default_factory=PanelGeometry)
    # otherwise-good rows corrupted on purpose
    corrupt_bytes: int = 0
    truncated: int = 0
    wrong_size: int = 0
    missing_description: int = 0
    non_utf8: int = 0
    null_quality: int = 0
    partial_quality: int = 0

    def __post_init__(self) -> None:
        if self.rows < 1 or self.rows_per_file < 1 or self.row_group_rows < 1:
            raise ValueError("rows, rows_per_file and row_group_rows must be >= 1")
        for name in ("collection_2_fraction", "low_quality_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.rare_categories <= len(RARE_CATEGORIES):
            raise ValueError(f"rare_categories must be in 0..{len(RARE_CATEGORIES)}")
        if any(getattr(self, c) < 0 for c in CORRUPTIONS):
            raise ValueError("corruption counts must be >= 0")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(30, 226, size=3))


def _panel(size: tuple[int, int], item: str, scene_rng: np.random.Generator, noise: float) -> Image.Image:
    """A subject (shape and colour fixed by the item) in a scene (gradient, pose from ``scene_rng``)."""
    w, h = size
    top, bottom = np.array(_colour(scene_rng), np.float32), np.array(_colour(scene_rng), np.float32)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (h, w, 3)).copy()
    if noise > 0:
        pixels += scene_rng.normal(0, noise, size=pixels.shape).astype(np.float32)
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    key = zlib.crc32(item.encode())
    subject = np.random.default_rng(key)
    colour, accent = _colour(subject), _colour(subject)
    r = int(min(w, h) * scene_rng.uniform(0.22, 0.34))
    cx, cy = int(w * scene_rng.uniform(0.35, 0.65)), int(h * scene_rng.uniform(0.4, 0.65))
    draw = ImageDraw.Draw(im)
    shape = key % 3
    if shape == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=accent, width=max(1, r // 8))
    elif shape == 1:
        draw.rounded_rectangle((cx - r, cy - r, cx + r, cy + r), radius=max(1, r // 4), fill=colour)
        draw.rectangle((cx - r // 2, cy - r // 4, cx + r // 2, cy + r // 4), fill=accent)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour, outline=accent)
    return im


def _description(rng: np.random.Generator) -> str:
    return f"{SETTINGS[rng.integers(len(SETTINGS))]}, {POSES[rng.integers(len(POSES))]} {DETAILS[rng.integers(len(DETAILS))]}."


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90) if fmt == "jpeg" else im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _composite(cfg: SynthConfig, item: str, rng: np.random.Generator, size: tuple[int, int] | None = None) -> bytes:
    g = cfg.geometry
    canvas = Image.new("RGB", g.composite_size, (255, 255, 255))
    for (x0, y0, x1, y1) in g.boxes:
        canvas.paste(_panel((x1 - x0, y1 - y0), item, rng, cfg.noise), (x0, y0))
    if size is not None:
        canvas = canvas.resize(size)
    return _encode(canvas, cfg.image_format)


def _plan(cfg: SynthConfig) -> list[dict]:
    """Per row: collection, scores, category, item, and the planted corruption (if any)."""
    rng = np.random.default_rng([cfg.seed, 0])
    categories = sorted(CATALOGUE)
    rows = []
    for i in range(cfg.rows):
        category = categories[rng.integers(len(categories))]
        row = {"category": category, "item": CATALOGUE[category][rng.integers(len(CATALOGUE[category]))],
               "collection": "collection_2", "quality": [5, 5, 5], "corruption": None}  # fmt: skip
        if rng.random() >= cfg.collection_2_fraction:
            row["collection"] = OTHER_COLLECTIONS[rng.integers(len(OTHER_COLLECTIONS))]
        if rng.random() < cfg.low_quality_fraction:
            low = rng.integers(0, 3)
            row["quality"][low] = int(rng.integers(1, 5))
        rows.append(row)
    good = [i for i, r in enumerate(rows) if r["collection"] == "collection_2" and min(r["quality"]) == 5]
    wanted = cfg.rare_categories + sum(getattr(cfg, c) for c in CORRUPTIONS)
    if wanted > len(good):
        raise ValueError(f"{wanted} planted rows requested but only {len(good)} good rows; raise rows")
    chosen = iter(rng.permutation(good)[:wanted].tolist())
    for k in range(cfg.rare_categories):
        rows[next(chosen)].update(category=RARE_CATEGORIES[k][0], item=RARE_CATEGORIES[k][1])
    for name in CORRUPTIONS:
        for _ in range(getattr(cfg, name)):
            rows[next(chosen)]["corruption"] = name
    return rows


def _row(cfg: SynthConfig, i: int, plan: dict) -> dict:
    rng = np.random.default_rng([cfg.seed, 1, i])
    item, corruption = plan["item"], plan["corruption"]
    w, h = cfg.geometry.composite_size
    image = _composite(cfg, item, rng, size=(w * 32 // 33, h * 32 // 33) if corruption == "wrong_size" else None)
    if corruption == "corrupt_bytes":
        image = rng.bytes(len(image))
    elif corruption == "truncated":
        image = image[: len(image) // 2]
    quality = dict(zip(("compositeStructure", "objectConsistency", "imageQuality"), plan["quality"]))
    if corruption == "null_quality":
        quality = None
    elif corruption == "partial_quality":
        quality["objectConsistency"] = None
    description = {"item": item, "category": plan["category"], "description_0": _description(rng),
                   "description_1": _description(rng), "description_valid": True}  # fmt: skip
    if corruption == "missing_description":
        description[("item", "category", "description_0", "description_1")[i % 4]] = None
    if corruption == "non_utf8":
        description["description_0"] = description["description_0"].encode().replace(b"this", b"th\xe9s\xff")
    return {"image": {"bytes": image, "path": None}, "collection": plan["collection"],
            "quality_assessment": quality, "description": description}  # fmt: skip


SCHEMA = pa.schema([
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("collection", pa.string()),
    ("quality_assessment", pa.struct([("compositeStructure", pa.int64()), ("objectConsistency", pa.int64()),
                                      ("imageQuality", pa.int64())])),
    ("description", pa.struct([("item", pa.string()), ("category", pa.string()), ("description_0", pa.string()),
                               ("description_1", pa.string()), ("description_valid", pa.bool_())])),
])  # fmt: skip


def _table(rows: list[dict]) -> pa.Table:
    """Rows -> SCHEMA; text given as bytes is stored unvalidated (how non-UTF-8 text gets in)."""
    desc = [r["description"] for r in rows]
    fields = []
    for name in ("item", "category", "description_0", "description_1"):
        raw = [d[name].encode() if isinstance(d[name], str) else d[name] for d in desc]
        fields.append(pa.array(raw, pa.binary()).view(pa.string()))
    fields.append(pa.array([d["description_valid"] for d in desc], pa.bool_()))
    description = pa.StructArray.from_arrays(fields, fields=list(SCHEMA.field("description").type))
    return pa.table({
        "image": pa.array([r["image"] for r in rows], SCHEMA.field("image").type),
        "collection": pa.array([r["collection"] for r in rows], pa.string()),
        "quality_assessment": pa.array([r["quality_assessment"] for r in rows], SCHEMA.field("quality_assessment").type),
        "description": description,
    }, schema=SCHEMA)  # fmt: skip


def empty_parquet_dir(output: str, overwrite: bool) -> Path:
    """The absolute output folder, created, and emptied of earlier parquet files (refused unless
    ``overwrite``): what a writer of a Subject200K-format set starts from."""
    out = Path(output).expanduser().absolute()
    existing = sorted(out.glob("*.parquet")) if out.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} parquet file(s); pass --overwrite true")
    out.mkdir(parents=True, exist_ok=True)
    for f in existing:
        f.unlink()
    return out


def write_synthetic(cfg: SynthConfig) -> Path:
    """Write the shards and ``synthetic_manifest.json``; returns the output folder."""
    out = empty_parquet_dir(cfg.output, cfg.overwrite)
    plan = _plan(cfg)
    files = -(-cfg.rows // cfg.rows_per_file)
    expected, outcome = {}, {}
    for f in range(files):
        name = f"train-{f:05d}-of-{files:05d}.parquet"
        start, stop = f * cfg.rows_per_file, min(cfg.rows, (f + 1) * cfg.rows_per_file)
        rows = [_row(cfg, i, plan[i]) for i in range(start, stop)]
        pq.write_table(_table(rows), out / f"{name}.tmp", row_group_size=cfg.row_group_rows)
        (out / f"{name}.tmp").rename(out / name)
        for i in range(start, stop):
            outcome[f"{name}#{i - start}"] = _expected(plan[i])
    for status, reason in outcome.values():
        key = status if status == "kept" else f"{status}:{reason}"
        expected[key] = expected.get(key, 0) + 1
    manifest = {"config": asdict(cfg), "rows": cfg.rows, "files": files, "expected": dict(sorted(expected.items())),
                "outcome": {row_id: f"{s}:{r}" if r else s for row_id, (s, r) in outcome.items()},
                "single_subject_categories": [RARE_CATEGORIES[k][0] for k in range(cfg.rare_categories)]}  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {cfg.rows} rows in {files} file(s) to {out} (expected outcomes: {manifest['expected']})")
    return out


def _expected(plan: dict) -> tuple[str, str | None]:
    if plan["collection"] != "collection_2":
        return "filtered", FILTER_COLLECTION
    if plan["corruption"] in EXPECTED:
        return EXPECTED[plan["corruption"]]
    if min(plan["quality"]) < 5:
        return "filtered", FILTER_QUALITY
    return "kept", None
