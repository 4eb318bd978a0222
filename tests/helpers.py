"""Random inputs for MUSAR forwards on tiny transformers (shared by the core tests)."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from musar_core import ConditionTokens, condition_image_ids, image_ids, text_ids
from musar_core.tiny import TINY_TRANSFORMER_CONFIG


def tiny_transformer(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, **overrides}).eval()


def randomize_lora(model, seed: int = 1, scale: float = 0.05) -> None:
    """Give every LoRA matrix (B included, which peft initialises to zero) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def make_inputs(
    transformer,
    *,
    batch: int = 2,
    grid: tuple[int, int] = (4, 4),
    prompt_len: int = 8,
    conditions: list[tuple[int, tuple[int, int]]] = (),
    seed: int = 0,
    timestep: float | None = None,
    dtype=torch.float32,
) -> dict:
    """Forward kwargs; ``conditions`` lists (condition-prompt tokens, condition grid) per condition."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    n = grid[0] * grid[1]
    c = len(conditions)
    t = torch.full((batch,), timestep) if timestep is not None else torch.rand(batch, generator=g)
    cond = ConditionTokens(
        image_latents=[rnd(batch, h * w, cfg.in_channels) for _, (h, w) in conditions],
        image_ids=[condition_image_ids(k, h, w) for k, (_, (h, w)) in enumerate(conditions)],
        prompt_embeds=[rnd(batch, mt, cfg.joint_attention_dim) for mt, _ in conditions],
        pooled=[rnd(batch, cfg.pooled_projection_dim) for _ in conditions],
    )
    spans = None
    if c:
        width = max(1, prompt_len // c)
        starts = [min(k * width, prompt_len - 1) for k in range(c)]
        spans = torch.tensor([[[s, max(1, min(width, prompt_len - s))] for s in starts]] * batch)
    return dict(
        hidden_states=rnd(batch, n, cfg.in_channels),
        encoder_hidden_states=rnd(batch, prompt_len, cfg.joint_attention_dim),
        pooled_projections=rnd(batch, cfg.pooled_projection_dim),
        timestep=t.to(dtype),
        img_ids=image_ids(*grid),
        txt_ids=text_ids(prompt_len),
        guidance=torch.full((batch,), 3.5, dtype=dtype),
        conditions=cond if c else None,
        phrase_spans=spans,
    )
