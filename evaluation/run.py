"""``musar eval`` / ``jobs/eval_dreambench.py``: one DreamBench evaluation = one MLflow run.

    python jobs/eval_dreambench.py --config eval.yaml
    python jobs/eval_dreambench.py --dreambench /data/dreambooth/dataset --model /models/FLUX.1-dev \\
        --lora mlflow:<run_id> --dino-model /models/dino-vits16 --clip-model /models/clip-vit-b-32
    python jobs/eval_dreambench.py ... --limit 8 --num-seeds 1 --steps 8      # smoke run

Order of work: everything that can fail fast is checked first (DreamBench folder, metric models
loaded strictly, model and LoRA folders, case files), then Ray generates the missing images
(:mod:`.generate`, resumable), scores all of them (:mod:`.scoring`), and the run logs params,
metrics, tables, sample grids and the report (:mod:`.report`).

Model, LoRA and metric-model folders must be readable at the same path on every Ray node (shared
storage, as for training); generated images and reports are written by the driver only.
With a LoRA, the MUSAR fields that give its weights their meaning (ranks, alphas, target modules,
routing switches, RoPE scheme) are taken from its metadata; inference-time fields (dynamic
routing, condition size, attention implementation) come from ``musar.*`` of this config.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from musar.model_dirs import resolve_flux_dir
from musar_core import MusarConfig

from .cases import (
    MULTI,
    PROTOCOL_FILE,
    SINGLE,
    Case,
    DreamBench,
    external_split,
    load_case_file,
    multi_cases,
    select_cases,
    single_cases,
)
from .generate import GenerationSettings, GenerationStats, image_path

SPLITS = (SINGLE, MULTI)
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EvalTrackingConfig:
    tracking_uri: str = "sqlite:///outputs/mlflow.db"  # relative sqlite paths are made absolute; "env": $MLFLOW_TRACKING_URI
    experiment: str = "musar-eval"
    run_name: str | None = None
    sample_cases: int = 4  # cases per split in the sample grids
    previous_runs: int = 10  # earlier runs of the experiment shown in the report


@dataclass
class EvalConfig:
    dreambench: str = "data/dreambench"  # google/dreambooth dataset/ layout (subject folders + prompts_and_classes.txt)
    model: str = "tiny"  # local FLUX.1 diffusers folder, or "tiny"
    lora: str | None = None  # MUSAR LoRA folder, or mlflow:<run_id> (its "lora" artifact)
    dino_model: str | None = None  # local folder: DINO v1 ViT-S/16, transformers format
    clip_model: str | None = None  # local folder: CLIP ViT-B/32, open_clip format (open_clip_config.json + weights)
    splits: list[str] = field(default_factory=lambda: [SINGLE, MULTI])
    multi_cases: str | None = None  # None: the shipped evaluation/data/dreambench_multi.json
    case_files: list[str] = field(default_factory=list)  # external case files, one split each
    num_seeds: int = 4
    first_seed: int = 0
    limit: int | None = None  # at most this many cases per split, evenly spaced (smoke runs)
    cases: list[str] = field(default_factory=list)  # case-id patterns, e.g. "single/dog*/0?", "multi/pair_*"
    subjects: list[str] = field(default_factory=list)  # only cases all of whose subjects are listed
    height: int = 512
    width: int = 512
    steps: int = 28
    guidance_scale: float = 3.5
    max_sequence_length: int = 512
    dtype: str = "auto"  # auto: bfloat16 when the cluster has GPUs, else float32
    workers: int | None = None  # generation actors; None: one per GPU in the cluster, else one CPU actor
    scoring_workers: int = 1
    metric_batch_size: int = 16
    output_dir: str = "outputs/eval"
    quiet: bool = False
    musar: MusarConfig = field(default_factory=MusarConfig)
    tracking: EvalTrackingConfig = field(default_factory=EvalTrackingConfig)

    def __post_init__(self) -> None:
        if unknown := [s for s in self.splits if s not in SPLITS]:
            raise ValueError(f"splits: unknown {unknown}; choose from {list(SPLITS)} (external splits come from case_files)")
        if not self.splits and not self.case_files:
            raise ValueError("nothing to evaluate: splits and case_files are both empty")
        for name in ("num_seeds", "height", "width", "steps", "max_sequence_length", "scoring_workers", "metric_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive, got {self.limit}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be positive, got {self.workers}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.num_seeds))


@dataclass
class EvalResult:
    run_id: str
    metrics: dict[str, float]
    breakdown: dict
    generation: GenerationStats
    image_root: Path
    report_dir: Path
    cases: dict[str, list[Case]]


# ---- resolution of inputs --------------------------------------------------------------------------
def resolve_lora(cfg: EvalConfig, tracking_uri: str) -> Path | None:
    """A LoRA folder, or ``mlflow:<run_id>``: that run's ``lora`` artifact, downloaded under output_dir."""
    from musar_core.checkpoint import read_metadata

    if not cfg.lora:
        return None
    if cfg.lora.startswith("mlflow:"):
        import mlflow

        run_id = cfg.lora.split(":", 1)[1]
        dst = Path(cfg.output_dir).expanduser().resolve() / "loras" / run_id
        if not (dst / "lora").is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            try:
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="lora", dst_path=str(dst),
                                                    tracking_uri=tracking_uri)  # fmt: skip
            except Exception as err:  # MLflow raises its own exception types
                raise ValueError(f"lora: cannot fetch the 'lora' artifact of MLflow run {run_id} from {tracking_uri}: {err}") from err
        path = dst / "lora"
    else:
        path = Path(cfg.lora).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"lora: {path} does not exist")
    try:
        read_metadata(path)
    except ValueError as err:
        raise ValueError(f"lora: {err}") from err
    return path


