"""Subject fidelity and entanglement, read from generated images (never from the model).

For one case (an image and the 1-3 subjects its prompt asked for), the detector's objects are
matched one-to-one to the requested subjects:

* **Matching rule.** A subject may only take a detection of its own shape (shape first: a shape is
  what the subject *is*; colour and pattern are what can leak). Among all one-to-one assignments
  (a subject may stay unmatched) the one with the highest total score wins, scoring each pair
  ``4 * exact + same colour + same pattern``, so exact matches come first and then the most
  shared attributes. Ties go to the earlier assignment in detector order (largest object first),
  so the rule is deterministic. Cases have at most 3 subjects, so every assignment is tried.
* **present**: the matched detection has the subject's shape, colour and pattern.
* **entangled**: the matched detection (subject's shape) carries another requested subject's
  colour or pattern in place of its own: ``colour == other.colour != own.colour`` or the same for
  pattern. Attributes two subjects share cannot leak, so they never count.

* **placed** (only when the case's placements are given): present, and the detection's centre lies
  in the third of the frame (row and column) that the prompt's location words name. Not part of
  fidelity (the issue's measure); it tells a model that follows the prompt's layout from one that
  pastes its reference wherever the reference had it.

* **leak / misbound** (:func:`entanglement_kind`): an entangled subject whose source partner (the
  one whose colour or pattern it carries) is drawn too, by its own shape, is a *leak*: two subjects,
  features mixed, the paper's entanglement. When no source partner is drawn, it is *misbound*: the
  partner's appearance on this subject's shape, the partner's own shape absent (the partner drawn
  with the wrong shape, or the two merged into one object). Both count as entanglement.

Unmatched detections (extra or duplicated objects) count for neither. :func:`aggregate` averages
``present`` (fidelity) and ``entangled`` (entanglement) over every requested subject, separately
for 1-, 2- and 3-subject cases; entanglement is 0 by definition for single subjects; ``placed`` is
averaged the same way when every outcome has it; ``entanglement_chance`` is entanglement's null
(:func:`chance_entanglement`: the same outcomes judged against unrelated partners). Entanglement is
also split into leaks and misbound subjects, beside the share of cases with every requested shape drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

from .detector import Detection, detect
from .world import Placement, Subject

MAX_CANDIDATES = 6  # detections of one shape considered per subject (largest first)


@dataclass(frozen=True)
class Outcome:
    subject: Subject
    detection: Detection | None  # the matched detection, None when no object of its shape was matched
    present: bool
    entangled: bool
    placed: bool | None = None  # present at the requested location; None when no placement was given


def _pair_score(subject: Subject, det: Detection) -> int:
    colour, pattern = det.colour == subject.colour, det.pattern == subject.pattern
    return 4 * (colour and pattern) + colour + pattern


def match(subjects: Sequence[Subject], detections: Sequence[Detection]) -> list[Detection | None]:
    """One detection (or None) per subject: the best-scoring one-to-one assignment within shapes."""
    options = []
    for s in subjects:
        same = [i for i, d in enumerate(detections) if d.shape == s.shape][:MAX_CANDIDATES]
        options.append([*same, None])
    best, best_score = [None] * len(subjects), -1
    for choice in product(*options):
        taken = [i for i in choice if i is not None]
        if len(taken) != len(set(taken)):
            continue
        score = sum(_pair_score(s, detections[i]) for s, i in zip(subjects, choice) if i is not None)
        if score > best_score:
            best, best_score = list(choice), score
    return [None if i is None else detections[i] for i in best]


def judge(subjects: Sequence[Subject], detections: Sequence[Detection]) -> list[Outcome]:
    """``present`` / ``entangled`` per requested subject, given the image's detections."""
    if len(set(subjects)) != len(subjects):
        raise ValueError(f"requested subjects must be distinct: {subjects}")
    outcomes = []
    for s, det in zip(subjects, match(subjects, detections)):
        present = det is not None and (det.colour, det.pattern) == (s.colour, s.pattern)
        outcomes.append(Outcome(s, det, present, entangled_with(s, det, [o for o in subjects if o != s])))
    return outcomes


