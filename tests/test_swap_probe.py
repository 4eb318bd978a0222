"""The swap probe (toystudy.swap_probe) and its wiring into the study's evaluation (issue 9)."""

from types import SimpleNamespace

import numpy as np
import pytest

from toystudy.detector import Detection, detect
from toystudy.measure import judge
from toystudy.study import StudyConfig, evaluate, evaluation_cases
from toystudy.swap_probe import aggregate_swaps, judge_swap, twin_and_decoy
from toystudy.world import Placement, Subject, render_scene

T, C = Subject("triangle", "red", "striped"), Subject("circle", "blue", "dotted")


def det(subject: Subject) -> Detection:
    return Detection(subject.shape, subject.colour, subject.pattern, (0, 0, 10, 10), 100, 0.9)


def test_twin_and_decoy_take_unused_attributes_and_rotate_roles():
    seen_twin, seen_decoy = set(), set()
    for index in range(12):
        twin, decoy = twin_and_decoy((T, C), index)
        assert twin.shape == decoy.shape == C.shape
        assert {twin.colour, decoy.colour}.isdisjoint({T.colour, C.colour}) and twin.colour != decoy.colour
        assert {twin.pattern, decoy.pattern}.isdisjoint({T.pattern, C.pattern}) and twin.pattern != decoy.pattern
        seen_twin.add((twin.colour, twin.pattern))
        seen_decoy.add((decoy.colour, decoy.pattern))
    assert seen_twin == seen_decoy  # every unused pair serves as twin and as decoy
    assert twin_and_decoy((T, C), 3) == twin_and_decoy((T, C), 3)
    with pytest.raises(ValueError, match="2-subject"):
        twin_and_decoy((T, C, Subject("square", "green", "solid")), 0)


def test_judge_swap_counts_what_the_swapped_reference_caused():
    twin, decoy = twin_and_decoy((T, C), 0)
    before = judge([T, C], [det(T), det(C)])

    def after(first: Subject, second: Subject):
        return judge([T, twin], [det(first), det(second)])

    # Nothing moved in the first subject, the twin drawn: a clean swap.
    clean = judge_swap(before, after(T, twin), twin, decoy)
    assert (clean.follows, clean.drifts, clean.twin_present) == (False, False, True)
    # The first subject took the twin's colour: followed the swapped reference; the twin kept C's look.
    leak = judge_swap(before, after(Subject("triangle", twin.colour, "striped"), C), twin, decoy)
    assert (leak.follows, leak.drifts, leak.twin_present) == (True, False, False)
    # It took the decoy's pattern instead, which no reference had: drift, the null.
    drift = judge_swap(before, after(Subject("triangle", "red", decoy.pattern), twin), twin, decoy)
    assert (drift.follows, drift.drifts) == (False, True)
    # Already carrying the twin's colour before the swap: not caused by it.
    was = judge([T, C], [det(Subject("triangle", twin.colour, "striped")), det(C)])
    assert not judge_swap(was, after(Subject("triangle", twin.colour, "striped"), twin), twin, decoy).follows
    rates = aggregate_swaps([clean, leak, drift, clean])
    assert rates == {"swap_follows": 0.25, "swap_drifts": 0.25, "twin_present": 0.75}
    with pytest.raises(ValueError, match="same first subject"):
        judge_swap(before, judge([T, C], [det(T), det(C)]), twin, decoy)
    with pytest.raises(ValueError, match="no swap outcomes"):
        aggregate_swaps([])


class ScenePipe:
    """A stand-in for MUSARPipeline that draws each reference's subject (read back from the reference
    image by the detector) at the left and right; ``leaky`` gives the first subject the last one's colour."""

    def __init__(self, leaky: bool):
        self.leaky, self.calls = leaky, []

    def __call__(self, prompts, refs, *, generator, return_routing=False, **_):
        self.calls.append(([p for p in prompts], [g.initial_seed() for g in generator], refs))
        images = []
        for subjects in refs:
            drawn = [detect(s.image)[0].subject for s in subjects]
            if self.leaky and len(drawn) > 1:
                drawn[0] = Subject(drawn[0].shape, drawn[-1].colour, drawn[0].pattern)
            places = [Placement(0.25 + 0.5 * k / max(1, len(drawn) - 1), 0.5, 0.3) for k in range(len(drawn))]
            images.append(render_scene(drawn, places, "white", 64, np.random.default_rng(0)))
        return SimpleNamespace(images=images, routing=None)


@pytest.mark.parametrize("leaky", [False, True])
def test_evaluate_swaps_the_last_reference_under_the_same_noise(leaky):
    cfg = StudyConfig(eval_cases=3, eval_seeds=2, held_out=12)
    cases = [c for c in evaluation_cases(cfg) if len(c.subjects) <= 2]
    pipe = ScenePipe(leaky)
    table, _ = evaluate(pipe, cases, cfg)
    # the 1-subject call per seed; then per seed the 2-subject call and its swapped twin, with the same
    # prompts and seeds; none for 3 subjects (no such case)
    assert len(pipe.calls) == 3 * cfg.eval_seeds
    for (prompts, seeds, refs), (twin_prompts, twin_seeds, twin_refs) in zip(pipe.calls[2::2], pipe.calls[3::2]):
        assert twin_prompts == prompts and twin_seeds == seeds
        assert [r[0].image.tobytes() for r in twin_refs] == [r[0].image.tobytes() for r in refs]
        assert all(a[1].image.tobytes() != b[1].image.tobytes() for a, b in zip(refs, twin_refs))
    assert table[1]["fidelity"] == 1.0 and "swap_follows" not in table[1]
    assert table[2]["twin_present"] == 1.0 and table[2]["swap_drifts"] == 0.0
    assert table[2]["swap_follows"] == (1.0 if leaky else 0.0)
    assert table[2]["entanglement"] == (0.5 if leaky else 0.0)  # the first of two subjects entangled
    assert table[2]["fidelity_by_position"] == ([0.0, 1.0] if leaky else [1.0, 1.0])
    off, _ = evaluate(ScenePipe(leaky), cases, StudyConfig(eval_cases=3, eval_seeds=2, held_out=12, swap_probe=False))
    assert "swap_follows" not in off[2]