def effective_musar(cfg: EvalConfig, lora_dir: Path | None) -> MusarConfig:
    """``cfg.musar`` with the LoRA's meaning-defining fields taken from its metadata."""
    from musar_core.checkpoint import STRICT_FIELDS, read_metadata

    if lora_dir is None:
        return cfg.musar
    meta = read_metadata(lora_dir)
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    changes = {k: tuple(meta[k]) if isinstance(meta[k], list) else meta[k] for k in STRICT_FIELDS
               if k in meta and hasattr(cfg.musar, k) and plain(getattr(cfg.musar, k)) != plain(meta[k])}  # fmt: skip
    if changes:
        _say(f"from the LoRA's metadata: {', '.join(f'musar.{k}={v!r}' for k, v in changes.items())}", cfg.quiet)
    return cfg.musar.replace(**changes)


def build_cases(cfg: EvalConfig) -> tuple[dict[str, list[Case]], dict[str, int]]:
    """Selected cases per split, and each split's full size (to tell subsets from whole splits)."""
    # External files that only use "dir" subjects need no DreamBench folder.
    has_bench = bool(cfg.splits) or (Path(cfg.dreambench).expanduser() / PROTOCOL_FILE).is_file()
    bench = DreamBench.open(cfg.dreambench) if has_bench else None
    full: dict[str, list[Case]] = {}
    if SINGLE in cfg.splits:
        full[SINGLE] = single_cases(bench)
    if MULTI in cfg.splits:
        full[MULTI] = multi_cases(bench, cfg.multi_cases)
    for path in cfg.case_files:
        split = external_split(path)
        if split in full:
            raise ValueError(f"case_files: two files map to split {split!r}; rename one")
        full[split] = load_case_file(path, bench, split)
    selected = {s: select_cases(c, cfg.cases, cfg.subjects, cfg.limit) for s, c in full.items()}
    selected = {s: c for s, c in selected.items() if c}
    if not selected:
        raise ValueError("no case matches the cases/subjects filters")
    return selected, {s: len(c) for s, c in full.items()}


# ---- the run ---------------------------------------------------------------------------------------
@dataclass
class EvalPlan:
    """Everything resolved and checked before any image is generated."""

    cases: dict[str, list[Case]]
    full_sizes: dict[str, int]
    seeds: list[int]
    model_dir: Path
    lora_dir: Path | None
    musar: MusarConfig
    settings: GenerationSettings
    fingerprint: str
    image_root: Path
    out_dir: Path
    tracking_uri: str
    params: dict
    metric_info: dict

    @property
    def all_cases(self) -> list[Case]:
        return [c for members in self.cases.values() for c in members]

    def generation_kwargs(self, cfg: EvalConfig) -> dict:
        """Arguments of :func:`evaluation.generate.generate_images` for this plan."""
        describe = {k: self.params[k] for k in ("model", "model_fingerprint", "lora", "lora_path", "lora_fingerprint")}
        return dict(cases=self.all_cases, seeds=self.seeds, root=self.image_root, model_dir=str(self.model_dir),
                    lora_dir=str(self.lora_dir) if self.lora_dir else None, musar=self.musar.to_dict(),
                    settings=self.settings, fingerprint=self.fingerprint, describe=describe, workers=cfg.workers,
                    quiet=cfg.quiet)  # fmt: skip


