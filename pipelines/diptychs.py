"""Stage 2: compose each planned pair from its two single samples, read where they lie.

Stage 1 reported the shard and row of every kept subject's samples, and ``single/`` shards hold one
row per row group, so a task can read exactly the rows its pairs need (~0.4 ms a side from an open
shard, ~1 ms to open one) instead of shuffling image bytes through the object store. A shuffle
(``groupby(pair)``) was tried first: its copies and Ray's extra shuffle workers cost ~25% on top of
composing, and ``Dataset.join`` needs polars. Here every task is plain: a chunk of pairs in, one
diptych shard out, streaming, no barrier. The output must be on a filesystem all workers see
(already required for ``single/``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .images import ImageCodec
from .pairing import PairPlan
from .samples import diptych_sample
from .schema import SAMPLE_SCHEMA
from .shards import write_shards

SIDE_COLUMNS = ["subjects", "sources", "items", "categories", "condition_images", "target_image", "target_prompt"]


def pair_table(dataset: str, plan: PairPlan, kept: pa.Table) -> pa.Table:
    """Where each pair's samples live, vectorised: ``sample_id, a_shard, a_row, b_shard, b_row``.

    ``kept``: kept subjects sorted by row id (the plan indexes into it) with ``shard`` and
    ``shard_row`` (the row of the subject's "0>1" sample; "1>0" follows it). Diptych ids are
    ``<dataset>/<pair index, 8 digits>``.
    """
    shards = kept.column("shard").combine_chunks()
    first = kept.column("shard_row").to_numpy()
    index = pc.utf8_lpad(pa.array(np.arange(len(plan))).cast(pa.string()), 8, "0")
    return pa.table({
        "dataset": pa.repeat(pa.scalar(dataset), len(plan)),
        "sample_id": pc.binary_join_element_wise(pa.scalar(dataset), index, "/"),
        "a_shard": shards.take(pa.array(plan.a, pa.int64())), "a_row": pa.array(first[plan.a] + plan.a_dir),
        "b_shard": shards.take(pa.array(plan.b, pa.int64())), "b_row": pa.array(first[plan.b] + plan.b_dir),
    })  # fmt: skip


class ShardReader:
    """Single rows by (shard, row), keeping each shard open for the rest of the task."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files: dict[str, tuple[pq.ParquetFile, np.ndarray]] = {}

    def row(self, shard: str, row: int) -> dict:
        if shard not in self.files:
            pf = pq.ParquetFile(f"{self.directory}/{shard}")
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            self.files[shard] = (pf, starts)
        pf, starts = self.files[shard]
        group = int(np.searchsorted(starts, row, side="right") - 1)
        table = pf.read_row_group(group, columns=SIDE_COLUMNS).slice(row - starts[group], 1)
        r = table.to_pylist()[0]
        return dict(subject=r["subjects"][0], source=r["sources"][0], item=r["items"][0], category=r["categories"][0],
                    condition_image=r["condition_images"][0], target_image=r["target_image"],
                    description=r["target_prompt"])  # fmt: skip

    def close(self) -> None:
        for pf, _ in self.files.values():
            pf.close()


def compose_chunk(pairs: pa.Table, *, single_dir: str, out_dir: str, size: tuple[int, int], codec: ImageCodec,
                  max_rows: int, max_bytes: int) -> pa.Table:  # fmt: skip
    """Ray Data UDF: a chunk of one dataset's pairs in, its diptych shard written; returns row counts."""
    reader = ShardReader(single_dir)
    try:
        rows = [
            diptych_sample(p["sample_id"], p["dataset"], reader.row(p["a_shard"], p["a_row"]),
                           reader.row(p["b_shard"], p["b_row"]), size, codec)
            for p in pairs.to_pylist()
        ]  # fmt: skip
    finally:
        reader.close()
    counts = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        part = pa.Table.from_pylist([r for r in rows if r["dataset"] == dataset], schema=SAMPLE_SCHEMA)
        write_shards(part, f"{out_dir}/{dataset}", max_rows=max_rows, max_bytes=max_bytes)
        counts[dataset] = part.num_rows
    return pa.table({"dataset": list(counts), "rows": pa.array(list(counts.values()), pa.int64())})
