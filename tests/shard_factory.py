"""Small shard folders in the pipeline's sample schema, for training tests that need no data build."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.schema import SAMPLE_SCHEMA, content_hash


def _png(seed: int, size: int, width: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, width or size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_training_shards(root: Path, rows: int = 8, size: int = 32) -> Path:
    """single/, diptych_random/ and diptych_same_category/ with ``rows`` samples each."""
    items = ["red dog", "blue cat", "green teapot", "yellow backpack"]
    for dataset in ("single", "diptych_random", "diptych_same_category"):
        records = []
        for i in range(rows):
            if dataset == "single":
                cond_prompts = [items[i % 4]]
                target = f"a photo of the {items[i % 4]} on a table"
                spans, width = None, size
            else:
                a, b = items[i % 4], items[(i + 1) % 4]
                p0, p1 = a, ("another " + b if dataset.endswith("category") else b)
                left = f"Two images concatenated side by side, the left part is: {p0}. A {a} in a room"
                target = f"{left}, the right part is: {p1}. A {b} outside"
                s0 = left.index(p0)
                s1 = len(left) + len(", the right part is: ")
                cond_prompts, spans, width = [p0, p1], [[s0, s0 + len(p0)], [s1, s1 + len(p1)]], 2 * size
            cond_images = [_png(100 * i + k, size) for k in range(len(cond_prompts))]
            target_image = _png(7 + i, size, width)
            records.append({
                "sample_id": f"{dataset}-{i}", "dataset": dataset, "subjects": [str(i)] * len(cond_prompts),
                "sources": [str(i)] * len(cond_prompts), "items": cond_prompts, "categories": ["thing"] * len(cond_prompts),
                "condition_images": cond_images, "condition_prompts": cond_prompts, "condition_spans": spans,
                "target_image": target_image, "target_width": width, "target_height": size, "target_prompt": target,
                "content_hash": content_hash(cond_images, cond_prompts, spans, target_image, target),
            })  # fmt: skip
        (root / dataset).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records, schema=SAMPLE_SCHEMA), root / dataset / "part-0.parquet")
    (root / "manifest.json").write_text(json.dumps({"fingerprint": "test-shards"}))
    return root
