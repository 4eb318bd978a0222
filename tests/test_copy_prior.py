"""The toy base's copy prior (``toystudy.copy_prior``, ``benchmarks/pair_prior.py``), judged on rendered pairs."""

import math
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


def test_pair_scene_with_fixed_left_words_keeps_the_panels_draws():
    subject = ALL_SUBJECTS[41]
    drawn, _ = pair_scene(subject, 64, np.random.default_rng(5))
    fixed, prompt = pair_scene(subject, 64, np.random.default_rng(5), left_words=("colour",))
    assert (np.asarray(drawn) == np.asarray(fixed)).all()
    assert prompt.removeprefix(LEFT_INTRO).startswith(f"{subject.colour} {subject.shape}".capitalize() + ".")


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
    # Another shape on the right: nothing to compare with.
    other = Subject("circle", "red", "striped")
    assert judge_pair(_pair(RED, other), RED)["copied"] is False
    with pytest.raises(ValueError, match="twice as wide"):
        judge_pair(Image.new("RGB", (64, 64)), RED)


def test_copy_prior_averages_over_pairs_and_asks_for_2_to_1_images():
    cases = pair_cases(5, seed=1)
    calls = []

    def pipe(prompts, subjects, *, height, width, generator, **kwargs):
        calls.append((len(prompts), subjects, height, width, kwargs["true_cfg_scale"]))
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


def test_pair_prior_benchmark_runs_two_bases_side_by_side(tmp_path, monkeypatch, capsys):
    import json

    from toystudy.base import ToyBaseConfig, build_toy_base

    base = build_toy_base(ToyBaseConfig(output=str(tmp_path / "base"), scenes=8, vae_steps=1, vae_batch=2, steps=1,
                                        batch=2, time_budget_min=None))  # fmt: skip
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "pair_prior.py")
    argv = [script, "--base", str(base), "--base", str(base), "--pairs", "2", "--steps", "1",
            "--json", str(tmp_path / "rates.json")]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(script, run_name="__main__")
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(f"| {base} |")]
    assert len(rows) == 2 and rows[0].split("|")[2:8] == rows[1].split("|")[2:8]  # same prompts, same seeds
    saved = json.loads((tmp_path / "rates.json").read_text())["rates"][str(base)]
    assert saved["pairs"] == 2
    assert all(0 <= saved[k] <= 1 for k in ("left", "right", "copied", "same_colour", "same_pattern"))
    assert saved["copied_given_left"] is None or not math.isnan(saved["copied_given_left"])
    monkeypatch.setattr("sys.argv", [*argv[:3], "--pairs", "0"])
    with pytest.raises(SystemExit):  # argparse refuses an empty probe
        runpy.run_path(script, run_name="__main__")
