"""Scoring every generated image (Ray Data over metric-model actors) and aggregating the scores.

Scoring is cheap next to generation, so it is not cached: each run rescores its images with the
metric models it is given. One actor (per GPU when there are GPUs) loads DINO and CLIP once,
embeds every subject's real images once, then scores batches of generated images. Images and
references travel as bytes, so the actors need no view of the driver's files.

Aggregation: an image's DINO / CLIP-I are the mean over its subjects of the mean cosine with that
subject's real images (:func:`evaluation.metrics.image_scores`); a case's score is the mean over its
seeds; a split's score is the mean over its cases (every case has the same seeds, so this is also
the mean over images). The per-subject breakdown of a split averages, for each subject, its own
similarity over all images of the cases it is in (and those images' CLIP-T).
"""

from __future__ import annotations

import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

METRICS = ("dino", "clip_i", "clip_t")


class ScoringWorker:
    """Ray Data callable class: rows (key, png, prompt, subject keys) in, scores out."""

    def __init__(self, dino_model: str, clip_model: str, references: dict[str, list[bytes]], batch_size: int = 16):
        import torch
        from PIL import Image

        from .metrics import MetricModels

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models = MetricModels.load(dino_model, clip_model, device)
        self.refs = {key: self.models.references([Image.open(io.BytesIO(b)) for b in images], batch_size)
                     for key, images in references.items()}  # fmt: skip

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        from .metrics import image_scores

        rows = batch.to_pylist()
        images = [Image.open(io.BytesIO(r["png"])).convert("RGB") for r in rows]
        dino, clip_image = self.models.dino(images), self.models.clip.images(images)
        clip_text = self.models.clip.texts([r["prompt"] for r in rows])
        out = {"key": [], "dino": [], "clip_i": [], "clip_t": [], "per_subject": []}
        for i, r in enumerate(rows):
            scores = image_scores(dino[i], clip_image[i], clip_text[i], [self.refs[k] for k in json.loads(r["subject_keys"])])
            out["key"].append(r["key"])
            for m in METRICS:
                out[m].append(scores[m])
            out["per_subject"].append(json.dumps(scores["per_subject"]))
        return pa.table(out)


def score_images(items: list[dict], references: dict[str, list[str]], *, dino_model: str, clip_model: str,
                 batch_size: int = 16, workers: int | None = None, quiet: bool = False) -> dict[str, dict]:  # fmt: skip
    """``items``: {key, path, prompt, subject_keys}; returns key -> {dino, clip_i, clip_t, per_subject}."""
    import ray
    import ray.data

    from musar.ray_cluster import ensure_ray

    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = max(1, min(workers or gpus or 1, len(items)))
    ref_bytes = {k: [Path(p).read_bytes() for p in paths] for k, paths in references.items()}
    if not quiet:
        print(f"[eval] scoring {len(items)} images against {sum(map(len, references.values()))} real images of "
              f"{len(references)} subjects with {actors} actor(s)", file=sys.stderr, flush=True)  # fmt: skip
    rows = [{"key": it["key"], "png": Path(it["path"]).read_bytes(), "prompt": it["prompt"],
             "subject_keys": json.dumps(it["subject_keys"])} for it in items]  # fmt: skip
    chunks = [pa.Table.from_pylist(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    ds = ray.data.from_arrow(chunks)
    ds = ds.map_batches(
        ScoringWorker, batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
        fn_constructor_kwargs=dict(dino_model=dino_model, clip_model=clip_model, references=ref_bytes, batch_size=batch_size),
        **({"num_gpus": 1} if gpus else {}),
    )  # fmt: skip
    scores = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in batch.to_pylist():
            scores[r["key"]] = {m: r[m] for m in METRICS} | {"per_subject": json.loads(r["per_subject"])}
    return scores


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def aggregate(image_rows: list[dict]) -> tuple[list[dict], dict[str, float], dict[str, dict[str, dict[str, float]]]]:
    """Per-image rows (case_id, split, prompt, subjects, subject_names, seed, dino, clip_i, clip_t, per_subject) ->
    (per-case rows, split metrics ``{split}/{metric}``, per-subject breakdown ``split -> subject -> metric``)."""
    by_case: dict[str, list[dict]] = defaultdict(list)
    for row in image_rows:
        by_case[row["case_id"]].append(row)
    cases = []
    for case_id, rows in by_case.items():
        first = rows[0]
        cases.append({"case_id": case_id, "split": first["split"], "prompt": first["prompt"], "subjects": first["subjects"],
                      "seeds": len(rows), **{m: _mean(r[m] for r in rows) for m in METRICS}})  # fmt: skip
    metrics: dict[str, float] = {}
    for split in dict.fromkeys(c["split"] for c in cases):
        members = [c for c in cases if c["split"] == split]
        metrics.update({f"{split}/{m}": _mean(c[m] for c in members) for m in METRICS})
        metrics[f"{split}/cases"] = len(members)
        metrics[f"{split}/images"] = sum(c["seeds"] for c in members)
    per_subject: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in image_rows:
        for name, s in zip(row["subject_names"], row["per_subject"]):
            entry = per_subject[row["split"]][name]
            entry["dino"].append(s["dino"])
            entry["clip_i"].append(s["clip_i"])
            entry["clip_t"].append(row["clip_t"])
    breakdown = {split: {name: {m: _mean(v[m]) for m in METRICS} for name, v in sorted(subjects.items())}
                 for split, subjects in per_subject.items()}  # fmt: skip
    return cases, metrics, breakdown
