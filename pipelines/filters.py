"""The two filters: the chosen collection, and all three quality scores >= min_score.

Vectorised over a batch. Filtering comes before validation so a filtered row is never decoded; a
row that fails both is counted once, under the first rule (collection, then quality). A null or
partial quality assessment cannot show the scores are high enough, so it is filtered (quality),
not quarantined: it is a valid row we do not want.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from .schema import FILTER_COLLECTION, FILTER_QUALITY, QUALITY_FIELDS


def filter_reasons(raw: pa.Table, collection: str | None, min_score: int) -> pa.Array:
    """Per row: ``"collection"``, ``"quality"`` or null (passes both filters)."""
    n = raw.num_rows
    if collection is None:
        wrong_collection = pa.array([False] * n)
    else:
        same = pc.equal(raw.column("collection"), pa.scalar(collection.encode(), pa.binary()))
        wrong_collection = pc.invert(pc.fill_null(same, False))
    good = pa.array([True] * n)
    for name in QUALITY_FIELDS:
        good = pc.and_(good, pc.fill_null(pc.greater_equal(raw.column(f"q_{name}"), min_score), False))
    return pc.if_else(
        wrong_collection,
        pa.scalar(FILTER_COLLECTION),
        pc.if_else(good, pa.scalar(None, pa.string()), pa.scalar(FILTER_QUALITY)),
    )
