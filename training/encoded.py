"""Pre-encoded shard rows (``encoded/<dataset>/``, :mod:`pipelines.encode`) -> micro-batches.

With pre-encoded data a worker loads no VAE, T5 or CLIP at all: each row is one safetensors blob of
packed latents, real-length T5 states, CLIP pooled vectors and the phrase token spans. Prompts of a
micro-batch are padded to the longest one with zeros and a key mask (``EncodedBatch.prompt_mask``),
so padding is never attended. This differs from image-based training, which (like FluxPipeline at
inference) feeds the target prompt padded to ``max_prompt_tokens`` without a mask; see
``pipelines/encode.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from musar_core.conditions import ConditionTokens, condition_image_ids, image_ids, text_ids
from musar_core.config import ROPE_SCHEME_PLANE_OFFSET
from musar_core.objective import EncodedBatch
from pipelines.encode import load_tensors


def pixels_per_token(model_dir: str | Path) -> int:
    """Image pixels per packed token side of a FLUX folder, from its VAE config alone (no weights):
    2 x 2^(VAE blocks - 1)."""
    config = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    return 2 * 2 ** (len(config["block_out_channels"]) - 1)


def _pad(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, longest, D) zero-padded states and their (B, longest) validity; None when none is padded."""
    longest = max(s.shape[0] for s in states)
    out = states[0].new_zeros(len(states), longest, states[0].shape[1])
    valid = torch.zeros(len(states), longest, dtype=torch.bool)
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s
        valid[i, : s.shape[0]] = True
    return out, None if bool(valid.all()) else valid


def encoded_batch(
    batch: dict[str, np.ndarray],
    *,
    target_size: int,
    condition_size: int,
    compaction: int = 1,
    rope_scheme: str = ROPE_SCHEME_PLANE_OFFSET,
    max_prompt_tokens: int,
    max_condition_prompt_tokens: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    pixels_per_token: int = 16,
) -> EncodedBatch:
    """A Ray Data numpy batch of encoded rows -> one homogeneous micro-batch on ``device``.

    ``target_size``/``condition_size``/``compaction`` are what the job trains at; the stored latents
    must have exactly those grids (they cannot be resized), else the error says what to re-encode.
    ``pixels_per_token``: 2 x the VAE's downsampling (16 for FLUX; :func:`pixels_per_token`).
    """
    rows = [load_tensors(bytes(blob)) for blob in batch["tensors"]]
    c = sum(1 for name in rows[0] if name.startswith("condition_latents_"))
    if any(sum(1 for n in r if n.startswith("condition_latents_")) != c for r in rows):
        raise ValueError("a micro-batch must be homogeneous: every sample needs the same number of conditions")
    side = target_size // pixels_per_token
    want_grid = (side, side * c if c > 1 else side)
    for i, r in enumerate(rows):
        grid = tuple(int(v) for v in r["target_grid"])
        if grid != want_grid:
            raise ValueError(
                f"encoded sample {batch['sample_id'][i]}: target latents are {grid[0]}x{grid[1]} tokens but "
                f"data.target_size={target_size} needs {want_grid[0]}x{want_grid[1]}; rebuild the encoded shards "
                "at this size or set data.source=images"
            )
    cond_side = condition_size // compaction // pixels_per_token
    conditions = ConditionTokens([], [], [], [], prompt_mask=[])
    for k in range(c):
        latents = torch.stack([r[f"condition_latents_{k}"] for r in rows])
        if latents.shape[1] != cond_side * cond_side:
            raise ValueError(
                f"encoded condition latents have {latents.shape[1]} tokens but musar.condition_size={condition_size} "
                f"with condition_compaction={compaction} needs {cond_side}x{cond_side}; re-encode with "
                f"encoder.condition_size={condition_size // compaction} or set data.source=images"
            )
        embeds, mask = _pad([r[f"condition_t5_{k}"][:max_condition_prompt_tokens] for r in rows])
        conditions.image_latents.append(latents.to(device, dtype))
        conditions.image_ids.append(condition_image_ids(k, cond_side, cond_side, device=device, compaction=compaction,
                                                        scheme=rope_scheme))  # fmt: skip
        conditions.prompt_embeds.append(embeds.to(device, dtype))
        conditions.prompt_mask.append(None if mask is None else mask.to(device))
        conditions.pooled.append(torch.stack([r[f"condition_clip_{k}"] for r in rows]).to(device, dtype))
    prompt, prompt_mask = _pad([r["target_t5"][:max_prompt_tokens] for r in rows])
    spans = None
    if c >= 2:
        spans = torch.stack([r["phrase_spans"] for r in rows])
        beyond = (spans[..., 1] < 1) | (spans.sum(-1) > max_prompt_tokens)
        if bool(beyond.any()):
            ids = [str(batch["sample_id"][i]) for i in beyond.any(-1).nonzero().flatten().tolist()]
            raise ValueError(f"samples {ids}: a condition phrase lies beyond the first {max_prompt_tokens} prompt tokens "
                             "(data.max_prompt_tokens, or the encoder's prompt limit); shorten the prompts")  # fmt: skip
    return EncodedBatch(
        target_latents=torch.stack([r["target_latents"] for r in rows]).to(device, dtype),
        img_ids=image_ids(*want_grid, device=device),
        prompt_embeds=prompt.to(device, dtype),
        pooled=torch.stack([r["target_clip"] for r in rows]).to(device, dtype),
        txt_ids=text_ids(prompt.shape[1], device=device),
        conditions=conditions if c else None,
        phrase_spans=None if spans is None else spans.to(device),
        prompt_mask=None if prompt_mask is None else prompt_mask.to(device),
    )