def entangled_with(subject: Subject, det: Detection | None, others: Iterable[Subject]) -> bool:
    """``det`` (matched to ``subject``) carries one of ``others``' colours or patterns in place of its own."""
    if det is None:
        return False
    return any((det.colour == o.colour != subject.colour) or (det.pattern == o.pattern != subject.pattern)
               for o in others)  # fmt: skip


def entanglement_kind(case: Sequence[Outcome], k: int) -> str | None:
    """Why ``case[k]`` is entangled: "leak" when a partner whose colour or pattern it carries is drawn
    too (matched to a detection of its own shape), "misbound" when none of them is; None when it is not
    entangled. A misbound object may be the partner itself, drawn from its reference but with the wrong
    shape (README): the measure cannot tell which subject an object was meant to be."""
    o = case[k]
    if not o.entangled:
        return None
    sources = [p for j, p in enumerate(case) if j != k and entangled_with(o.subject, o.detection, [p.subject])]
    return "leak" if any(p.detection is not None for p in sources) else "misbound"


def chance_entanglement(cases: Sequence[Sequence[Outcome]]) -> float | None:
    """Entanglement's null: each subject judged against the subjects of *other* cases of the same size.

    With 6 colours and 4 patterns, a wrong attribute often lands on a requested partner's by chance, so
    a model that draws more subjects with their own shape (and some wrong attributes) scores more
    entanglement without any leak. Here every subject's outcome is scored against every other case's
    subjects (the same held-out pool; a case with the same subject set, i.e. the same case under another
    evaluation seed, is skipped), ``n - 1`` of them as partners: the entanglement its errors would show
    if its partners had nothing to do with it. Entanglement above this is what the partners caused."""
    hits = total = 0
    for case in cases:
        mine = {o.subject for o in case}
        decoys = [c for c in cases if {o.subject for o in c} != mine]
        for o in case:
            for other in decoys:
                hits += entangled_with(o.subject, o.detection, [x.subject for x in other if x.subject != o.subject][: len(case) - 1])
            total += len(decoys)
    return hits / total if total else None  # one case (or one subject set): no unrelated partners


def location_of(bbox: tuple[int, int, int, int], size: tuple[int, int]) -> str:
    """The location words (``Placement.location``) of a box's centre in a frame of ``size`` (w, h)."""
    (x0, y0, x1, y1), (w, h) = bbox, size
    return Placement((x0 + x1) / 2 / w, (y0 + y1) / 2 / h, 0.0).location


def measure(image, subjects: Sequence[Subject], placements: Sequence[Placement] | None = None) -> list[Outcome]:
    """Detect the objects in ``image`` and judge each requested subject (see the module docstring);
    with ``placements`` (the prompt's), also whether each present subject sits where it was asked."""
    outcomes = judge(subjects, detect(image))
    if placements is None:
        return outcomes
    if len(placements) != len(subjects):
        raise ValueError(f"{len(subjects)} subjects but {len(placements)} placements")
    return [
        Outcome(o.subject, o.detection, o.present, o.entangled,
                o.present and location_of(o.detection.bbox, image.size) == p.location)
        for o, p in zip(outcomes, placements)
    ]  # fmt: skip


