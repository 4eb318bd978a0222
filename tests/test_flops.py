"""The FLOP model reproduces the figures the performance work is judged against (FLUX.1-dev, 512 px)."""

import pytest

from musar_core.flops import Shape, relative, step_flops


def test_flux_dev_ratios():
    s = Shape()
    assert relative(s, 3, "dense") == pytest.approx(3.6, abs=0.05)
    assert relative(s, 3, "routed") == pytest.approx(3.2, abs=0.05)
    assert relative(s, 3, "cached") == pytest.approx(1.04, abs=0.01)
    assert relative(s, 3, "cached", per="generation") == pytest.approx(1.11, abs=0.01)
    assert relative(s, 5, "cached", per="generation") == pytest.approx(1.16, abs=0.01)


def test_hand_computed_plain_step():
    s = Shape(hidden=2, layers=1, prompt=1, target=2)
    # 3 tokens x 24 * 2^2 linear FLOPs + 9 pairs x 4 * 2 attention FLOPs
    assert step_flops(s, 0, "plain") == 3 * 96 + 9 * 8


def test_scaling_hidden_and_tokens_together_keeps_the_balance():
    big, small = Shape(), Shape(hidden=384, prompt=64, target=128, cond_image=128, cond_prompt=8)
    for variant in ("dense", "routed", "cached"):
        assert relative(small, 3, variant) == pytest.approx(relative(big, 3, variant), rel=1e-9)
