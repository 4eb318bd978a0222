"""Rectified-flow sampling with FLUX.1-dev's schedule, driving a :class:`MusarTransformer`.

The step schedule is FluxPipeline's: sigmas linspace(1, 1/steps), shifted by mu, where mu comes
from the *target's* token count only (conditions do not change the schedule). ``guidance`` is
FLUX.1-dev's embedded guidance: one pass per step, no unconditional branch. ``true_cfg_scale`` > 1
adds diffusers' true classifier-free guidance for bases trained with prompt dropout (the toy base):
a second pass per step on the negative prompt *without* subjects, so the guided direction carries
both the prompt and the references.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .conditions import ConditionTokens
from .routing import RoutingRecord
from .transformer import MusarTransformer


def flux_mu(image_seq_len: int, config) -> float:
    """Linear interpolation of the schedule shift between base and max sequence lengths (FLUX)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


@dataclass
class SampleResult:
    latents: torch.Tensor
    routing: list[RoutingRecord] = field(default_factory=list)  # one per step, when asked


@torch.no_grad()
def denoise(
    model: MusarTransformer,
    scheduler,
    latents: torch.Tensor,
    img_ids: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    txt_ids: torch.Tensor,
    *,
    num_inference_steps: int = 28,
    guidance_scale: float = 3.5,
    conditions: ConditionTokens | None = None,
    phrase_spans: torch.Tensor | None = None,
    return_routing: bool = False,
    progress: bool = True,
    use_condition_cache: bool = False,
    true_cfg_scale: float = 1.0,
    negative: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SampleResult:
    """Integrate from noise ``latents`` (B, n, C) to clean packed latents.

    ``use_condition_cache`` (models with ``isolate_conditions``): one condition-only pass computes
    every block's condition K/V, and the steps run on [prompt, target] tokens alone.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if true_cfg_scale > 1 and negative is None:
        raise ValueError("true_cfg_scale > 1 needs the negative prompt's (embeds, pooled)")
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=flux_mu(latents.shape[1], scheduler.config), device=latents.device)
    scheduler.set_begin_index(0)
    batch = latents.shape[0]
    guidance = torch.full((batch,), float(guidance_scale), device=latents.device, dtype=torch.float32)
    result = SampleResult(latents)
    cache = None
    if use_condition_cache and conditions is not None and len(conditions):
        cache = model.build_condition_cache(conditions, guidance)
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        timestep = t.expand(batch).to(latents.dtype)
        out = model(
            hidden_states=latents,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=timestep / 1000,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            conditions=None if cache is not None else conditions,
            condition_cache=cache,
            phrase_spans=phrase_spans,
            return_routing=return_routing,
        )
        velocity = out.sample
        if true_cfg_scale > 1:
            uncond = model(hidden_states=latents, encoder_hidden_states=negative[0], pooled_projections=negative[1],
                           timestep=timestep / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample  # fmt: skip
            velocity = uncond + true_cfg_scale * (velocity - uncond)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if return_routing:
            result.routing.append(out.routing)
    result.latents = latents
    return result
