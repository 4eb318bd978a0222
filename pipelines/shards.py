"""Writing bounded parquet shards from Ray tasks, and summarising what was written.

Each task writes its own shards (at most ``max_rows`` rows and about ``max_bytes`` of image data
each, never splitting a unit such as a subject's two single samples) and returns where every row
went; that is how the driver learns sample locations without a second read. Shard names derive
from their first sample id, so a retried task rewrites the same file with the same content.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# One row per row group: a reader (stage 2, a training loader) can fetch any one sample by reading
# just its row group; with ~0.5-1.5 MB rows the per-group overhead (~1.4 KB of footer) is noise.
ROW_GROUP_ROWS = 1


def row_bytes(table: pa.Table) -> np.ndarray:
    """Approximate stored bytes of each row: its image bytes (the rest is small)."""
    total = np.zeros(table.num_rows, dtype=np.int64)
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_binary(col.type):
            total += pc.fill_null(pc.binary_length(col), 0).to_numpy()
        elif pa.types.is_list(col.type) and pa.types.is_binary(col.type.value_type):
            lengths = pc.binary_length(pc.list_flatten(col)).to_numpy(zero_copy_only=False)
            counts = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
            offsets = np.concatenate([[0], np.cumsum(counts)])
            sums = np.concatenate([[0], np.cumsum(np.nan_to_num(lengths.astype(np.float64)))])
            total += (sums[offsets[1:]] - sums[offsets[:-1]]).astype(np.int64)
    return total


def split_points(nbytes: np.ndarray, max_rows: int, max_bytes: int, unit: int = 1) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of at most ``max_rows`` rows / ``max_bytes`` bytes (at least one unit)."""
    ranges, start, size = [], 0, 0
    for i in range(0, len(nbytes), unit):
        unit_bytes = int(nbytes[i : i + unit].sum())
        if i > start and (i + unit - start > max_rows or size + unit_bytes > max_bytes):
            ranges.append((start, i))
            start, size = i, 0
        size += unit_bytes
    if start < len(nbytes):
        ranges.append((start, len(nbytes)))
    return ranges


def write_shards(table: pa.Table, directory: str, *, max_rows: int, max_bytes: int, unit: int = 1,
                 id_column: str = "sample_id") -> list[tuple[str, int, int]]:  # fmt: skip
    """Write ``table`` as shards in ``directory``; returns ``(file name, start, stop)`` per shard."""
    out = []
    small = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_integer(f.type)]
    os.makedirs(directory, exist_ok=True)
    for start, stop in split_points(row_bytes(table), max_rows, max_bytes, unit):
        first = table.column(id_column)[start].as_py()
        name = f"part-{hashlib.sha1(first.encode()).hexdigest()[:16]}.parquet"
        tmp = os.path.join(directory, f".{name}.tmp")
        pq.write_table(table.slice(start, stop - start), tmp, row_group_size=ROW_GROUP_ROWS,
                       write_statistics=small)  # no min/max of image bytes in the footer
        os.replace(tmp, os.path.join(directory, name))
        out.append((name, start, stop))
    return out


def write_empty(directory: str, schema: pa.Schema) -> None:
    """A dataset with no rows still gets a readable (empty) shard with the schema."""
    os.makedirs(directory, exist_ok=True)
    pq.write_table(schema.empty_table(), os.path.join(directory, "part-empty.parquet"))


def shard_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".parquet"))


def read_columns(directory: str, columns: list[str]) -> pa.Table | None:
    files = shard_files(directory)
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def summarise(directory: str) -> dict:
    """Rows, shards, bytes and the dataset hash of a written dataset, read back from disk.

    Only the small ``sample_id`` and ``content_hash`` columns are read. The dataset hash is sha256
    over the sorted ``"<sample_id> <content_hash>\n"`` lines, so it is independent of shard layout.
    """
    files = [f for f in shard_files(directory) if not f.endswith("part-empty.parquet")]
    table = read_columns(directory, ["sample_id", "content_hash"])
    if table is None or table.num_rows == 0:
        return {"rows": 0, "shards": 0, "bytes": 0, "hash": hashlib.sha256(b"").hexdigest()}
    table = table.sort_by("sample_id")
    ids = table.column("sample_id")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        raise RuntimeError(f"{directory}: duplicate sample ids; two builds were mixed")
    lines = pc.binary_join_element_wise(ids, " ", table.column("content_hash"), "\n", "").combine_chunks()
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
    text = lines.buffers()[2].to_pybytes()[offsets[0] : offsets[-1]]  # all lines, one buffer: no per-row Python
    digest = hashlib.sha256(text).hexdigest()
    return {
        "rows": table.num_rows,
        "shards": len(files),
        "bytes": sum(os.path.getsize(f) for f in files),
        "hash": digest,
    }
