"""Dual-branch LoRA routed per token (paper 3.2.2).

Two peft adapters live on the same token-wise linears: ``subject`` (rank 128) for condition tokens
(CI^k and CT^k) and ``noise`` (rank 4) for target tokens; prompt tokens get no LoRA in any layer.
``shared_lora`` (the paper's "w/o bias mitigation" ablation) uses one adapter, ``shared``, on every
token including the prompt. peft and diffusers apply an active adapter to every token of a layer;
routing deltas per token is ours: MUSAR's forward never calls a LoRA-wrapped layer directly, it
calls :func:`routed_linear` with the rows each adapter owns.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import MusarConfig
from .layout import PROMPT, TARGET, Segment

SUBJECT, NOISE, SHARED = "subject", "noise", "shared"

RowPlan = list[tuple[str | None, int, int]]


def adapter_names(config: MusarConfig) -> tuple[str, ...]:
    return (SHARED,) if config.shared_lora else (SUBJECT, NOISE)


def adapter_for_group(group: int, config: MusarConfig) -> str | None:
    """Which adapter a token group uses: none for the prompt (unless shared), noise for the target."""
    if config.shared_lora:
        return SHARED
    if group == PROMPT:
        return None
    return NOISE if group == TARGET else SUBJECT


def row_plan(segments: list[Segment], config: MusarConfig) -> RowPlan:
    """Contiguous (adapter, start, end) runs covering a sequence, adjacent runs of one adapter merged."""
    plan: RowPlan = []
    for seg in segments:
        if seg.length == 0:
            continue
        name = adapter_for_group(seg.group, config)
        if plan and plan[-1][0] == name and plan[-1][2] == seg.start:
            plan[-1] = (name, plan[-1][1], seg.end)
        else:
            plan.append((name, seg.start, seg.end))
    return plan


def target_module_names(transformer: nn.Module, config: MusarConfig) -> list[str]:
    """Full names of the block linears that get LoRA (never embedders, modulation or the final layer)."""
    names = []
    for prefix, targets in (
        ("transformer_blocks", config.double_block_targets),
        ("single_transformer_blocks", config.single_block_targets),
    ):
        for i, _ in enumerate(getattr(transformer, prefix)):
            for rel in targets:
                name = f"{prefix}.{i}.{rel}"
                module = transformer.get_submodule(name)
                if not isinstance(module, nn.Linear) and not hasattr(module, "base_layer"):
                    raise ValueError(f"LoRA target {name} is a {type(module).__name__}, not a Linear")
                names.append(name)
    return names


def inject_adapters(transformer: nn.Module, config: MusarConfig) -> None:
    """Add MUSAR's adapters (B = 0: no change until trained) to a stock FLUX transformer, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = target_module_names(transformer, config)
    ranks = {SUBJECT: (config.subject_rank, config.subject_alpha), NOISE: (config.noise_rank, config.noise_alpha)}
    ranks[SHARED] = ranks[SUBJECT]
    for name in adapter_names(config):
        rank, alpha = ranks[name]
        lora_config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0)
        with warnings.catch_warnings():
            # peft warns that a second adapter joins the first: that is the point of dual-branch LoRA.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(lora_config, transformer, adapter_name=name)


def lora_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def routed_linear(layer: nn.Module, x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """``layer(x)`` with each adapter's delta added only on the rows (dim 1) the plan gives it.

    The deltas are added in place to the base output's rows (autograd keeps the base matmul's
    inputs, not its output): no per-run copies and no concatenation, so a wrapped linear launches
    three kernels per adapter run besides the base matmul.
    """
    base_layer = getattr(layer, "base_layer", None)
    if base_layer is None:
        return layer(x)
    out = base_layer(x)
    for name, start, end in plan:
        if name is None or name not in layer.lora_A:
            continue
        if layer.use_dora.get(name, False):
            raise NotImplementedError("DoRA adapters are not supported by MUSAR's token routing")
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        delta = lora_b(lora_a(layer.lora_dropout[name](x[:, start:end].to(lora_a.weight.dtype))))
        out[:, start:end].add_(delta.to(out.dtype), alpha=layer.scaling[name])
    return out