def plan_eval(cfg: EvalConfig) -> EvalPlan:
    """Fail fast: cases, metric models (loaded strictly, then dropped), model and LoRA; then fingerprints."""
    import ray

    from musar.ray_cluster import ensure_ray
    from training.tracking import flat_params, resolve_tracking_uri

    from .fingerprints import folder_fingerprint, generation_fingerprint, split_fingerprint
    from .metric_models import load_clip, load_dino, metric_model_info

    cases, full_sizes = build_cases(cfg)
    metric_info = metric_model_info(cfg.dino_model, cfg.clip_model)
    load_dino(cfg.dino_model), load_clip(cfg.clip_model)
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    model_dir = resolve_flux_dir(cfg.model)
    lora_dir = resolve_lora(cfg, tracking_uri)
    musar = effective_musar(cfg, lora_dir)

    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if gpus else "float32")
    settings = GenerationSettings(cfg.height, cfg.width, cfg.steps, cfg.guidance_scale, cfg.max_sequence_length, dtype)
    model_fp = folder_fingerprint(model_dir)
    lora_fp = folder_fingerprint(lora_dir, deep=True) if lora_dir else None
    gen_fp = generation_fingerprint(model_fp, lora_fp, {**settings.to_dict(), "musar": musar.to_dict()})
    seeds = cfg.seeds
    out_dir = Path(cfg.output_dir).expanduser().resolve()
    params = {
        "model": str(model_dir), "model_fingerprint": model_fp, "lora": cfg.lora or "none",
        "lora_path": str(lora_dir or ""), "lora_fingerprint": lora_fp or "none", "generation_fingerprint": gen_fp,
        "seeds": ",".join(map(str, seeds)), "num_seeds": len(seeds), "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale, "height": cfg.height, "width": cfg.width,
        "max_sequence_length": cfg.max_sequence_length, "dtype": dtype, "dreambench": str(Path(cfg.dreambench).resolve()),
        "limit": cfg.limit, "case_patterns": ",".join(cfg.cases) or "all", "subject_filter": ",".join(cfg.subjects) or "all",
        **metric_info,
    }  # fmt: skip
    for split, members in cases.items():
        params[f"split.{split}.fingerprint"] = split_fingerprint(members, seeds)
        params[f"split.{split}.cases"] = f"{len(members)}/{full_sizes[split]}"
    params.update(flat_params(musar.to_dict(), "musar."))
    return EvalPlan(cases, full_sizes, seeds, model_dir, lora_dir, musar, settings, gen_fp, out_dir / "images" / gen_fp,
                    out_dir, tracking_uri, params, metric_info)  # fmt: skip


