"""Does one subject's reference reach another subject's region? A counterfactual read from images.

Entanglement (``toystudy.measure``) counts a subject drawn with another requested subject's colour or
pattern, which a wrong attribute can also do by chance (``measure.chance_entanglement``). This probe
asks the causal question instead. A 2-subject case is generated twice, with the same noise, prompt,
placements and condition prompts; the second time the last subject's reference is replaced by its
*twin*: the same shape (so the same words) in a colour and a pattern that no subject of the case has.
Only that reference differs, so whatever changes in the first subject's region was caused by it:

* **follows**: the first subject now carries the twin's colour or pattern, and did not before: the
  swapped reference leaked into it (dynamic routing, target-to-target attention, the prompt's tokens);
* **drifts**: the same for the *decoy*: another unused colour and pattern, which no reference had. It
  is what a change that lands anywhere puts on one particular pair of attributes, the null for
  *follows*; the twin's and the decoy's attributes swap roles from case to case.
* **twin present**: the swapped subject is drawn as its twin (its reference, not its words, drives it).

Rates are over the first subject of every case and seed, matched or not, as in ``measure.aggregate``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .detector import Detection
from .measure import Outcome
from .world import COLOURS, PATTERNS, Subject


def twin_and_decoy(subjects: Sequence[Subject], index: int) -> tuple[Subject, Subject]:
    """The last subject's twin and decoy: its shape, colours and patterns none of ``subjects`` has, the
    twin's and the decoy's distinct; ``index`` (the case's) rotates which unused attributes go where."""
    if len(subjects) != 2:
        raise ValueError(f"the swap probe takes 2-subject cases, got {len(subjects)} subjects")
    colours = [c for c in COLOURS if c not in {s.colour for s in subjects}]
    patterns = [p for p in PATTERNS if p not in {s.pattern for s in subjects}]
    c, p = index % len(colours), index % len(patterns)
    twin = Subject(subjects[-1].shape, colours[c], patterns[p])
    decoy = Subject(subjects[-1].shape, colours[(c + 1) % len(colours)], patterns[(p + 1) % len(patterns)])
    return twin, decoy


def _carries(det: Detection | None, attributes: Subject) -> bool:
    return det is not None and (det.colour == attributes.colour or det.pattern == attributes.pattern)


@dataclass(frozen=True)
class SwapOutcome:
    follows: bool  # the first subject newly carries the twin's colour or pattern
    drifts: bool  # ... the decoy's
    twin_present: bool  # the swapped subject drawn as its twin


def judge_swap(before: Sequence[Outcome], after: Sequence[Outcome], twin: Subject, decoy: Subject) -> SwapOutcome:
    """One case: ``before`` judged against its subjects, ``after`` (the twin's image) against them with
    the last one replaced by ``twin``."""
    if len(before) != 2 or len(after) != 2:
        raise ValueError("the swap probe judges 2-subject cases")
    if before[0].subject != after[0].subject or after[1].subject != twin:
        raise ValueError("after must judge the same first subject and the twin in place of the last")
    first_before, first_after = before[0].detection, after[0].detection
    return SwapOutcome(
        follows=_carries(first_after, twin) and not _carries(first_before, twin),
        drifts=_carries(first_after, decoy) and not _carries(first_before, decoy),
        twin_present=after[1].present,
    )


def aggregate_swaps(outcomes: Iterable[SwapOutcome]) -> dict[str, float]:
    """``swap_follows``, ``swap_drifts`` and ``twin_present``: shares over the cases (x seeds)."""
    outcomes = list(outcomes)
    if not outcomes:
        raise ValueError("no swap outcomes to aggregate")
    share = lambda key: sum(getattr(o, key) for o in outcomes) / len(outcomes)  # noqa: E731
    return {"swap_follows": share("follows"), "swap_drifts": share("drifts"), "twin_present": share("twin_present")}
