"""From pixels and words to the tensors MUSAR's forward takes, exactly as FLUX.1-dev encodes them.

- Target prompt: T5 at ``max_sequence_length`` with padding, no attention mask, and CLIP's pooled
  output - FluxPipeline's own recipe, so zero subjects reproduce FluxPipeline.
- Condition prompt CT^k: T5 on its own, real length (``condition_prompt_max_tokens`` at most);
  within a batch shorter prompts are padded and the padding is masked (never attended); its CLIP
  pooled vector modulates cond[k].
- Condition image CI^k: shorter side resized to the condition size, centre crop, VAE posterior
  mean, FLUX's shift/scale, 2x2 packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .conditions import ConditionTokens, condition_image_ids, pack_latents
from .config import ROPE_SCHEME_PLANE_OFFSET


@dataclass
class FluxEncoders:
    """The frozen encoders of a FLUX.1 model folder (diffusers layout)."""

    vae: torch.nn.Module
    tokenizer: object  # CLIP
    text_encoder: torch.nn.Module  # CLIP text model
    tokenizer_2: object  # T5
    text_encoder_2: torch.nn.Module  # T5 encoder

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None) -> "FluxEncoders":
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        path = Path(path)
        missing = [s for s in ("vae", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2") if not (path / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"{path} is not a FLUX model folder: missing subfolders {missing}")
        kw = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        return cls(
            vae=AutoencoderKL.from_pretrained(path / "vae", **kw).eval(),
            tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", **kw).eval(),
            tokenizer_2=AutoTokenizer.from_pretrained(path / "tokenizer_2"),
            text_encoder_2=T5EncoderModel.from_pretrained(path / "text_encoder_2", **kw).eval(),
        )

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixels_per_token(self) -> int:
        return 2 * self.vae_scale_factor


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """An RGB PIL image from a path or an image; unreadable input is a ValueError that names it."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {image}: {err}") from err


def reference_tensor(image: Image.Image | str | Path, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1]: shorter side resized to ``size``, centre-cropped."""
    im = load_image(image)
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, 3, H, W) in [-1, 1] -> packed latents (B, tokens, 4C) and the packed grid (rows, cols)."""
    param = next(vae.parameters())
    latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mode()
    shift = vae.config.shift_factor or 0.0
    latents = (latents - shift) * vae.config.scaling_factor
    return pack_latents(latents), (latents.shape[2] // 2, latents.shape[3] // 2)


@torch.no_grad()
def encode_target_prompt(enc: FluxEncoders, prompts: list[str], max_sequence_length: int = 512):
    """FluxPipeline's prompt encoding: (T5 embeds (B, max_len, D), CLIP pooled (B, Dp))."""
    return _t5(enc, prompts, max_sequence_length, pad_to_max=True)[0], clip_pooled(enc, prompts)


@torch.no_grad()
def clip_pooled(enc: FluxEncoders, prompts: list[str]) -> torch.Tensor:
    tok = enc.tokenizer(prompts, padding="max_length", max_length=enc.tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")  # fmt: skip
    device = next(enc.text_encoder.parameters()).device
    return enc.text_encoder(tok.input_ids.to(device), output_hidden_states=False).pooler_output


@torch.no_grad()
def _t5(enc: FluxEncoders, prompts: list[str], max_length: int, pad_to_max: bool):
    tok = enc.tokenizer_2(prompts, padding="max_length" if pad_to_max else "longest", max_length=max_length,
                          truncation=True, return_tensors="pt")  # fmt: skip
    device = next(enc.text_encoder_2.parameters()).device
    ids = tok.input_ids.to(device)
    mask = None if pad_to_max else tok.attention_mask.to(device).bool()
    embeds = enc.text_encoder_2(ids, attention_mask=mask, output_hidden_states=False)[0]
    return embeds, mask


@torch.no_grad()
def encode_conditions(
    enc: FluxEncoders,
    images: list[list[Image.Image | str | Path]],
    prompts: list[list[str]],
    *,
    condition_size: int = 512,
    max_prompt_tokens: int = 64,
    compaction: int = 1,
    rope_scheme: str = ROPE_SCHEME_PLANE_OFFSET,
) -> ConditionTokens:
    """Conditions for a batch: ``images[k][b]`` and ``prompts[k][b]`` are condition k of sample b.

    ``compaction`` f: references are encoded at ``condition_size / f`` with RoPE positions scaled by f
    (``MusarConfig.condition_compaction``); ``rope_scheme``: ``MusarConfig.rope_scheme``.
    """
    if condition_size % (16 * compaction):
        raise ValueError(f"condition_size {condition_size} / compaction {compaction} is not a multiple of 16")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} condition image lists but {len(prompts)} condition prompt lists")
    out = ConditionTokens([], [], [], [], prompt_mask=[])
    for k, (imgs, texts) in enumerate(zip(images, prompts)):
        if len(imgs) != len(texts):
            raise ValueError(f"condition {k}: {len(imgs)} images but {len(texts)} prompts")
        pixels = torch.stack([reference_tensor(im, condition_size // compaction) for im in imgs])
        latents, (rows, cols) = encode_images(enc.vae, pixels)
        embeds, mask = _t5(enc, texts, max_prompt_tokens, pad_to_max=False)
        out.image_latents.append(latents)
        out.image_ids.append(condition_image_ids(k, rows, cols, device=latents.device, compaction=compaction,
                                                 scheme=rope_scheme))  # fmt: skip
        out.prompt_embeds.append(embeds)
        out.prompt_mask.append(None if bool(mask.all()) else mask)
        out.pooled.append(clip_pooled(enc, texts))
    return out


def phrase_token_span(tokenizer, prompt: str, char_start: int, char_end: int, max_length: int) -> tuple[int, int]:
    """(start, length) of the T5 tokens that overlap characters [char_start, char_end) of ``prompt``."""
    if not (0 <= char_start < char_end <= len(prompt)):
        raise ValueError(f"character span ({char_start}, {char_end}) lies outside the prompt of {len(prompt)} characters")
    enc = tokenizer(prompt, max_length=max_length, truncation=True, return_offsets_mapping=True)
    hits = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < char_end and e > char_start]
    if not hits:
        raise ValueError(
            f"the phrase {prompt[char_start:char_end]!r} falls outside the first {max_length} prompt tokens; "
            "shorten the prompt or raise the prompt token limit (max_sequence_length / data.max_prompt_tokens)"
        )
    return hits[0], hits[-1] - hits[0] + 1
