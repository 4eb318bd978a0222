"""``musar demo``: a real MUSAR generation end to end on the embedded tiny model.

Builds (once, cached) a tiny random FLUX.1-style model folder, loads it through the same code path
as FLUX.1-dev (``MUSARPipeline.from_pretrained``), draws two subject references, generates with
routed attention and writes the image, a sheet with the references beside it, and the routing map.
The tiny model is random, so the image is noise; every stage is real.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from musar_core import MusarConfig, Subject

from .generate import GenerateConfig, load_pipeline


@dataclass
class DemoConfig:
    model: str = "tiny"  # "tiny" = the embedded random model; else a local FLUX.1 diffusers folder
    lora: str | None = None
    prompt: str = "a red ball and a blue cube on a wooden table"
    phrases: list[str] = field(default_factory=lambda: ["red ball", "blue cube"])
    height: int = 128
    width: int = 128
    steps: int = 8
    seed: int = 0
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


def run_demo(cfg: DemoConfig) -> Path:
    from musar_core.routing_maps import render_routing_map

    started = time.perf_counter()
    pipe = load_pipeline(GenerateConfig(model=cfg.model, lora=cfg.lora, device=cfg.device, dtype="float32",
                                        musar=cfg.musar))  # fmt: skip
    refs = [procedural_reference(i) for i in range(len(cfg.phrases))]
    subjects = [Subject(ref, phrase) for ref, phrase in zip(refs, cfg.phrases)]
    out = pipe(cfg.prompt, subjects, height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps,
               seed=cfg.seed, return_routing=True)  # fmt: skip
    image = out.images[0]
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image.save(out_dir / "generated.png")
    sheet = Image.new("RGB", (cfg.width * (len(refs) + 1), cfg.height), "white")
    for i, ref in enumerate(refs):
        sheet.paste(ref.resize((cfg.width, cfg.height)), (i * cfg.width, 0))
    sheet.paste(image, (len(refs) * cfg.width, 0))
    sheet.save(out_dir / "sheet.png")
    written = ["generated.png", "sheet.png"]
    if len(subjects) >= 2:
        render_routing_map(image, out.routing).save(out_dir / "routing_map.png")
        written.append("routing_map.png")
    note = " (embedded tiny random model: expect noise, not a picture)" if cfg.model == "tiny" else ""
    print(f"model: {cfg.model}{note}; prompt: {cfg.prompt!r}; subjects: {cfg.phrases}")
    print(f"wrote {', '.join(str((out_dir / w).resolve()) for w in written)} in {time.perf_counter() - started:.1f}s")
    return out_dir / "generated.png"
