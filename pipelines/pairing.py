"""Seeded pairing of kept subjects into diptychs: random pairs, and same-category pairs.

Pairing without replacement is global: which subject partners which depends on the whole kept
set. So the plan is made on the driver from the kept subjects' ids and category keys only (tens of
bytes per subject; Subject200K's ~112k kept rows are a few MB), with vectorised numpy, never a loop
over rows (only over passes and categories). Subjects are first sorted by row id, so the plan does
not depend on the order in which Ray produced them: same kept set + seed -> same pairs.

A *pass* is one random perfect matching: a seeded permutation of the subjects cut into consecutive
pairs, so within a pass no subject is used twice and a pair never repeats a subject (with an odd
count, the permutation's last subject sits that pass out). Passes are drawn until ``num_pairs``
pairs exist and the last pass is cut short. The default ``num_pairs`` (None) is "as many pairs as
subjects": for an even count exactly two passes, every subject in two pairs (once per pass); for an
odd count each pass pairs all but one, so a short third pass tops the total up.

Same-category pairs run the same passes inside each category (key: the normalised
``description.category``), with that category's own RNG stream (seeded by seed and the key, so one
category's pairs do not move when another category changes). A category's quota is its subject
count by default; an explicit total is shared out in proportion to those counts (largest
remainder). A category with one subject cannot be paired: it is listed in the plan's ``info``.

Each side also draws which of its panels is the condition (the other is its half of the target).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

STREAM_RANDOM = 1
STREAM_SAME_CATEGORY = 2


@dataclass
class PairPlan:
    """Pair k joins subject ``a[k]`` (left) and ``b[k]`` (right); ``*_dir`` picks their direction."""

    a: np.ndarray
    b: np.ndarray
    a_dir: np.ndarray
    b_dir: np.ndarray
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.a)


def _empty(info: dict) -> PairPlan:
    z = np.zeros(0, dtype=np.int64)
    return PairPlan(z, z, z, z, info)


def matching_passes(n: int, num_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """``num_pairs`` pairs of indices in [0, n) from successive random perfect matchings."""
    per_pass = n // 2
    if per_pass == 0 or num_pairs <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    passes = math.ceil(num_pairs / per_pass)
    perms = np.stack([rng.permutation(n)[: 2 * per_pass] for _ in range(passes)])
    a = perms[:, 0::2].reshape(-1)[:num_pairs]
    b = perms[:, 1::2].reshape(-1)[:num_pairs]
    return a.astype(np.int64), b.astype(np.int64), passes


def _directions(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = rng.integers(0, 2, size=(k, 2))
    return d[:, 0].astype(np.int64), d[:, 1].astype(np.int64)


def random_pairs(n: int, num_pairs: int | None, seed: int) -> PairPlan:
    """Pairs of distinct subjects among ``n`` (indices into the row-id-sorted kept subjects)."""
    wanted = n if num_pairs is None else num_pairs
    rng = np.random.default_rng([seed, STREAM_RANDOM])
    a, b, passes = matching_passes(n, wanted, rng)
    a_dir, b_dir = _directions(rng, len(a))
    return PairPlan(a, b, a_dir, b_dir, {"subjects": n, "pairs_requested": wanted, "passes": passes})


def _quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder shares of ``total`` proportional to ``counts`` (ties: lower index first)."""
    if counts.sum() == 0:
        return np.zeros_like(counts)
    exact = total * counts / counts.sum()
    base = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - base), kind="stable")
    base[order[: total - base.sum()]] += 1
    return base


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def same_category_pairs(category_keys: np.ndarray, row_ids: np.ndarray, num_pairs: int | None, seed: int) -> PairPlan:
    """Pairs of distinct subjects sharing a category key (inputs sorted by row id)."""
    keys, inverse, counts = np.unique(category_keys, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1]) if len(keys) else []
    pairable = counts >= 2
    wanted = int(counts[pairable].sum()) if num_pairs is None else num_pairs
    quotas = np.zeros_like(counts)
    quotas[pairable] = _quotas(counts[pairable], wanted)
    parts, per_category = [], {}
    for key, idx, quota in zip(keys, members, quotas):  # a loop over categories, not rows
        if len(idx) < 2:
            continue
        rng = np.random.default_rng([seed, STREAM_SAME_CATEGORY, _key_seed(str(key))])
        a, b, passes = matching_passes(len(idx), int(quota), rng)
        a_dir, b_dir = _directions(rng, len(a))
        parts.append((idx[a], idx[b], a_dir, b_dir))
        per_category[str(key)] = {"subjects": len(idx), "pairs": len(a), "passes": passes}
    single = {str(k): str(row_ids[idx[0]]) for k, idx in zip(keys, members) if len(idx) == 1}
    info = {"subjects": len(category_keys), "pairable_subjects": int(counts[pairable].sum()),
            "pairs_requested": wanted, "categories": per_category, "single_subject_categories": single}  # fmt: skip
    if not parts:
        return _empty(info)
    a, b, a_dir, b_dir = (np.concatenate(cols) for cols in zip(*parts))
    return PairPlan(a, b, a_dir, b_dir, info)
