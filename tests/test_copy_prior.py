"""The toy base's copy prior (``toystudy.copy_prior``, ``benchmarks/pair_prior.py``), judged on rendered pairs."""

import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipelines.samples import LEFT_INTRO, RIGHT_INTRO
from toystudy.base import pair_scene
from toystudy.copy_prior import copy_prior, judge_pair, pair_cases
from toystudy.world import ALL_SUBJECTS, Placement, Subject, render_scene


def _pair(left: Subject, right: Subject) -> Image.Image:
    """Two 64 px panels side by side, each one subject centred on white."""
    canvas = Image.new("RGB", (128, 64))
    for k, subject in enumerate((left, right)):
        canvas.paste(render_scene([subject], [Placement(0.5, 0.5, 0.5)], "white", 64, np.random.default_rng(k)),
                     (64 * k, 0))  # fmt: skip
    return canvas


RED = Subject("triangle", "red", "striped")


def test_pair_cases_describe_the_left_panel_in_full_and_name_the_right_by_shape():
    cases = pair_cases(6, seed=3)
    assert cases == pair_cases(6, seed=3) and cases != pair_cases(6, seed=4)  # deterministic, seeded
    for case in cases:
        left, right = case.prompt.removeprefix(LEFT_INTRO).split(RIGHT_INTRO)
        assert left.split(". ")[0] == case.subject.item  # "Red striped triangle"
        assert right.split(". ")[0] == case.subject.shape.capitalize()
    with pytest.raises(ValueError, match="count must be >= 1"):
        pair_cases(0)


def test_pair_scene_draws_as_before_and_can_fix_the_left_words():
    # Without left_words, the prompt and the generator's state after the call are those of the code that
    # built bases w7 and w8 (taken from it), so earlier builds reproduce.
    rng = np.random.default_rng(0)
    image, prompt = pair_scene(ALL_SUBJECTS[0], 64, rng)
    assert prompt == (f"{LEFT_INTRO}Red solid triangle. Against a speckled grey background, this item appears in "
                      f"the lower left, small in the frame{RIGHT_INTRO}Triangle. On a light blue background, this "
                      "item rests in the center, large in the frame.")  # fmt: skip
    assert int(rng.integers(10**9)) == 710929599 and int(np.asarray(image, np.int64).sum()) == 4932453
    subject = ALL_SUBJECTS[41]
    drawn, _ = pair_scene(subject, 64, np.random.default_rng(5))
    fixed, prompt = pair_scene(subject, 64, np.random.default_rng(5), left_words=("colour",))
    assert (np.asarray(drawn) == np.asarray(fixed)).all()
    assert prompt.removeprefix(LEFT_INTRO).startswith(f"{subject.colour} {subject.shape}".capitalize() + ".")
    with pytest.raises(ValueError, match="left_words names attributes"):
        pair_scene(subject, 64, np.random.default_rng(5), left_words=("color",))


def test_judge_pair_reads_a_copy_a_partial_copy_and_a_miss():
    assert judge_pair(_pair(RED, RED), RED) == dict(left=True, right=True, copied=True, same_colour=True,
                                                    same_pattern=True)  # fmt: skip
    # The right panel keeps the pattern but not the colour.
    blue = Subject("triangle", "blue", "striped")
    assert judge_pair(_pair(RED, blue), RED) == dict(left=True, right=False, copied=False, same_colour=False,
                                                     same_pattern=True)  # fmt: skip
    # A copy of a wrong left panel is still a copy, but neither panel is right.
    assert judge_pair(_pair(blue, blue), RED) == dict(left=False, right=False, copied=True, same_colour=True,
                                                      same_pattern=True)  # fmt: skip
    # The right panel holds the described subject and a copy of what the left panel drew: still a copy.
    both = _pair(blue, RED)
    both.paste(render_scene([RED, blue], [Placement(0.25, 0.5, 0.35), Placement(0.75, 0.5, 0.35)], "white", 64,
                            np.random.default_rng(2)), (64, 0))  # fmt: skip
    assert judge_pair(both, RED) == dict(left=False, right=True, copied=True, same_colour=True, same_pattern=True)
    # Another shape on the right: nothing to compare with.
    other = Subject("circle", "red", "striped")
    assert judge_pair(_pair(RED, other), RED)["copied"] is False
    with pytest.raises(ValueError, match="twice as wide"):
        judge_pair(Image.new("RGB", (64, 64)), RED)


