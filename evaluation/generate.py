"""Generation of every (case, seed) image with Ray Data over model actors, resumable.

Each actor (a Ray Data callable class) loads ``MUSARPipeline`` once: one actor per GPU with
``num_gpus=1`` when the cluster has GPUs, else CPU actors. Workers return PNG bytes; the driver
alone writes files, atomically, as results stream in, so a crash loses at most the images in
flight, a multi-node cluster needs no shared filesystem for the outputs, and rerunning resumes.

Layout under ``<output_dir>/images/<generation fingerprint>/`` (see :mod:`.fingerprints`)::

    generation.json                  model, LoRA and settings the fingerprint stands for
    <case id>/seed<k>.png            the image; its PNG text chunk "musar" holds the metadata too
    <case id>/seed<k>.json           case (prompt, subjects, images), seed, fingerprint, timing

An image counts as done when its PNG exists and its sidecar's ``case_digest`` equals the case's
current :meth:`~evaluation.cases.Case.generation_digest` (prompt, phrases, condition-image bytes),
so an edited external case is regenerated rather than silently reused.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from .cases import Case

PNG_METADATA_KEY = "musar"
MAX_BLOCKS = 10_000


@dataclass(frozen=True)
class GenerationSettings:
    """Every sampling setting that changes pixels (part of the generation fingerprint)."""

    height: int = 512
    width: int = 512
    steps: int = 28
    guidance_scale: float = 3.5
    max_sequence_length: int = 512
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    planned: int
    skipped: int  # already on disk from an earlier run with the same fingerprint
    generated: int  # pipeline calls made by this run
    seconds: float  # wall time of the stage, Ray start-up and model loading included
    actors: int = 0
    image_seconds: float = 0.0  # summed pipeline time of the generated images


def image_path(root: Path, case_id: str, seed: int) -> Path:
    return root / case_id / f"seed{seed}.png"


def is_done(path: Path, case: Case) -> bool:
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        return False
    try:
        return json.loads(sidecar.read_text()).get("case_digest") == case.generation_digest()
    except (OSError, ValueError):
        return False


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class GenerationWorker:
    """Ray Data callable class: rows (case, seed, prompt, subjects) in, PNG bytes out; one pipeline per actor."""

    def __init__(self, model_dir: str, lora_dir: str | None, musar: dict, settings: dict, conditions: dict[str, bytes]):
        import torch

        from musar_core import MusarConfig, MUSARPipeline

        self.settings = GenerationSettings(**settings)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.settings.dtype if self.settings.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        self.pipe = MUSARPipeline.from_pretrained(model_dir, lora=lora_dir, config=MusarConfig.from_dict(musar),
                                                  torch_dtype=getattr(torch, dtype)).to(device)  # fmt: skip
        self.conditions = conditions

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image, PngImagePlugin

        from musar_core import Subject

        out = {"key": [], "png": [], "seconds": []}
        s = self.settings
        for row in batch.to_pylist():
            start = time.perf_counter()
            subjects = [Subject(Image.open(io.BytesIO(self.conditions[sub["key"]])).convert("RGB"), sub["phrase"],
                                occurrence=sub["occurrence"]) for sub in json.loads(row["subjects"])]  # fmt: skip
            image = self.pipe(row["prompt"], subjects, height=s.height, width=s.width, num_inference_steps=s.steps,
                              guidance_scale=s.guidance_scale, seed=row["seed"], max_sequence_length=s.max_sequence_length,
                              progress=False).images[0]  # fmt: skip
            info = PngImagePlugin.PngInfo()
            info.add_text(PNG_METADATA_KEY, row["metadata"])
            buf = io.BytesIO()
            image.save(buf, format="PNG", pnginfo=info)
            out["key"].append(row["key"])
            out["png"].append(buf.getvalue())
            out["seconds"].append(time.perf_counter() - start)
        return pa.table(out, schema=pa.schema([("key", pa.string()), ("png", pa.binary()), ("seconds", pa.float64())]))


def generate_images(cases: list[Case], seeds: list[int], *, root: Path, model_dir: str, lora_dir: str | None,
                    musar: dict, settings: GenerationSettings, fingerprint: str, describe: dict | None = None,
                    workers: int | None = None, quiet: bool = False) -> GenerationStats:  # fmt: skip
    """Generate the missing (case, seed) images under ``root`` (the fingerprint's folder)."""
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "generation.json").is_file():
        _atomic_write(root / "generation.json", json.dumps({"fingerprint": fingerprint, **(describe or {}),
                                                            "settings": settings.to_dict(), "musar": musar},
                                                           indent=1, default=str).encode())  # fmt: skip
    todo, pending, conditions = [], {}, {}
    for case in cases:
        for seed in seeds:
            path = image_path(root, case.id, seed)
            if is_done(path, case):
                continue
            key = f"{case.id}#{seed}"
            meta = {"case_id": case.id, "split": case.split, "prompt": case.prompt, "seed": seed,
                    "generation_fingerprint": fingerprint, "case_digest": case.generation_digest(),
                    "subjects": case.to_row()["subjects"], "settings": settings.to_dict()}  # fmt: skip
            pending[key] = (path, meta)
            conditions.update({s.key: s.condition_image for s in case.subjects})
            subjects = [{"key": s.key, "phrase": s.phrase, "occurrence": s.occurrence} for s in case.subjects]
            todo.append({"key": key, "seed": seed, "prompt": case.prompt, "subjects": json.dumps(subjects),
                         "metadata": json.dumps(meta)})  # fmt: skip
    planned = len(cases) * len(seeds)
    if not todo:
        _say(f"all {planned} images already generated under {root}", quiet)
        return GenerationStats(planned, planned, 0, time.perf_counter() - start)

    import ray
    import ray.data

    from musar.ray_cluster import ensure_ray

    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = max(1, min(workers or gpus or 1, len(todo)))
    conditions = {k: Path(p).read_bytes() for k, p in conditions.items()}
    _say(f"generating {len(todo)} of {planned} images ({planned - len(todo)} already done) with {actors} actor(s) "
         f"{'on GPU' if gpus else 'on CPU'}", quiet)  # fmt: skip
    # One row per block (up to MAX_BLOCKS): results stream back, and are written, image by image.
    ds = ray.data.from_items(todo, override_num_blocks=min(len(todo), MAX_BLOCKS))
    ds = ds.map_batches(
        GenerationWorker, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
        fn_constructor_kwargs=dict(model_dir=str(model_dir), lora_dir=str(lora_dir) if lora_dir else None, musar=musar,
                                   settings=settings.to_dict(), conditions=conditions),
        **({"num_gpus": 1} if gpus else {}),
    )  # fmt: skip
    generated, image_seconds, last = 0, 0.0, time.perf_counter()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            path, meta = pending[row["key"]]
            _atomic_write(path.with_suffix(".json"), json.dumps({**meta, "seconds": row["seconds"]}, indent=1).encode())
            _atomic_write(path, row["png"])  # the PNG last: its presence marks the image done
            generated += 1
            image_seconds += row["seconds"]
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            _say(f"generated {generated}/{len(todo)}", quiet)
    return GenerationStats(planned, planned - len(todo), generated, time.perf_counter() - start, actors, image_seconds)


def _say(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[eval] {message}", file=sys.stderr, flush=True)