def run_eval(cfg: EvalConfig) -> EvalResult:
    import mlflow

    from musar.config import to_dict

    from .generate import generate_images
    from .scoring import aggregate

    plan = plan_eval(cfg)
    mlflow.set_tracking_uri(plan.tracking_uri)
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name=cfg.tracking.run_name) as run:
        run_id, run_name = run.info.run_id, run.info.run_name
        mlflow.log_params({k: str(v)[:500] for k, v in plan.params.items()})
        mlflow.set_tags({"musar.kind": "eval", "musar.generation_fingerprint": plan.fingerprint})
        mlflow.log_dict(to_dict(cfg), "config.json")

        # Generate what is missing, score everything, aggregate, log, report.
        stats = generate_images(**plan.generation_kwargs(cfg))
        image_rows = _score(cfg, plan)
        case_rows, metrics, breakdown = aggregate(image_rows)
        metrics.update({"generation/planned": stats.planned, "generation/skipped": stats.skipped,
                        "generation/generated": stats.generated, "generation/seconds": stats.seconds})  # fmt: skip
        if stats.generated:
            metrics["generation/seconds_per_image"] = stats.image_seconds / stats.generated
        subject_metrics = {f"{split}/subject/{_metric_name(name)}/{m}": v for split, subjects in breakdown.items()
                           for name, values in subjects.items() for m, v in values.items()}  # fmt: skip
        mlflow.log_metrics({**metrics, **subject_metrics})

        report_dir = plan.out_dir / "runs" / run_id
        _write_artifacts(cfg, plan, report_dir, image_rows, case_rows, breakdown, metrics, run_id, run_name,
                         experiment.experiment_id)  # fmt: skip
        mlflow.log_artifacts(str(report_dir))
    main = {k: v for k, v in metrics.items() if k.split("/")[-1] in ("dino", "clip_i", "clip_t")}
    _say(f"run {run_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in main.items()), cfg.quiet)
    _say(f"report: {report_dir / 'report.md'}", cfg.quiet)
    return EvalResult(run_id, metrics, breakdown, stats, plan.image_root, report_dir, plan.cases)


def _score(cfg: EvalConfig, plan: EvalPlan) -> list[dict]:
    from .scoring import score_images

    items, references, rows = [], {}, []
    for case in plan.all_cases:
        for s in case.subjects:
            references[s.key] = list(s.images)
        for seed in plan.seeds:
            key = f"{case.id}#{seed}"
            path = image_path(plan.image_root, case.id, seed)
            items.append({"key": key, "path": str(path), "prompt": case.prompt, "subject_keys": [s.key for s in case.subjects]})
            rows.append({"key": key, "case_id": case.id, "split": case.split, "prompt": case.prompt,
                         "subjects": "+".join(s.name for s in case.subjects),
                         "subject_names": [s.name for s in case.subjects], "seed": seed,
                         "image": str(path.relative_to(plan.out_dir))})  # fmt: skip
    scores = score_images(items, references, dino_model=cfg.dino_model, clip_model=cfg.clip_model,
                          batch_size=cfg.metric_batch_size, workers=cfg.scoring_workers, quiet=cfg.quiet)  # fmt: skip
    for row in rows:
        row.update(scores[row["key"]])
    return rows


def _write_artifacts(cfg: EvalConfig, plan: EvalPlan, report_dir: Path, image_rows, case_rows, breakdown, metrics, run_id,
                     run_name, experiment_id) -> None:  # fmt: skip
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from .report import build_report, previous_runs, sample_grid

    (report_dir / "tables").mkdir(parents=True, exist_ok=True)
    images = pa.Table.from_pylist([{k: (json.dumps(v) if k == "per_subject" else v) for k, v in r.items()
                                    if k not in ("key", "subject_names")} for r in image_rows])  # fmt: skip
    pq.write_table(images, report_dir / "tables" / "images.parquet")
    pacsv.write_csv(images, report_dir / "tables" / "images.csv")
    pacsv.write_csv(pa.Table.from_pylist(case_rows), report_dir / "tables" / "cases.csv")
    subjects = [{"split": s, "subject": n, **v} for s, names in breakdown.items() for n, v in names.items()]
    pacsv.write_csv(pa.Table.from_pylist(subjects), report_dir / "tables" / "subjects.csv")

    samples = []
    if cfg.tracking.sample_cases > 0:
        (report_dir / "samples").mkdir(exist_ok=True)
        for split, members in plan.cases.items():
            picked = select_cases(members, limit=cfg.tracking.sample_cases)
            grid = sample_grid([(f"{c.id}: {c.prompt}", [s.condition_image for s in c.subjects],
                                 [str(image_path(plan.image_root, c.id, seed)) for seed in plan.seeds]) for c in picked])  # fmt: skip
            name = f"samples/{split.replace('/', '_')}.png"
            grid.save(report_dir / name)
            samples.append(name)

    notes = []
    if not (plan.metric_info["dino_standard"] and plan.metric_info["clip_standard"]):
        notes.append("the metric models are not DINO ViT-S/16 and CLIP ViT-B/32: numbers are not comparable with Table 1.")
    for split in (SINGLE, MULTI):
        if split in plan.cases and len(plan.cases[split]) < plan.full_sizes[split]:
            notes.append(f"{split}: {len(plan.cases[split])} of {plan.full_sizes[split]} cases (limit/filters), "
                         "not the full split.")  # fmt: skip
    if len(plan.seeds) != 4:
        notes.append(f"{len(plan.seeds)} seed(s) per case; the paper uses 4.")
    previous = previous_runs(experiment_id, run_id, cfg.tracking.previous_runs)
    doc = build_report(run_id=run_id, run_name=run_name, experiment=cfg.tracking.experiment, params=plan.params,
                       metrics=metrics, breakdown=breakdown, previous=previous, samples=samples, notes=notes)  # fmt: skip
    (report_dir / "report.md").write_text(doc.markdown())
    (report_dir / "report.html").write_text(doc.html(f"DreamBench evaluation {run_name}"))


def _metric_name(name: str) -> str:
    return re.sub(r"[^\w.\- ]", "_", name)


def _say(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[eval] {message}", file=sys.stderr, flush=True)


__all__ = ["EvalConfig", "EvalPlan", "EvalResult", "EvalTrackingConfig", "plan_eval", "run_eval"]
