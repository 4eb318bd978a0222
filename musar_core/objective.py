"""The training objective: rectified flow on target tokens only (FLUX / OminiControl).

x_t = (1 - t) x0 + t eps, target velocity v = eps - x0, t ~ sigmoid(N(0, 1)) (optionally shifted toward
high noise by SD3's t -> s t / (1 + (s - 1) t)), loss = MSE between
the prediction and v over the target tokens (the forward returns nothing else). Conditions enter
clean, at t = 0 (the forward modulates them so); the guidance input is 1 as in OminiControl's
training of guidance-distilled FLUX.1-dev, and there is no classifier-free dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .conditions import ConditionTokens
from .transformer import MusarTransformer


@dataclass
class EncodedBatch:
    """One homogeneous micro-batch, already encoded (same layout for every sample)."""

    target_latents: torch.Tensor  # (B, n, C) packed, shifted and scaled clean latents
    img_ids: torch.Tensor  # (n, 3)
    prompt_embeds: torch.Tensor  # (B, m, D)
    pooled: torch.Tensor  # (B, Dp)
    txt_ids: torch.Tensor  # (m, 3)
    conditions: ConditionTokens | None = None
    phrase_spans: torch.Tensor | None = None  # (B, c, 2)
    prompt_mask: torch.Tensor | None = None  # (B, m): real prompt tokens, when padded (pre-encoded data)
    routes: torch.Tensor | None = None  # (B, n): fixed routes (a diptych's panels), else dynamic routing

    @property
    def size(self) -> int:
        return self.target_latents.shape[0]


def sample_timesteps(
    batch: int, generator: torch.Generator | None = None, device=None, shift: float = 1.0
) -> torch.Tensor:
    """t ~ sigmoid(N(0, 1)): logit-normal, denser around t = 0.5; ``shift`` s > 1 maps each draw to
    s t / (1 + (s - 1) t) (SD3's resolution shift), training more where layout and shape are decided."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    return (shift * t / (1 + (shift - 1) * t)).to(device)


def flow_matching_loss(
    model: MusarTransformer | torch.nn.Module,
    batch: EncodedBatch,
    *,
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
    timestep_shift: float = 1.0,
) -> torch.Tensor:
    x0 = batch.target_latents
    t = sample_timesteps(batch.size, generator, x0.device, timestep_shift).to(x0.dtype)
    eps = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    target = eps - x0
    pred = model(
        hidden_states=xt,
        encoder_hidden_states=batch.prompt_embeds,
        pooled_projections=batch.pooled,
        timestep=t,
        img_ids=batch.img_ids,
        txt_ids=batch.txt_ids,
        guidance=torch.full((batch.size,), float(guidance), device=x0.device, dtype=x0.dtype),
        conditions=batch.conditions,
        phrase_spans=batch.phrase_spans,
        prompt_mask=batch.prompt_mask,
        **({} if batch.routes is None else {"routes": batch.routes}),
    ).sample
    return F.mse_loss(pred.float(), target.float())