def aggregate(cases: Iterable[Sequence[Outcome]]) -> dict[int, dict[str, float]]:
    """Per number of subjects: fidelity (mean present), entanglement (mean entangled) over subjects,
    its null (:func:`chance_entanglement`; None with a single subject set, 0 for single subjects), all_present
    (share of cases with every subject present), and the case and subject counts; with several subjects
    also fidelity by the subject's position in its case (its reference's index), entanglement split into
    ``entanglement_leak`` and ``entanglement_misbound`` (:func:`entanglement_kind`; they sum to it), and
    ``shapes_drawn`` (share of cases with every requested subject's shape matched, whatever its look)."""
    groups: dict[int, list[Sequence[Outcome]]] = {}
    for case in cases:
        if not case:
            raise ValueError("a case needs at least one requested subject")
        groups.setdefault(len(case), []).append(case)
    table = {}
    for n in sorted(groups):
        flat = [o for case in groups[n] for o in case]
        table[n] = {
            "fidelity": sum(o.present for o in flat) / len(flat),
            "entanglement": sum(o.entangled for o in flat) / len(flat),
            "all_present": sum(all(o.present for o in case) for case in groups[n]) / len(groups[n]),
            "entanglement_chance": chance_entanglement(groups[n]) if n > 1 else 0.0,
            "cases": len(groups[n]),
            "subjects": len(flat),
        }
        if n > 1:  # the k-th requested subject (the k-th reference): is customisation even across them?
            table[n]["fidelity_by_position"] = [sum(case[k].present for case in groups[n]) / len(groups[n])
                                                for k in range(n)]  # fmt: skip
            kinds = [entanglement_kind(case, k) for case in groups[n] for k in range(n)]
            table[n]["entanglement_leak"] = kinds.count("leak") / len(flat)
            table[n]["entanglement_misbound"] = kinds.count("misbound") / len(flat)  # leak + misbound = entanglement
            table[n]["shapes_drawn"] = sum(all(o.detection is not None for o in case) for case in groups[n]) / len(groups[n])
        if all(o.placed is not None for o in flat):
            table[n]["placed"] = sum(o.placed for o in flat) / len(flat)
    return table


def routing_hits(routes: Iterable, placements: Sequence[Placement], grid: tuple[int, int]) -> tuple[int, int]:
    """Dynamic routing judged against the prompt's layout, for one generated image.

    ``routes``: that image's (rows x cols,) route tensors (one per denoising step and routed block).
    A target token counts when its centre lies inside exactly one requested subject's box (the
    placement's centre and size); it is a hit when routed to that subject's reference. Returns
    (hits, counted tokens) summed over the route tensors; chance is 1 / (number of subjects)."""
    rows, cols = grid
    ys, xs = np.meshgrid((np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols, indexing="ij")
    inside = np.stack([(np.abs(xs - p.x) < p.size / 2) & (np.abs(ys - p.y) < p.size / 2) for p in placements])
    owner = np.where(inside.sum(0) == 1, inside.argmax(0), -1).reshape(-1)
    counted = owner >= 0
    hits = total = 0
    for r in routes:
        r = np.asarray(r).reshape(-1)
        hits += int((r[counted] == owner[counted]).sum())
        total += int(counted.sum())
    return hits, total


def drawn_routing(routes: Iterable, outcomes: Sequence[Outcome], grid: tuple[int, int],
                  size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Dynamic routing judged against what was drawn (not the prompt's layout), for one generated image.

    A target token counts for a subject when its centre lies inside exactly one matched detection's box.
    ``"drawn"``: (tokens routed to the subject's own reference, counted tokens) over every matched
    subject; ``"misbound"``: (tokens routed to a source partner's reference, counted tokens) over the
    misbound subjects (:func:`entanglement_kind`): whether the partner's reference painted them."""
    rows, cols = grid
    (w, h) = size
    ys, xs = np.meshgrid((np.arange(rows) + 0.5) / rows * h, (np.arange(cols) + 0.5) / cols * w, indexing="ij")
    boxes = [o.detection.bbox if o.detection is not None else None for o in outcomes]
    inside = np.stack([np.zeros_like(xs, bool) if b is None else (xs >= b[0]) & (xs < b[2]) & (ys >= b[1]) & (ys < b[3])
                       for b in boxes])  # fmt: skip
    owner = np.where(inside.sum(0) == 1, inside.argmax(0), -1).reshape(-1)
    sources = [[j for j, p in enumerate(outcomes) if j != k and entangled_with(o.subject, o.detection, [p.subject])]
               if entanglement_kind(outcomes, k) == "misbound" else [] for k, o in enumerate(outcomes)]  # fmt: skip
    counts = {"drawn": [0, 0], "misbound": [0, 0]}
    for r in routes:
        r = np.asarray(r).reshape(-1)
        for k in range(len(outcomes)):
            mine = r[owner == k]
            if boxes[k] is not None:
                counts["drawn"][0] += int((mine == k).sum())
                counts["drawn"][1] += mine.size
            if sources[k]:
                counts["misbound"][0] += int(np.isin(mine, sources[k]).sum())
                counts["misbound"][1] += mine.size
    return {k: (hits, total) for k, (hits, total) in counts.items()}
