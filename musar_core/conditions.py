"""Condition tokens as the transformer consumes them, and the RoPE ids that place them.

A condition k contributes CI^k (its reference image's packed VAE latents) and CT^k (its condition
prompt's T5 tokens, real length). It is modulated with timestep 0, the batch's guidance value and
the pooled CLIP vector of its *own* prompt, so nothing of the target prompt reaches it.
RoPE ids: CI^k sits on image plane k + 1 of axis 0 with (row, col) on its own latent grid; the
target is plane 0 and text ids are zero, so no two image tokens of different planes share a
position for any number of conditions (DESIGN.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ROPE_SCHEME_LEFT_PANELS, ROPE_SCHEME_PLANE_OFFSET, ROPE_SCHEMES


def image_ids(height: int, width: int, plane: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """(height * width, 3) RoPE ids (plane, row, col) for a packed latent grid, row-major like FLUX."""
    rows = torch.arange(height, device=device, dtype=dtype)[:, None].expand(height, width)
    cols = torch.arange(width, device=device, dtype=dtype)[None, :].expand(height, width)
    planes = torch.full((height, width), float(plane), device=device, dtype=dtype)
    return torch.stack([planes, rows, cols], dim=-1).reshape(height * width, 3)


def condition_image_ids(
    k: int, height: int, width: int, device=None, dtype=torch.float32, compaction: int = 1,
    scheme: str = ROPE_SCHEME_PLANE_OFFSET,
) -> torch.Tensor:
    """RoPE ids of condition k's image tokens (``MusarConfig.rope_scheme``).

    - ``plane_offset_v1`` (default): plane k + 1, the condition's own rows and columns.
    - ``left_panels_v1``: plane 0, columns shifted left by (k + 1) condition widths, so condition k is
      the (k + 1)-th panel left of the target (columns >= 0): no condition shares a position with the
      target or another condition, whatever the target's size.

    With ``compaction`` f > 1 the grid is a reference encoded f times smaller: each token stands for
    an f x f patch of the full grid and sits at that patch's centre (row * f + (f - 1) / 2), so the
    compact reference spans the positions a full-size one would.
    """
    if scheme not in ROPE_SCHEMES:
        raise ValueError(f"unknown RoPE scheme {scheme!r}: one of {ROPE_SCHEMES}")
    ids = image_ids(height, width, plane=k + 1 if scheme == ROPE_SCHEME_PLANE_OFFSET else 0, device=device, dtype=dtype)
    if compaction != 1:
        ids[:, 1:] = ids[:, 1:] * compaction + (compaction - 1) / 2
    if scheme == ROPE_SCHEME_LEFT_PANELS:
        ids[:, 2] -= (k + 1) * width * compaction
    return ids


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(length, 3, device=device, dtype=dtype)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, H/2 * W/2, 4C) tokens: FLUX's 2x2 patch packing."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a (height, width) latent grid (unpacked size)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


@dataclass
class ConditionTokens:
    """Encoded conditions for one batch; every list has one entry per condition.

    ``prompt_mask`` marks real (True) vs padding (False) condition-prompt tokens when the batch's
    prompts differ in length; padding is never attended. ``timestep`` is 0 by design and exposed
    only so that tests can give conditions the target's modulation.
    """

    image_latents: list[torch.Tensor]
    image_ids: list[torch.Tensor]
    prompt_embeds: list[torch.Tensor]
    pooled: list[torch.Tensor]
    prompt_mask: list[torch.Tensor | None] | None = None
    timestep: float = 0.0

    def __len__(self) -> int:
        return len(self.image_latents)

    def validate(self, batch: int, channels: int, joint_dim: int, pooled_dim: int) -> None:
        c = len(self.image_latents)
        lists = {"image_ids": self.image_ids, "prompt_embeds": self.prompt_embeds, "pooled": self.pooled}
        if self.prompt_mask is not None:
            lists["prompt_mask"] = self.prompt_mask
        for name, values in lists.items():
            if len(values) != c:
                raise ValueError(f"conditions: {c} image_latents but {len(values)} {name}")
        for k in range(c):
            lat, ids, emb, pooled = self.image_latents[k], self.image_ids[k], self.prompt_embeds[k], self.pooled[k]
            if lat.ndim != 3 or lat.shape[0] != batch or lat.shape[2] != channels:
                raise ValueError(
                    f"condition {k}: image_latents must be (batch={batch}, tokens, {channels}), got {tuple(lat.shape)}"
                )
            if ids.shape != (lat.shape[1], 3):
                raise ValueError(f"condition {k}: image_ids must be ({lat.shape[1]}, 3), got {tuple(ids.shape)}")
            if emb.ndim != 3 or emb.shape[0] != batch or emb.shape[2] != joint_dim:
                raise ValueError(
                    f"condition {k}: prompt_embeds must be (batch={batch}, tokens, {joint_dim}), got {tuple(emb.shape)}"
                )
            if pooled.shape != (batch, pooled_dim):
                raise ValueError(f"condition {k}: pooled must be ({batch}, {pooled_dim}), got {tuple(pooled.shape)}")
            mask = None if self.prompt_mask is None else self.prompt_mask[k]
            if mask is not None and mask.shape != emb.shape[:2]:
                raise ValueError(f"condition {k}: prompt_mask must be {tuple(emb.shape[:2])}, got {tuple(mask.shape)}")
