"""Stage 2: compose each planned pair from its two single samples, read where they lie.

Stage 1 reported the shard and row of every kept subject's samples, and ``single/`` shards hold one
row per row group, so a task reads exactly the rows its pairs need (one read per shard it touches)
instead of shuffling image bytes through the object store. A shuffle
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


def read_sides(single_dir: str, locations: list[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """The single rows at ``(shard, row)`` locations, reading each shard once for all of its rows."""
    by_shard: dict[str, list[int]] = {}
    for shard, row in locations:
        by_shard.setdefault(shard, []).append(row)
    out = {}
    for shard, rows in by_shard.items():  # a loop over shards; the rows come out of one read
        wanted = np.unique(rows)
        with pq.ParquetFile(f"{single_dir}/{shard}") as pf:
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            group_of = np.searchsorted(starts, wanted, side="right") - 1
            groups = np.unique(group_of)  # read in this order, so group g starts at offset[g] in the table
            records = pf.read_row_groups(groups.tolist(), columns=SIDE_COLUMNS).to_pylist()
        sizes = starts[groups + 1] - starts[groups]
        offset = dict(zip(groups.tolist(), (np.cumsum(sizes) - sizes).tolist()))
        for r, g in zip(wanted.tolist(), group_of.tolist()):
            rec = records[offset[g] + r - int(starts[g])]
            out[(shard, r)] = dict(subject=rec["subjects"][0], source=rec["sources"][0], item=rec["items"][0],
                                   category=rec["categories"][0], condition_image=rec["condition_images"][0],
                                   target_image=rec["target_image"], description=rec["target_prompt"])  # fmt: skip
    return out


def compose_chunk(pairs: pa.Table, *, single_dir: str, out_dir: str, size: tuple[int, int], codec: ImageCodec,
                  max_rows: int, max_bytes: int) -> pa.Table:  # fmt: skip
    """Ray Data UDF: a chunk of one dataset's pairs in, its diptych shard written; returns row counts."""
    plan = pairs.to_pylist()
    sides = read_sides(single_dir, [(p[f"{s}_shard"], p[f"{s}_row"]) for p in plan for s in "ab"])
    rows = [
        diptych_sample(p["sample_id"], p["dataset"], sides[(p["a_shard"], p["a_row"])],
                       sides[(p["b_shard"], p["b_row"])], size, codec)
        for p in plan
    ]  # fmt: skip
    counts = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        part = pa.Table.from_pylist([r for r in rows if r["dataset"] == dataset], schema=SAMPLE_SCHEMA)
        write_shards(part, f"{out_dir}/{dataset}", max_rows=max_rows, max_bytes=max_bytes)
        counts[dataset] = part.num_rows
    return pa.table({"dataset": list(counts), "rows": pa.array(list(counts.values()), pa.int64())})
