"""A toy base's copy prior, read from its images: asked for a pair scene, does it draw the subject twice?

The prompt is a pair scene's (:func:`toystudy.base.pair_scene`): one subject in two panels of a 2:1
frame, the left panel described in full ("Red striped triangle. ..."), the right named by its shape
alone ("Triangle. ..."). The right panel's colour and pattern can then only come from the left
panel's pixels, which is what a reference condition later asks of the model. Over four bases the
full model's single-subject fidelity rose with the copy rate of an earlier probe of the same
design, while the bases' drawing from words ordered them differently (README, toy study).

Per pair, the detector reads each half and ``measure.match`` picks the object judged:

* ``left``: the left panel holds the subject as described (shape, colour, pattern);
* ``right``: the right panel holds it too (its colour and pattern were never named);
* ``copied``: the right panel holds what the left panel shows (the left's object of the subject's
  shape, matched in the right panel to the closest object of that shape: same colour and pattern),
  right or not; ``same_colour`` / ``same_pattern``: one attribute at a time. ``copied`` is the copy
  rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .measure import match
from .world import ALL_SUBJECTS, Subject

RATES = ("left", "right", "copied", "same_colour", "same_pattern")
FULL_LEFT = ("colour", "pattern")  # the left panel names every attribute


@dataclass(frozen=True)
class PairCase:
    subject: Subject
    prompt: str


def pair_cases(count: int, seed: int = 0) -> list[PairCase]:
    """``count`` pair prompts of subjects drawn from the whole world (seeded, deterministic). The pair
    is rendered (64 px panels) and its image dropped: rendering draws from the same generator."""
    from .base import pair_scene

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = np.random.default_rng([seed, 17])
    cases = []
    for _ in range(count):
        subject = ALL_SUBJECTS[int(rng.integers(len(ALL_SUBJECTS)))]
        _, prompt = pair_scene(subject, 64, rng, left_words=FULL_LEFT)
        cases.append(PairCase(subject, prompt))
    return cases


def judge_pair(image, subject: Subject) -> dict[str, bool]:
    """The rates of :data:`RATES` for one generated pair image (2:1, panels side by side)."""
    from .detector import detect

    w, h = image.size
    if w != 2 * h:
        raise ValueError(f"a pair image is twice as wide as high, got {w}x{h}")
    left_found, right_found = (detect(image.crop(box)) for box in ((0, 0, h, h), (h, 0, w, h)))
    left, right = match([subject], left_found)[0], match([subject], right_found)[0]
    # What the left panel shows, looked for in the right one (the closest object of that shape).
    twin = match([left.subject], right_found)[0] if left is not None else None
    own = (subject.colour, subject.pattern)
    return {
        "left": left is not None and (left.colour, left.pattern) == own,
        "right": right is not None and (right.colour, right.pattern) == own,
        "copied": twin is not None and twin.subject == left.subject,
        "same_colour": twin is not None and twin.colour == left.colour,
        "same_pattern": twin is not None and twin.pattern == left.pattern,
    }


def copy_prior(pipe, cases: list[PairCase], *, size: int = 64, steps: int = 16, true_cfg_scale: float = 3.0,
               seed: int = 0, batch: int = 8) -> dict[str, float | None]:  # fmt: skip
    """Generate every case once (``pipe``: a ``MUSARPipeline`` on the base, no subjects) and average
    :func:`judge_pair` over them; also ``copied_given_left`` (None when no left panel was right: no
    rate, and no NaN for JSON or MLflow to choke on) and ``pairs`` (the count)."""
    import torch

    if not cases:
        raise ValueError("copy_prior needs at least one pair case")
    judged = []
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        generators = [torch.Generator().manual_seed(seed * 100_003 + start + i) for i in range(len(chunk))]
        out = pipe([c.prompt for c in chunk], None, height=size, width=2 * size, num_inference_steps=steps,
                   guidance_scale=1.0, true_cfg_scale=true_cfg_scale, generator=generators, progress=False)  # fmt: skip
        judged += [judge_pair(image, c.subject) for image, c in zip(out.images, chunk)]
    rates = {k: sum(j[k] for j in judged) / len(judged) for k in RATES}
    lefts = [j for j in judged if j["left"]]
    rates["copied_given_left"] = sum(j["copied"] for j in lefts) / len(lefts) if lefts else None
    rates["pairs"] = len(judged)
    return rates
