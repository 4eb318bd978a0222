"""``musar demo``: a real MUSAR generation end to end on the embedded tiny model.

Builds (once, cached) a tiny random FLUX.1-style model folder, loads it through the same code path
as FLUX.1-dev, encodes procedurally drawn subject references and the prompt, denoises with routed
attention and writes a PNG (reference images beside the result). Pointing ``model`` at a local
FLUX.1-dev folder and ``lora`` at a MUSAR LoRA runs the real model unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from musar_core import MusarConfig, MusarTransformer, image_ids, pack_latents, text_ids
from musar_core.encoding import FluxEncoders, encode_conditions, encode_target_prompt, load_image, phrase_token_span
from musar_core.sampling import decode, denoise


@dataclass
class SubjectSpec:
    phrase: str
    image: str | None = None  # None: a procedurally drawn reference
    occurrence: int = 0


@dataclass
class DemoConfig:
    model: str = "tiny"  # "tiny" = the embedded random model; else a local FLUX.1 diffusers folder
    lora: str | None = None
    prompt: str = "a red ball and a blue cube on a wooden table"
    subjects: list[SubjectSpec] = field(
        default_factory=lambda: [SubjectSpec("red ball"), SubjectSpec("blue cube")]
    )
    height: int = 128
    width: int = 128
    steps: int = 8
    guidance_scale: float = 3.5
    seed: int = 0
    max_sequence_length: int | None = None  # None: the T5 tokenizer's own maximum (512 for FLUX.1-dev)
    output_dir: str = "outputs/demo"
    device: str = "cpu"
    musar: MusarConfig = field(default_factory=lambda: MusarConfig(condition_size=64))


def procedural_reference(index: int, size: int = 128) -> Image.Image:
    """A simple, recognisable subject: a coloured disc or square on a plain background."""
    colours = [(200, 40, 40), (40, 80, 200), (40, 160, 60), (220, 180, 30), (150, 60, 170)]
    im = Image.new("RGB", (size, size), (235, 230, 220))
    draw = ImageDraw.Draw(im)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (draw.ellipse if index % 2 == 0 else draw.rectangle)(box, fill=colours[index % len(colours)])
    return im


def phrase_chars(prompt: str, phrase: str, occurrence: int) -> tuple[int, int]:
    start = -1
    for _ in range(occurrence + 1):
        start = prompt.find(phrase, start + 1)
        if start < 0:
            raise ValueError(f"subject phrase {phrase!r} (occurrence {occurrence}) does not occur in the prompt {prompt!r}")
    return start, start + len(phrase)


def run_demo(cfg: DemoConfig) -> Path:
    from musar_core.tiny import tiny_flux_dir

    if cfg.height % 16 or cfg.width % 16:
        raise ValueError(f"height and width must be multiples of 16, got {cfg.height}x{cfg.width}")
    started = time.perf_counter()
    model_dir = tiny_flux_dir() if cfg.model == "tiny" else Path(cfg.model)
    device = torch.device(cfg.device)
    enc = FluxEncoders.from_pretrained(model_dir)
    for module in (enc.vae, enc.text_encoder, enc.text_encoder_2):
        module.to(device)
    model = MusarTransformer.from_pretrained(model_dir, config=cfg.musar, lora=cfg.lora).to(device).eval()
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir / "scheduler")

    max_len = cfg.max_sequence_length or min(enc.tokenizer_2.model_max_length, 512)
    refs = [load_image(s.image) if s.image else procedural_reference(i) for i, s in enumerate(cfg.subjects)]
    spans = [phrase_token_span(enc.tokenizer_2, cfg.prompt, *phrase_chars(cfg.prompt, s.phrase, s.occurrence), max_len)
             for s in cfg.subjects]  # fmt: skip
    prompt_embeds, pooled = encode_target_prompt(enc, [cfg.prompt], max_len)
    conditions = encode_conditions(
        enc, [[r] for r in refs], [[s.phrase] for s in cfg.subjects], condition_size=cfg.musar.condition_size,
        max_prompt_tokens=cfg.musar.condition_prompt_max_tokens,
    )  # fmt: skip

    scale = enc.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    noise = torch.randn(1, enc.vae.config.latent_channels, cfg.height // scale, cfg.width // scale, generator=generator)
    result = denoise(
        model, scheduler, pack_latents(noise).to(device),
        image_ids(cfg.height // (2 * scale), cfg.width // (2 * scale), device=device),
        prompt_embeds, pooled, text_ids(prompt_embeds.shape[1], device=device),
        num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, conditions=conditions or None,
        phrase_spans=torch.tensor([spans], device=device) if spans else None,
    )  # fmt: skip
    image = decode(enc.vae, result.latents, cfg.height, cfg.width)[0]

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = out_dir / "generated.png"
    image.save(image_path)
    sheet = Image.new("RGB", (cfg.width * (len(refs) + 1), cfg.height), "white")
    for i, ref in enumerate(refs):
        sheet.paste(ref.resize((cfg.width, cfg.height)), (i * cfg.width, 0))
    sheet.paste(image, (len(refs) * cfg.width, 0))
    sheet.save(out_dir / "sheet.png")
    print(f"model: {model_dir}{' (embedded tiny random model: expect noise, not a picture)' if cfg.model == 'tiny' else ''}")
    print(f"prompt: {cfg.prompt!r}; subjects: {[s.phrase for s in cfg.subjects]}; token spans: {spans}")
    print(f"wrote {image_path.resolve()} and {(out_dir / 'sheet.png').resolve()} in {time.perf_counter() - started:.1f}s")
    return image_path
