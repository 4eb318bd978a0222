"""``manifest.json``: what went in, what came out, and how to tell two builds apart.

Accounting is computed from the per-row reports with pyarrow (vectorised), and the invariant
``input = kept + filtered + quarantined`` is asserted, both against the row count the parquet
footers promised and against the number of reports (so a row lost inside Ray would fail loudly).
Dataset hashes are recomputed from the shards on disk (see :func:`pipelines.shards.summarise`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from .schema import FILTERED, KEPT, QUARANTINE_REASONS, QUARANTINED


def _counts(values: pa.Array) -> dict[str, int]:
    if len(values) == 0:
        return {}
    vc = pc.value_counts(values)
    return dict(sorted(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))


def accounting(reports: pa.Table, input_rows: int) -> dict:
    status = reports.column("status")
    reason = reports.column("reason")

    def where(s):
        return pc.filter(reason, pc.equal(status, s))

    kept = pc.sum(pc.equal(status, KEPT).cast(pa.int64())).as_py() or 0
    filtered = _counts(where(FILTERED))
    quarantined = {r: 0 for r in QUARANTINE_REASONS} | _counts(where(QUARANTINED))
    counts = {
        "input_rows": input_rows,
        "kept": kept,
        "filtered": sum(filtered.values()),
        "filtered_by": {"collection": filtered.get("collection", 0), "quality": filtered.get("quality", 0)},
        "quarantined": sum(quarantined.values()),
        "quarantined_by": quarantined,
    }
    total = counts["kept"] + counts["filtered"] + counts["quarantined"]
    if not (total == input_rows == reports.num_rows):
        raise AssertionError(
            f"row accounting broken: input {input_rows} rows (footers), {reports.num_rows} reports, "
            f"kept {kept} + filtered {counts['filtered']} + quarantined {counts['quarantined']} = {total}"
        )
    if pc.count_distinct(reports.column("row_id")).as_py() != reports.num_rows:
        raise AssertionError("row accounting broken: a row was reported twice")
    return counts


def code_version() -> dict:
    import musar_core

    repo = Path(__file__).resolve().parents[1]
    version = {"musar_core": musar_core.__version__, "git_commit": None, "git_dirty": None}
    try:
        git = {"cwd": repo, "capture_output": True, "text": True, "timeout": 10}
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, **git)
        if commit.returncode == 0:
            version["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, **git)
            version["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass  # no git (e.g. a Ray working_dir upload): the package version still identifies the code
    return version


def write_manifest(path: Path, manifest: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
