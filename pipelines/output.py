"""One build, one output folder: built beside the target, then swapped in whole.

A build writes into a fresh hidden sibling (``.<name>.building-<id>``) and only a finished build is
renamed to the output path, so a reader never sees half a build and two runs never mix. An
existing output is refused unless ``overwrite``; then it is renamed aside, the new build renamed
in, and the old one deleted (each rename is atomic on one filesystem). A failed build leaves the
existing output untouched and removes its staging folder.

The output must be a path every Ray worker sees: local for a single machine, a shared mount
(NFS, /mnt/cluster_storage, ...) on a cluster. Object stores (s3://) have no atomic directory
rename, so they are refused rather than half-supported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def check_output(output: str, overwrite: bool) -> Path:
    if "://" in output:
        raise ValueError(
            f"output {output!r}: write to a local or shared-mount path (all Ray nodes must see it); "
            "object stores have no atomic directory rename"
        )
    path = Path(output).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output {path} already holds a build; pass --overwrite true to replace it "
            "(the new build is made beside it and swapped in whole) or choose another --output"
        )
    return path


@contextlib.contextmanager
def staged_output(output: str, overwrite: bool):
    """Yields the staging folder to build into; on success it becomes ``output``."""
    final = check_output(output, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.building-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _swap_in(staging, final, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, final: Path, overwrite: bool) -> None:
    old = None
    if final.exists():
        check_output(str(final), overwrite)  # another run may have finished meanwhile
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    try:
        os.rename(staging, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