def test_copy_prior_averages_over_pairs_and_asks_for_2_to_1_images():
    cases = pair_cases(5, seed=1)
    calls, seeds = [], []

    def pipe(prompts, subjects, *, height, width, generator, **kwargs):
        calls.append((len(prompts), subjects, height, width, kwargs["true_cfg_scale"]))
        assert len(generator) == len(prompts)
        seeds.extend(g.initial_seed() for g in generator)
        start = sum(c[0] for c in calls[:-1])
        images = []
        for i, prompt in enumerate(prompts):  # pairs 0, 2, 4 copied; 1 and 3 with another colour on the right
            subject = next(c.subject for c in cases if c.prompt == prompt)
            other = next(s for s in ALL_SUBJECTS if s.shape == subject.shape and s.colour != subject.colour
                         and s.pattern == subject.pattern)  # fmt: skip
            images.append(_pair(subject, subject if (start + i) % 2 == 0 else other))
        return SimpleNamespace(images=images)

    rates = copy_prior(pipe, cases, batch=2, true_cfg_scale=2.0)
    assert calls == [(2, None, 64, 128, 2.0), (2, None, 64, 128, 2.0), (1, None, 64, 128, 2.0)]
    assert rates["pairs"] == 5 and rates["left"] == 1.0
    assert rates["copied"] == rates["right"] == rates["same_colour"] == rates["copied_given_left"] == 3 / 5
    assert rates["same_pattern"] == 1.0
    assert len(set(seeds)) == 5  # one noise seed per pair, across batches
    with pytest.raises(ValueError, match="at least one pair"):
        copy_prior(pipe, [])

    def blank(prompts, subjects, **kwargs):  # nothing drawn: no left panel right, so no conditional rate
        return SimpleNamespace(images=[Image.new("RGB", (128, 64), "white") for _ in prompts])

    rates = copy_prior(blank, cases[:2])
    assert rates["copied_given_left"] is None and rates["left"] == rates["copied"] == 0.0


def test_pair_prior_benchmark_runs_two_bases_side_by_side(tmp_path, monkeypatch, capsys):
    import json
    import shutil

    from toystudy.base import ToyBaseConfig, build_toy_base

    base = build_toy_base(ToyBaseConfig(output=str(tmp_path / "base"), scenes=8, vae_steps=1, vae_batch=2, steps=1,
                                        batch=2, time_budget_min=None))  # fmt: skip
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "pair_prior.py")
    twin = shutil.copytree(base, tmp_path / "twin")  # the same weights in another folder
    argv = [script, "--base", str(base), "--base", str(twin), "--pairs", "2", "--steps", "1",
            "--json", str(tmp_path / "rates.json")]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(script, run_name="__main__")
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith((f"| {base} |", f"| {twin} |"))]
    assert len(rows) == 2 and rows[0].split("|")[2:8] == rows[1].split("|")[2:8]  # same prompts, same seeds
    saved = json.loads((tmp_path / "rates.json").read_text(), parse_constant=_no_nan)["rates"][str(twin)]
    assert saved["pairs"] == 2
    assert all(0 <= saved[k] <= 1 for k in ("left", "right", "copied", "same_colour", "same_pattern"))
    assert saved["copied_given_left"] is None or 0 <= saved["copied_given_left"] <= 1
    for bad in (["--pairs", "0"], ["--base", str(base)]):  # an empty probe; one base twice
        monkeypatch.setattr("sys.argv", [*argv[:3], *bad])
        with pytest.raises(SystemExit):
            runpy.run_path(script, run_name="__main__")


def _no_nan(constant):
    raise AssertionError(f"{constant} is not JSON")
