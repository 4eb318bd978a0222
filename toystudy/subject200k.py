"""Single-subject customisation data for the toy study, in Subject200K's parquet format.

Each row is one subject shown twice, in two scenes that differ in background (always), placement
and scale, laid out on Subject200K's composite geometry (:class:`pipelines.panels.PanelGeometry`,
scaled: 0.125 gives 132x66 composites with 64x64 panels) with ``description{item, category,
description_0, description_1, description_valid}``, scores 5/5/5 and ``collection_2``. So every
row passes ``musar data build`` and becomes two single samples, and the build's diptychs pair
*different* rows: no image with more than one subject is ever written here, which is the premise
of MUSAR (multi-subject customisation learned from single-subject data).

The file layout is :func:`pipelines.synthetic.write_synthetic`'s (``train-XXXXX-of-YYYYY.parquet``
and the same schema), plus ``toy_manifest.json`` naming the subjects written and those held out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.images import ImageCodec
from pipelines.panels import PanelGeometry
from pipelines.synthetic import SCHEMA, empty_parquet_dir

from .world import ALL_SUBJECTS, BACKGROUNDS, Subject, describe_panel, render_scene, sample_placements

MANIFEST = "toy_manifest.json"
COLLECTION = "collection_2"
QUALITY = {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5}


@dataclass
class ToyDataConfig:
    output: str
    rows: int = 240
    seed: int = 0
    subjects: tuple[str, ...] | None = None  # items ("Red striped triangle") to draw from; None: the whole world
    hold_out: tuple[str, ...] = ()  # items never written (e.g. kept for evaluation only)
    # description.item (the condition prompt): "shape" writes "Triangle", so colour and pattern must
    # come from the reference image, as a real subject's identity does; "full": "Red striped triangle".
    item_words: Literal["shape", "full"] = "shape"
    rows_per_file: int = 100
    row_group_rows: int = 25
    image_format: Literal["png", "jpeg"] = "png"  # png: the detector reads the exact pixels back
    overwrite: bool = False
    geometry: PanelGeometry = field(default_factory=lambda: PanelGeometry(scale=0.125))  # 64x64 panels

    def __post_init__(self) -> None:
        if self.rows < 1 or self.rows_per_file < 1 or self.row_group_rows < 1:
            raise ValueError("rows, rows_per_file and row_group_rows must be >= 1")
        if isinstance(self.geometry, dict):
            self.geometry = PanelGeometry(**self.geometry)
        self.subjects = None if self.subjects is None else tuple(self.subjects)
        self.hold_out = tuple(self.hold_out)
        for item in (*(self.subjects or ()), *self.hold_out):
            Subject.from_text(item)  # raises on an unknown subject
        if not self.pool():
            raise ValueError("no subjects left to write: every chosen subject is held out")

    def pool(self) -> tuple[Subject, ...]:
        """The subjects rows are drawn from, in world order."""
        chosen = ALL_SUBJECTS if self.subjects is None else {Subject.from_text(t) for t in self.subjects}
        held = {Subject.from_text(t) for t in self.hold_out}
        return tuple(s for s in ALL_SUBJECTS if s in chosen and s not in held)


def row_subjects(cfg: ToyDataConfig) -> list[Subject]:
    """The subject of every row: seeded shuffles of the pool, one after another, so coverage is even."""
    pool, rng = cfg.pool(), np.random.default_rng([cfg.seed, 0])
    order: list[Subject] = []
    while len(order) < cfg.rows:
        order += [pool[int(i)] for i in rng.permutation(len(pool))]
    return order[: cfg.rows]


def item_name(subject: Subject, item_words: str = "shape") -> str:
    """``description.item``, the condition prompt: "Triangle" ("shape") or "Red striped triangle" ("full")."""
    return subject.item if item_words == "full" else subject.shape.capitalize()


def _row(cfg: ToyDataConfig, i: int, subject: Subject, codec: ImageCodec) -> dict:
    rng = np.random.default_rng([cfg.seed, 1, i])
    g = cfg.geometry
    canvas = Image.new("RGB", g.composite_size, (255, 255, 255))
    names = list(BACKGROUNDS)
    backgrounds = [names[int(k)] for k in rng.choice(len(names), size=2, replace=False)]
    descriptions = []
    for (x0, y0, x1, y1), background in zip(g.boxes, backgrounds):
        w, h = x1 - x0, y1 - y0
        placement = sample_placements([subject], rng, aspect=w / h)[0]
        canvas.paste(render_scene([subject], [placement], background, (w, h), rng), (x0, y0))
        descriptions.append(describe_panel(placement, background, rng))
    item = item_name(subject, cfg.item_words)
    description = {"item": item, "category": subject.category, "description_0": descriptions[0],
                   "description_1": descriptions[1], "description_valid": True}  # fmt: skip
    return {"image": {"bytes": codec.encode(canvas), "path": None}, "collection": COLLECTION,
            "quality_assessment": dict(QUALITY), "description": description}  # fmt: skip


def write_toy_subject200k(cfg: ToyDataConfig) -> Path:
    """Write the parquet files and ``toy_manifest.json``; returns the output folder."""
    out = empty_parquet_dir(cfg.output, cfg.overwrite)
    subjects = row_subjects(cfg)
    codec = ImageCodec(format=cfg.image_format)
    files = -(-cfg.rows // cfg.rows_per_file)
    for f in range(files):
        name = f"train-{f:05d}-of-{files:05d}.parquet"
        start, stop = f * cfg.rows_per_file, min(cfg.rows, (f + 1) * cfg.rows_per_file)
        table = pa.Table.from_pylist([_row(cfg, i, subjects[i], codec) for i in range(start, stop)], schema=SCHEMA)
        pq.write_table(table, out / f"{name}.tmp", row_group_size=cfg.row_group_rows)
        (out / f"{name}.tmp").rename(out / name)
    manifest = {
        "config": asdict(cfg),
        "rows": cfg.rows,
        "files": files,
        "panel_size": [b - a for a, b in zip(cfg.geometry.left_box[:2], cfg.geometry.left_box[2:])],
        "subjects": sorted({s.item for s in subjects}),
        "held_out": sorted(Subject.from_text(t).item for t in cfg.hold_out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out
