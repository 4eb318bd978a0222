"""Shard rows -> encoded, homogeneous micro-batches on a training worker.

The data pipeline writes images as encoded bytes with their prompts; a worker decodes them, resizes
targets to the training resolution (diptych targets are two panels wide), and encodes everything
with the frozen FLUX encoders exactly as inference does (``musar_core.encoding``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from musar_core.conditions import image_ids, text_ids
from musar_core.config import ROPE_SCHEME_PLANE_OFFSET
from musar_core.encoding import FluxEncoders, encode_conditions, encode_images, encode_target_prompt, phrase_token_span
from musar_core.objective import EncodedBatch


@dataclass
class Sample:
    """One training example, whatever shard it came from."""

    target_image: Image.Image
    target_prompt: str
    cond_images: list[Image.Image]
    cond_prompts: list[str]
    cond_char_spans: list[tuple[int, int]] | None = None  # condition prompt k inside target_prompt


def _image(value) -> Image.Image:
    if isinstance(value, dict):
        value = value.get("bytes")
    with Image.open(io.BytesIO(bytes(value))) as im:
        return im.convert("RGB")


def samples_from_batch(batch: dict[str, np.ndarray]) -> list[Sample]:
    """A Ray Data numpy batch of shard rows (``pipelines.schema.SAMPLE_SCHEMA``) -> samples.

    Single and diptych rows share one schema: per-condition lists of images, prompts and the
    condition prompts' character spans inside the target prompt (null for single samples).
    """
    out = []
    for i in range(len(batch["target_prompt"])):
        images = [_image(b) for b in batch["condition_images"][i]]
        prompts = [str(p) for p in batch["condition_prompts"][i]]
        raw_spans = batch["condition_spans"][i]
        spans = None if raw_spans is None or len(images) < 2 else [(int(a), int(b)) for a, b in raw_spans]
        out.append(Sample(_image(batch["target_image"][i]), str(batch["target_prompt"][i]), images, prompts, spans))
    return out


def _pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    im = image.resize((width, height), Image.Resampling.BICUBIC) if image.size != (width, height) else image
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@torch.no_grad()
def encode_samples(
    samples: list[Sample],
    enc: FluxEncoders,
    *,
    target_size: int,
    condition_size: int,
    compaction: int = 1,
    rope_scheme: str = ROPE_SCHEME_PLANE_OFFSET,
    max_prompt_tokens: int,
    max_condition_prompt_tokens: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> EncodedBatch:
    c = len(samples[0].cond_images)
    if any(len(s.cond_images) != c for s in samples):
        raise ValueError("a micro-batch must be homogeneous: every sample needs the same number of conditions")
    width = target_size * c if c > 1 else target_size  # diptych targets hold c panels side by side
    pixels = torch.stack([_pixels(s.target_image, width, target_size) for s in samples])
    latents, (rows, cols) = encode_images(enc.vae, pixels)
    prompts = [s.target_prompt for s in samples]
    max_len = max_prompt_tokens
    prompt_embeds, pooled = encode_target_prompt(enc, prompts, max_len)
    conditions = encode_conditions(enc, [[s.cond_images[k] for s in samples] for k in range(c)],
                                   [[s.cond_prompts[k] for s in samples] for k in range(c)],
                                   condition_size=condition_size, max_prompt_tokens=max_condition_prompt_tokens,
                                   compaction=compaction, rope_scheme=rope_scheme)  # fmt: skip
    spans = None
    if c >= 2:
        spans = torch.tensor([[phrase_token_span(enc.tokenizer_2, s.target_prompt, a, b, max_len)
                               for a, b in s.cond_char_spans] for s in samples])  # fmt: skip

    def move(x):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)

    conditions.image_latents = [move(x) for x in conditions.image_latents]
    conditions.image_ids = [x.to(device) for x in conditions.image_ids]
    conditions.prompt_embeds = [move(x) for x in conditions.prompt_embeds]
    conditions.pooled = [move(x) for x in conditions.pooled]
    conditions.prompt_mask = [None if m is None else m.to(device) for m in conditions.prompt_mask]
    return EncodedBatch(
        target_latents=move(latents),
        img_ids=image_ids(rows, cols, device=device),
        prompt_embeds=move(prompt_embeds),
        pooled=move(pooled),
        txt_ids=text_ids(prompt_embeds.shape[1], device=device),
        conditions=conditions,
        phrase_spans=None if spans is None else spans.to(device),
    )


def panel_routes(batch: EncodedBatch) -> torch.Tensor | None:
    """(B, n) routes of a diptych batch by panel: a target token in panel k (of c side-by-side, equal
    panels, the data pipeline's layout) is routed to condition k. None with fewer than two conditions."""
    c = len(batch.conditions) if batch.conditions is not None else 0
    if c < 2:
        return None
    cols = batch.img_ids[:, 2].long()
    width = int(cols.max()) + 1
    if width % c:
        raise ValueError(f"a {width}-token-wide target does not split into {c} equal panels")
    return (cols // (width // c)).expand(batch.size, -1).contiguous()
