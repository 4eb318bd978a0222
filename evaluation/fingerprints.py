"""Fingerprints: short hashes that say when two evaluations generated or scored the same thing.

- Model folder (FLUX, metric models): *shallow* - the contents of small files (configs, tokenizer
  files) plus the names and sizes of weight files. Hashing 24 GB of FLUX weights on every run would
  cost minutes, and base weights are not edited in place.
- LoRA folder: *deep* - every byte. Checkpoints of one training run have identical names and sizes,
  so only their contents tell them apart (a FLUX rank-128 LoRA hashes in a second or two).
- Generation: model + LoRA + every setting that changes pixels (MUSAR config, size, steps,
  guidance, sequence length, dtype). Generated images live under it, so a rerun with the same
  fingerprint reuses them and any change starts a fresh folder.
- Split: the cases (ids, prompts, phrases, occurrences, the bytes of every condition and reference
  image) and the seeds: two runs with the same split fingerprint scored the same task.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SMALL_FILE = 4 << 20  # files up to 4 MiB are hashed by content in shallow fingerprints


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_fingerprint(path: str | Path, deep: bool = False) -> str:
    path = Path(path)
    if path.is_file():
        files = [path]
        root = path.parent
    else:
        root = path
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    entries = []
    for f in files:
        size = f.stat().st_size
        content = _file_sha(f) if deep or size <= SMALL_FILE else None
        entries.append([str(f.relative_to(root)), size, content])
    return _digest(entries)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def generation_fingerprint(model_fp: str, lora_fp: str | None, settings: dict) -> str:
    return _digest({"model": model_fp, "lora": lora_fp, "settings": settings})


def split_fingerprint(cases, seeds: list[int]) -> str:
    return _digest({"seeds": list(seeds), "cases": [c.scoring_digest() for c in cases]})
