"""Reading Subject200K-format parquet: file listing, row-group fragments, stable row ids.

Every input row gets the id ``"<file path relative to the input root>#<row index in that file>"``.
It is readable (it points at the row), stable whatever Ray's parallelism, and independent of where
the set is mounted, which ``ray.data.read_parquet``'s synthetic ``row_hash`` is not (it hashes the
absolute path and counts rows per read fragment). So the driver lists the files and reads only
their footers (row-group sizes), and Ray Data reads the row groups: one small item per row group
becomes a task that streams that row group in batches and numbers its rows.

Nested columns are flattened, and text columns are turned into *binary* right here: a non-UTF-8
description must reach validation as bytes (and be quarantined) instead of failing inside Arrow.
A missing struct field or unusable value reads as null, so odd rows are accounted for (filtered or
quarantined), not fatal; a file without Subject200K's top-level columns is refused up front.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .schema import QUALITY_FIELDS, TEXT_FIELDS

TOP_LEVEL = ("image", "collection", "quality_assessment", "description")
RAW_SCHEMA = pa.schema(
    [("row_id", pa.string()), ("image_bytes", pa.binary()), ("collection", pa.binary())]
    + [(f"q_{name}", pa.int64()) for name in QUALITY_FIELDS]
    + [(name, pa.binary()) for name in TEXT_FIELDS]
)


@dataclass(frozen=True)
class Fragment:
    """Rows [first_row, first_row + num_rows) of one row group of one file."""

    path: str  # filesystem path
    name: str  # path relative to the input root, used in row ids
    row_group: int
    first_row: int  # index in the file of the row group's first row
    num_rows: int  # may be fewer than the row group holds (--limit)


def resolve_input(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local folder/file or any URI pyarrow reads (s3://, gs://)."""
    try:
        if "://" in uri:
            return pafs.FileSystem.from_uri(uri)
        from pathlib import Path

        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise ValueError(f"cannot open input {uri!r}: {err}") from err


def list_parquet_files(fs: pafs.FileSystem, root: str, uri: str) -> list[tuple[str, str]]:
    """Sorted ``(path, name relative to root)`` of every ``*.parquet`` under ``root``."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        return [(root, root.rsplit("/", 1)[-1])]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise ValueError(f"input {uri!r} holds no .parquet files")
    prefix = root.rstrip("/") + "/"
    return [(p, p.removeprefix(prefix)) for p in files]


def plan_fragments(fs: pafs.FileSystem, files: list[tuple[str, str]], limit: int | None) -> list[Fragment]:
    """One fragment per row group, in file order; ``limit`` keeps the first ``limit`` rows overall."""

    def footer(path: str):
        try:
            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata
        except Exception as err:
            raise ValueError(f"{path} is not a readable parquet file: {err}") from err

    with ThreadPoolExecutor(max_workers=16) as pool:  # footers only; I/O bound on object stores
        metas = list(pool.map(footer, [p for p, _ in files]))
    for (path, _), meta in zip(files, metas):
        missing = [c for c in TOP_LEVEL if c not in meta.schema.to_arrow_schema().names]
        if missing:  # a whole file in another layout is bad input, not a row to quarantine
            raise ValueError(f"{path} is not in Subject200K layout: no column(s) {missing}")
    fragments: list[Fragment] = []
    remaining = limit if limit is not None else float("inf")
    for (path, name), meta in zip(files, metas):
        first = 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            take = int(min(n, remaining))
            if take > 0:
                fragments.append(Fragment(path, name, rg, first, take))
            remaining -= take
            first += n
    return fragments


def _column(table: pa.Table, name: str, field: str | None = None) -> pa.ChunkedArray | None:
    if name not in table.column_names:
        return None
    col = table.column(name)
    if field is None:
        return col
    if not pa.types.is_struct(col.type) or col.type.get_field_index(field) < 0:
        return None
    return pc.struct_field(col, field)  # parent nulls propagate


def _as(col: pa.ChunkedArray | None, typ: pa.DataType, n: int) -> pa.Array:
    if col is None:
        return pa.nulls(n, typ)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_string(col.type) and typ == pa.binary():
        return col.view(pa.binary())  # zero copy, no UTF-8 validation
    if pa.types.is_large_string(col.type) and typ == pa.binary():
        return col.view(pa.large_binary()).cast(pa.binary())
    try:
        return col.cast(typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.nulls(n, typ)  # unusable type: treated as missing


def flatten(table: pa.Table, fragment: Fragment, offset: int) -> pa.Table:
    """Raw rows -> RAW_SCHEMA, with row ids ``name#index`` starting at ``first_row + offset``."""
    n = table.num_rows
    start = fragment.first_row + offset
    columns = {
        "row_id": pa.array([f"{fragment.name}#{i}" for i in range(start, start + n)], pa.string()),
        "image_bytes": _as(_column(table, "image", "bytes"), pa.binary(), n),
        "collection": _as(_column(table, "collection"), pa.binary(), n),
    }
    for name in QUALITY_FIELDS:
        columns[f"q_{name}"] = _as(_column(table, "quality_assessment", name), pa.int64(), n)
    for name in TEXT_FIELDS:
        columns[name] = _as(_column(table, "description", name), pa.binary(), n)
    return pa.table(columns, schema=RAW_SCHEMA)


def read_fragments(batch: pa.Table, *, filesystem: pafs.FileSystem, batch_rows: int) -> Iterator[pa.Table]:
    """Ray Data UDF: fragment descriptions in, flattened input rows out (streamed in batches)."""
    for spec in batch.to_pylist():
        fragment = Fragment(**spec)
        with filesystem.open_input_file(fragment.path) as f:
            pf = pq.ParquetFile(f)
            offset = 0
            for rb in pf.iter_batches(batch_size=batch_rows, row_groups=[fragment.row_group], use_threads=False):
                if offset >= fragment.num_rows:
                    break
                rb = rb.slice(0, fragment.num_rows - offset)
                yield flatten(pa.Table.from_batches([rb]), fragment, offset)
                offset += rb.num_rows
