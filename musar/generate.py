"""``musar generate``: one multi-subject generation from the command line.

    musar generate --model /models/FLUX.1-dev --lora runs/stage3/lora --prompt "a dog and a cat on the beach" \\
        --subject dog.jpg=dog --subject cat.jpg=cat --seed 0 --steps 28 --out out.png --routing-map maps.png

``--subject IMAGE=PHRASE`` names the phrase of the prompt that refers to the image; a repeated
phrase takes an occurrence, ``--subject dog2.jpg=dog@1`` ("a dog and another dog"). ``--model tiny``
uses the embedded tiny random model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from musar_core import MusarConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateConfig:
    model: str = "tiny"  # a local FLUX.1 diffusers folder, or "tiny"
    prompt: str = ""
    subject: list[str] = field(default_factory=list)  # IMAGE=PHRASE[@OCCURRENCE], repeatable
    lora: str | None = None
    seed: int = 0
    steps: int = 28
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0  # > 1: true classifier-free guidance (bases trained with prompt dropout)
    negative_prompt: str | None = None  # with true_cfg_scale > 1; default the empty prompt
    height: int = 512
    width: int = 512
    num_images: int = 1
    out: str = "out.png"
    routing_map: str | None = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"
    offload: bool = False  # model CPU offload: each model moves to the device only while it runs
    max_sequence_length: int = 512
    max_subjects: int = 5
    musar: MusarConfig = field(default_factory=MusarConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.true_cfg_scale < 1:
            raise ValueError(f"true_cfg_scale must be >= 1 (1 turns it off), got {self.true_cfg_scale}")
        if self.negative_prompt is not None and self.true_cfg_scale == 1:
            raise ValueError("negative_prompt is only used with true_cfg_scale > 1")


def load_pipeline(cfg: GenerateConfig):
    from musar_core import MUSARPipeline

    from .model_dirs import resolve_flux_dir

    model_dir = resolve_flux_dir(cfg.model)
    pipe = MUSARPipeline.from_pretrained(model_dir, lora=cfg.lora, config=cfg.musar, torch_dtype=DTYPES[cfg.dtype],
                                         max_subjects=cfg.max_subjects, max_sequence_length=cfg.max_sequence_length)  # fmt: skip
    if cfg.offload:
        pipe.enable_model_cpu_offload(cfg.device)
    else:
        pipe.to(cfg.device)
    return pipe


def run_generate(cfg: GenerateConfig) -> list[Path]:
    from musar_core.routing_maps import render_routing_map
    from musar_core.subjects import parse_subject_arg

    if not cfg.prompt:
        raise ValueError("--prompt is required")
    subjects = [parse_subject_arg(s) for s in cfg.subject]
    pipe = load_pipeline(cfg)
    out = pipe(cfg.prompt, subjects, height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps,
               guidance_scale=cfg.guidance_scale, seed=cfg.seed, num_images_per_prompt=cfg.num_images,
               return_routing=cfg.routing_map is not None, true_cfg_scale=cfg.true_cfg_scale,
               negative_prompt=cfg.negative_prompt)  # fmt: skip
    target = Path(cfg.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    paths = [target if len(out.images) == 1 else target.with_name(f"{target.stem}-{i}{target.suffix}")
             for i in range(len(out.images))]  # fmt: skip
    for image, path in zip(out.images, paths):
        image.save(path)
        print(f"wrote {path.resolve()}")
    if cfg.routing_map:
        if len(subjects) < 2:
            print("routing map skipped: dynamic routing needs two or more subjects")
        else:
            render_routing_map(out.images[0], out.routing).save(cfg.routing_map)
            print(f"wrote routing map {Path(cfg.routing_map).resolve()}")
    return paths
