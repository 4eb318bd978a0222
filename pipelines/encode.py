"""Optional stage 3: pre-encode every sample with the frozen FLUX encoders (actor pool, GPUs if any).

Per sample, one safetensors blob in the ``tensors`` column of ``encoded/<dataset>/`` shards (with
``sample_id`` and the sample's ``content_hash``, so a reader can check it matches the images):

- ``condition_latents_<k>``: packed VAE latents of condition image k at ``condition_size`` (the
  recipe of :func:`musar_core.encoding.reference_tensor`), ``(tokens, 4C)``;
- ``target_latents``: packed VAE latents of the target at its stored size, and ``target_grid``
  ``[rows, cols]`` of the packed grid;
- ``condition_t5_<k>`` / ``target_t5``: T5 hidden states at the prompt's *real* token length
  (encoded with an attention mask, then cut: a padded 512 x 4096 bf16 prompt would be 4 MiB);
- ``condition_clip_<k>`` / ``target_clip``: CLIP pooled vectors;
- ``phrase_spans`` (multi-condition samples): ``(c, 2)`` (start, length) of each condition prompt's
  T5 tokens inside the target prompt, for dynamic routing.

Note for readers: FluxPipeline encodes the *target* prompt padded to 512 tokens without a mask, so
its real-token states also saw the padding; these cut, masked states are not bit-identical to that,
and training on them (``training.encoded``) feeds the prompt at its real length, padded only to the
micro-batch's longest with a key mask, where image-based training feeds FLUX's padded 512 tokens.

Tensors are stored as ``storage_dtype`` (bf16 by default). Each actor holds one copy of the
encoders; with GPUs in the cluster there is one actor per GPU (``num_gpus=1``), else CPU actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .images import decode_rgb
from .shards import write_shards

ENCODED_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("dataset", pa.string()), ("content_hash", pa.string()), ("tensors", pa.binary())]
)
DTYPES = Literal["float32", "bfloat16", "float16"]


@dataclass
class EncoderConfig:
    batch_size: int = 8
    condition_size: int = 512
    condition_prompt_max_tokens: int = 64
    prompt_max_tokens: int = 512  # capped by the T5 tokenizer's own maximum
    compute_dtype: DTYPES | None = None  # None: bfloat16 on GPU, float32 on CPU
    storage_dtype: DTYPES = "bfloat16"
    actors: int | None = None  # None: one per GPU in the cluster, else one CPU actor

    def __post_init__(self) -> None:
        for name in ("batch_size", "condition_size", "condition_prompt_max_tokens", "prompt_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"encoder.{name} must be positive, got {getattr(self, name)}")
        if self.condition_size % 16:
            raise ValueError(f"encoder.condition_size must be a multiple of 16, got {self.condition_size}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"encoder.actors must be positive, got {self.actors}")


def load_tensors(blob: bytes) -> dict:
    """The tensors of one encoded sample (what training reads instead of images)."""
    from safetensors.torch import load

    return load(blob)


class SampleEncoder:
    """Ray Data callable class: SAMPLE_SCHEMA rows in, ``sample_id, dataset, content_hash, tensors``
    out. Constructed once per actor, so the encoders load once per actor."""

    def __init__(self, model_dir: str, cfg: EncoderConfig):
        import torch

        from musar_core.encoding import FluxEncoders

        self.torch = torch
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        compute = cfg.compute_dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.enc = FluxEncoders.from_pretrained(model_dir, torch_dtype=getattr(torch, compute))
        for module in (self.enc.vae, self.enc.text_encoder, self.enc.text_encoder_2):
            module.to(self.device)
        self.storage = getattr(torch, cfg.storage_dtype)
        self.prompt_max = min(cfg.prompt_max_tokens, self.enc.tokenizer_2.model_max_length)

    def t5_real_length(self, prompts: list[str], max_length: int) -> list:
        tok = self.enc.tokenizer_2(prompts, padding="longest", max_length=max_length, truncation=True,
                                   return_tensors="pt")  # fmt: skip
        mask = tok.attention_mask.to(self.device)
        with self.torch.inference_mode():
            states = self.enc.text_encoder_2(tok.input_ids.to(self.device), attention_mask=mask)[0]
        return [states[i, : int(n)] for i, n in enumerate(mask.sum(1).tolist())]

    def token_span(self, prompt: str, start: int, end: int) -> tuple[int, int]:
        """(start, length) in T5 tokens; (-1, 0) when the phrase lies beyond the token limit (training
        refuses such a sample by name, as it would when encoding the images itself)."""
        from musar_core.encoding import phrase_token_span

        try:
            return phrase_token_span(self.enc.tokenizer_2, prompt, start, end, self.prompt_max)
        except ValueError:
            return (-1, 0)

    def latents(self, images: list) -> list:
        """Packed latents per image; images of equal size are encoded together."""
        from musar_core.encoding import encode_images

        out = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(tuple(im.shape), []).append(i)
        for (_, h, w), idx in by_size.items():
            step = self.enc.pixels_per_token
            if h % step or w % step:
                raise ValueError(f"image size {w}x{h} is not a multiple of {step}: cannot be VAE-encoded and packed")
            packed, grid = encode_images(self.enc.vae, self.torch.stack([images[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = (packed[j], grid)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        from safetensors.torch import save

        from musar_core.encoding import clip_pooled, reference_tensor

        torch = self.torch
        rows = batch.to_pylist()
        conds = [(r, k) for r, row in enumerate(rows) for k in range(len(row["condition_images"]))]
        cond_pixels = [reference_tensor(decode_rgb(rows[r]["condition_images"][k]), self.cfg.condition_size) for r, k in conds]
        target_pixels = [
            torch.from_numpy(np.asarray(decode_rgb(row["target_image"]), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
            for row in rows
        ]  # fmt: skip
        cond_latents = self.latents(cond_pixels)
        target_latents = self.latents(target_pixels)
        cond_prompts = [rows[r]["condition_prompts"][k] for r, k in conds]
        target_prompts = [row["target_prompt"] for row in rows]
        cond_t5 = self.t5_real_length(cond_prompts, self.cfg.condition_prompt_max_tokens)
        target_t5 = self.t5_real_length(target_prompts, self.prompt_max)
        with torch.inference_mode():
            clip = clip_pooled(self.enc, cond_prompts + target_prompts)
        tensors = [{} for _ in rows]
        for j, (r, k) in enumerate(conds):
            tensors[r][f"condition_latents_{k}"] = cond_latents[j][0]
            tensors[r][f"condition_t5_{k}"] = cond_t5[j]
            tensors[r][f"condition_clip_{k}"] = clip[j]
        for r in range(len(rows)):
            tensors[r]["target_latents"] = target_latents[r][0]
            tensors[r]["target_t5"] = target_t5[r]
            tensors[r]["target_clip"] = clip[len(conds) + r]
        blobs = []
        for r, named in enumerate(tensors):
            stored = {name: t.detach().to("cpu", self.storage).contiguous() for name, t in named.items()}
            stored["target_grid"] = torch.tensor(target_latents[r][1], dtype=torch.int64)
            spans = rows[r]["condition_spans"]
            if spans and len(rows[r]["condition_images"]) >= 2:
                stored["phrase_spans"] = torch.tensor([self.token_span(rows[r]["target_prompt"], a, b) for a, b in spans])
            blobs.append(save(stored))
        return pa.table({
            "sample_id": batch.column("sample_id"), "dataset": batch.column("dataset"),
            "content_hash": batch.column("content_hash"), "tensors": pa.array(blobs, pa.binary()),
        }, schema=ENCODED_SCHEMA)  # fmt: skip


def write_encoded(batch: pa.Table, *, out_dir: str, max_rows: int, max_bytes: int) -> pa.Table:
    """Ray Data UDF: encoded rows in, ``out_dir/<dataset>`` shards; returns per-row blob sizes."""
    for dataset in sorted(set(batch.column("dataset").to_pylist())):
        part = batch.filter(pc.equal(batch.column("dataset"), dataset)).sort_by("sample_id")
        write_shards(part, f"{out_dir}/{dataset}", max_rows=max_rows, max_bytes=max_bytes)
    return pa.table({"dataset": batch.column("dataset"), "bytes": pc.binary_length(batch.column("tensors")).cast(pa.int64())})
