"""``MusarTransformer``: MUSAR's forward over a stock diffusers ``FluxTransformer2DModel``.

Not a fork: the wrapped model is a stock instance whose weights load unchanged from FLUX.1-dev,
and ``musar.transformer(...)`` still runs stock FLUX. MUSAR adds condition tokens, routing and the
token-routed LoRA by driving the same modules with :mod:`musar_core.blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import BlockContext, double_block_forward, single_block_forward
from .conditions import ConditionTokens, text_ids
from .config import MusarConfig
from .layout import PROMPT, TARGET, TokenLayout, cond_group
from .lora import inject_adapters, lora_parameters, row_plan
from .routing import AttentionRouter, ConditionCache, RoutingRecord, RoutingRules, dispatch_attend


@dataclass
class MusarOutput:
    sample: torch.Tensor  # (B, n, C): velocity prediction for the target tokens only
    routing: RoutingRecord | None = None
    # With output_hidden_states: the last block's joint sequence (B, L, D) and its layout.
    hidden_states: torch.Tensor | None = None
    layout: TokenLayout | None = None


class MusarTransformer(nn.Module):
    """A stock FLUX transformer plus MUSAR's conditions, routing and dual-branch LoRA."""

    def __init__(self, transformer: nn.Module, config: MusarConfig | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = config or MusarConfig()
        self.gradient_checkpointing = False
        blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
        if self.config.routes_from_layer is not None and self.config.routes_from_layer >= blocks:
            raise ValueError(f"MusarConfig.routes_from_layer={self.config.routes_from_layer} names no block: this "
                             f"transformer has {blocks} (double blocks first)")  # fmt: skip

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        subfolder: str | None = "transformer",
        config: MusarConfig | None = None,
        lora: str | Path | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "MusarTransformer":
        """Load stock FLUX weights (a diffusers folder, sharded or not) and optionally a MUSAR LoRA."""
        from diffusers import FluxTransformer2DModel

        path = Path(path)
        if subfolder and not (path / subfolder).is_dir() and (path / "config.json").is_file():
            subfolder = None  # a bare transformer folder
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype, **kwargs)
        model = cls(transformer, config)
        if lora is not None:
            model.load_lora(lora)
        return model

    @property
    def has_lora(self) -> bool:
        return any(True for _ in lora_parameters(self.transformer))

    def add_lora(self) -> "MusarTransformer":
        """Inject fresh adapters (zero delta) on the configured target modules; base weights untouched."""
        if self.has_lora:
            raise ValueError("this transformer already has LoRA adapters")
        inject_adapters(self.transformer, self.config)
        return self

    def lora_parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self.transformer)

    def save_lora(self, path: str | Path, **metadata) -> Path:
        from .checkpoint import save_lora

        return save_lora(self, path, **metadata)

    def load_lora(self, path: str | Path) -> dict:
        from .checkpoint import load_lora

        return load_lora(self, path)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    @property
    def rules(self) -> RoutingRules:
        c = self.config
        return RoutingRules(c.static_routing, c.dynamic_routing, c.isolate_conditions)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        conditions: ConditionTokens | None = None,
        phrase_spans: torch.Tensor | None = None,
        return_routing: bool = False,
        output_hidden_states: bool = False,
        condition_cache: ConditionCache | None = None,
        prompt_mask: torch.Tensor | None = None,
        routes: torch.Tensor | None = None,
    ) -> MusarOutput:
        """Velocity for the target tokens, shapes as in stock FLUX (timestep and guidance in [0, 1] units).

        ``conditions`` holds c encoded conditions; ``phrase_spans`` (B, c, 2) gives each condition's
        (start, length) in the prompt tokens and is required for dynamic routing when c >= 2.
        ``condition_cache`` (from :meth:`build_condition_cache`) replaces ``conditions`` for models
        trained with ``isolate_conditions``: condition tokens then leave the per-step work entirely.
        ``prompt_mask`` (B, m) bool marks real target-prompt tokens when prompts of one batch were
        padded to a common length (pre-encoded training data); padding is never attended. FLUX
        itself encodes prompts padded and unmasked, which is what inference does (no mask).
        ``routes`` (B, n) gives each target token's condition instead of dynamic routing's eqs. 2-4
        (:class:`AttentionRouter`'s ``fixed_routes``; the training job's ``diptych_routes=panels``).
        """
        t = self.transformer
        batch, n, channels = self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, img_ids, txt_ids)
        if condition_cache is not None:
            if conditions is not None:
                raise ValueError("pass conditions or condition_cache, not both")
            if condition_cache.batch_size != batch:
                raise ValueError(f"condition_cache was built for batch {condition_cache.batch_size}, got batch {batch}")
            if prompt_mask is not None:
                raise ValueError("prompt_mask is a training input (padded pre-encoded prompts); a condition-cached "
                                 "step takes the prompt as FLUX encodes it, unmasked")  # fmt: skip
        if prompt_mask is not None and prompt_mask.shape != encoder_hidden_states.shape[:2]:
            raise ValueError(f"prompt_mask must be {tuple(encoder_hidden_states.shape[:2])}, got {tuple(prompt_mask.shape)}")
        conditions = conditions or ConditionTokens([], [], [], [])
        conditions.validate(batch, channels, t.config.joint_attention_dim, t.config.pooled_projection_dim)
        if guidance is None and t.config.guidance_embeds:
            raise ValueError("this FLUX transformer is guidance-distilled (guidance_embeds=True): pass guidance")
        layout = TokenLayout(
            prompt_len=encoder_hidden_states.shape[1],
            target_len=n,
            cond_text_lens=[e.shape[1] for e in conditions.prompt_embeds],
            cond_image_lens=[x.shape[1] for x in conditions.image_latents],
            phrase_spans=None if condition_cache is not None else phrase_spans,
        )

        image = t.x_embedder(torch.cat([hidden_states, *conditions.image_latents], dim=1))
        text = t.context_embedder(torch.cat([encoder_hidden_states, *conditions.prompt_embeds], dim=1))
        temb = self._embed(timestep.to(image.dtype) * 1000, guidance, pooled_projections, image.dtype)
        group_temb = {PROMPT: temb, TARGET: temb, **self._condition_embeddings(conditions, guidance, batch, image)}
        rope = self._rope(layout, txt_ids, img_ids, conditions)
        router_kwargs = dict(record=return_routing, fixed_routes=routes)
        if condition_cache is not None:
            router_kwargs.update(cache=condition_cache, cached_spans=phrase_spans)
        router = self._router(layout, conditions, batch, image.device, prompt_mask=prompt_mask, **router_kwargs)
        x = self._blocks(layout, text, image, group_temb, rope, router)
        target = t.norm_out(layout.target_rows(x), temb)
        return MusarOutput(
            sample=t.proj_out(target),
            routing=router.record,
            hidden_states=x if output_hidden_states else None,
            layout=layout if output_hidden_states else None,
        )

    @torch.no_grad()
    def build_condition_cache(self, conditions: ConditionTokens, guidance: torch.Tensor | None) -> ConditionCache:
        """The condition-only pass: every block's condition K/V, once per generation.

        Only valid with ``isolate_conditions`` (conditions then depend on nothing but themselves,
        so their K/V are the same at every denoising step).
        """
        if not self.config.isolate_conditions:
            raise ValueError("a condition cache needs isolate_conditions=True: otherwise conditions see the target "
                             "and change at every step")  # fmt: skip
        t = self.transformer
        batch = conditions.image_latents[0].shape[0] if len(conditions) else 0
        if batch == 0:
            raise ValueError("a condition cache needs at least one condition")
        conditions.validate(batch, t.config.in_channels, t.config.joint_attention_dim, t.config.pooled_projection_dim)
        layout = TokenLayout(0, 0, [e.shape[1] for e in conditions.prompt_embeds],
                             [x.shape[1] for x in conditions.image_latents])  # fmt: skip
        image = t.x_embedder(torch.cat(conditions.image_latents, dim=1))
        text = t.context_embedder(torch.cat(conditions.prompt_embeds, dim=1))
        group_temb = self._condition_embeddings(conditions, guidance, batch, image)
        ids = conditions.image_ids[0]
        rope = self._rope(layout, ids.new_zeros(0, 3), ids.new_zeros(0, 3), conditions)
        cache = ConditionCache(num_conditions=len(conditions), batch_size=batch)
        self._blocks(layout, text, image, group_temb, rope, self._router(layout, conditions, batch, image.device,
                                                                          capture=cache))  # fmt: skip
        return cache

    # ---- helpers -------------------------------------------------------------------------------
    def _condition_embeddings(self, conditions, guidance, batch, like) -> dict[int, torch.Tensor]:
        """Each condition: timestep ``conditions.timestep`` (0), the batch's guidance, its own pooled vector."""
        cond_time = torch.full((batch,), conditions.timestep * 1000, dtype=like.dtype, device=like.device)
        return {cond_group(k): self._embed(cond_time, guidance, pooled, like.dtype)
                for k, pooled in enumerate(conditions.pooled)}  # fmt: skip

    def _rope(self, layout, txt_ids, img_ids, conditions):
        txt_all = torch.cat([txt_ids, *(text_ids(e.shape[1], txt_ids.device, txt_ids.dtype) for e in conditions.prompt_embeds)])
        img_all = torch.cat([img_ids, *(i.to(img_ids) for i in conditions.image_ids)])
        return self.transformer.pos_embed(layout.to_joint(txt_all[None], img_all[None])[0])

    def _router(self, layout, conditions, batch, device, prompt_mask=None, **kwargs) -> AttentionRouter:
        return AttentionRouter(
            layout,
            self.rules,
            dynamic_layers=self.config.dynamic_routing_layers,
            routes_from_layer=self.config.routes_from_layer,
            impl=self.config.attention_impl,
            attend=dispatch_attend(self.config.attention_backend),
            key_valid=self._key_valid(layout, conditions, batch, device, prompt_mask),
            **kwargs,
        )

    def _blocks(self, layout, text, image, group_temb, rope, router) -> torch.Tensor:
        """Every double- then single-stream block; returns the last joint sequence."""
        t = self.transformer
        text_segs, image_segs, joint_segs = layout.text_segments(), layout.image_segments(), layout.joint_segments()
        ctx = BlockContext(
            layout=layout,
            router=router,
            rope=rope,
            group_temb=group_temb,
            text_segments=text_segs,
            image_segments=image_segs,
            joint_segments=joint_segs,
            text_plan=row_plan(text_segs, self.config),
            image_plan=row_plan(image_segs, self.config),
            joint_plan=row_plan(joint_segs, self.config),
        )
        for i, block in enumerate(t.transformer_blocks):
            text, image = self._run(double_block_forward, block, text, image, ctx, i)
        x = layout.to_joint(text, image)
        offset = len(t.transformer_blocks)
        for j, block in enumerate(t.single_transformer_blocks):
            x = self._run(single_block_forward, block, x, ctx, offset + j)
        return x

    def _run(self, fn, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, block, *args, use_reentrant=False)
        return fn(block, *args)

    def _embed(self, timestep, guidance, pooled, dtype) -> torch.Tensor:
        embed = self.transformer.time_text_embed
        if self.transformer.config.guidance_embeds:
            return embed(timestep, guidance.to(dtype) * 1000, pooled)
        return embed(timestep, pooled)

    @staticmethod
    def _key_valid(
        layout: TokenLayout, conditions: ConditionTokens, batch: int, device, prompt_mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """(B, L) joint-order key validity, or None when nothing is padded."""
        masks = conditions.prompt_mask or [None] * len(conditions)
        if prompt_mask is None and all(m is None for m in masks):
            return None
        text = [torch.ones(batch, layout.prompt_len, dtype=torch.bool, device=device) if prompt_mask is None
                else prompt_mask.to(device=device, dtype=torch.bool)]  # fmt: skip
        for k, mask in enumerate(masks):
            text.append(mask.to(device=device, dtype=torch.bool) if mask is not None else torch.ones(
                batch, layout.cond_text_lens[k], dtype=torch.bool, device=device))
        image = torch.ones(batch, layout.image_len, 1, dtype=torch.bool, device=device)
        return layout.to_joint(torch.cat(text, dim=1)[..., None], image)[..., 0]

    def _check_inputs(self, hidden_states, encoder_hidden_states, pooled, img_ids, txt_ids) -> tuple[int, int, int]:
        cfg = self.transformer.config
        if hidden_states.ndim != 3 or hidden_states.shape[2] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be (batch, tokens, {cfg.in_channels}) packed latents, got {tuple(hidden_states.shape)}"
            )
        batch, n, channels = hidden_states.shape
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch or (
            encoder_hidden_states.shape[2] != cfg.joint_attention_dim
        ):
            raise ValueError(
                f"encoder_hidden_states must be (batch={batch}, tokens, {cfg.joint_attention_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        if pooled.shape != (batch, cfg.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be ({batch}, {cfg.pooled_projection_dim}), got {tuple(pooled.shape)}")
        if img_ids.shape != (n, 3):
            raise ValueError(f"img_ids must be ({n}, 3) for {n} target tokens, got {tuple(img_ids.shape)}")
        if txt_ids.shape != (encoder_hidden_states.shape[1], 3):
            raise ValueError(f"txt_ids must be ({encoder_hidden_states.shape[1]}, 3), got {tuple(txt_ids.shape)}")
        return batch, n, channels
