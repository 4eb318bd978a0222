"""Capacity-plan formulas against hand calculations, and the command itself."""

import pytest

from musar.cli import main
from musar.plan import (
    ACT_TENSORS_PER_TOKEN_LAYER,
    ParamCounts,
    activation_gb,
    count_parameters,
    sample_tokens,
    training_memory_gb,
)
from musar_core import MusarConfig
from musar_core.config import DOUBLE_BLOCK_LORA_TARGETS, SINGLE_BLOCK_LORA_TARGETS


def test_flux_dev_parameters_counted_exactly():
    counts = count_parameters(MusarConfig())
    assert counts.frozen == 11_901_408_320
    d, mlp, r_s, r_n = 3072, 4 * 3072, 128, 4
    # (in, out) of every targeted linear: double blocks then single blocks
    double = [(d, d)] * 8 + [(d, mlp), (mlp, d), (d, mlp), (mlp, d)]
    single = [(d, d)] * 3 + [(d, mlp), (d + mlp, d)]
    assert len(double) == len(DOUBLE_BLOCK_LORA_TARGETS) and len(single) == len(SINGLE_BLOCK_LORA_TARGETS)
    per_rank = 19 * sum(i + o for i, o in double) + 38 * sum(i + o for i, o in single)
    assert counts.lora == per_rank * (r_s + r_n)


def test_memory_formulas_by_hand():
    p = ParamCounts(frozen=10_000_000_000, lora=500_000_000)
    z2 = training_memory_gb(p, workers=8, zero_stage=2)
    assert z2["frozen weights"] == pytest.approx(20.0)  # 2 bytes x 10B, full copy per GPU
    assert z2["LoRA weights"] == pytest.approx(1.0)
    assert z2["optimizer states"] == pytest.approx(12 * 0.5 / 8)  # fp32 master + m + v, partitioned
    assert z2["gradients"] == pytest.approx(4 * 0.5 / 8)
    z3 = training_memory_gb(p, workers=8, zero_stage=3)
    assert z3["frozen weights"] == pytest.approx(20.0 / 8) and z3["LoRA weights"] == pytest.approx(1.0 / 8)
    # activations: tensors x hidden x 2 bytes x tokens x layers
    assert activation_gb(1000, 100, 10, 1, False) == pytest.approx(ACT_TENSORS_PER_TOKEN_LAYER * 100 * 2 * 1000 * 10 / 1e9)
    assert activation_gb(1000, 100, 10, 1, True) == pytest.approx((10 * 100 * 2 * 1000 + ACT_TENSORS_PER_TOKEN_LAYER * 100 * 2 * 1000) / 1e9)


def test_tokens_per_sample():
    assert sample_tokens(512, 1, 512) == {"prompt": 512, "target": 1024, "conditions": 1088, "total": 2624}
    assert sample_tokens(512, 2, 512)["target"] == 2048  # a diptych is two panels wide


def test_plan_command_prints_every_section(capsys):
    assert main(["plan", "--config", "configs/a100_flux_dev.yaml", "--gpus", "16"]) == 0
    out = capsys.readouterr().out
    for heading in ("## Parameters", "## Memory per GPU", "## Compute", "## Serving", "## Storage"):
        assert heading in out
    assert "16 GPUs" in out and "11.90B" in out
