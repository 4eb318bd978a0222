"""Driver side of a training stage: validate, resolve inputs, run the TorchTrainer, publish the LoRA.

Everything that can be checked before workers start is checked here (config values, the model
folder, the shards of the stage, the previous stage's LoRA and its metadata), so a bad submission
fails in seconds with a message naming the problem rather than after a cluster has scaled up.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from musar.config import to_dict
from musar.model_dirs import resolve_flux_dir
from musar.ray_cluster import check_room_for_data, ensure_ray
from musar_core.checkpoint import STRICT_FIELDS, base_config_hash, read_metadata

from .checkpoints import LORA_DIR
from .config import TrainConfig
from .tracking import flat_params, resolve_tracking_uri


@dataclass
class StageResult:
    lora_dir: Path
    run_id: str | None
    metrics: dict
    checkpoint_path: str | None


def resolve_init_lora(cfg: TrainConfig, model_dir: Path) -> Path | None:
    """The previous stage's LoRA: a folder, or ``mlflow:<run_id>`` (its ``lora`` artifact)."""
    if cfg.init_lora is None:
        if cfg.stage > 1 and not cfg.allow_missing_init:
            raise ValueError(
                f"stage {cfg.stage} starts from stage {cfg.stage - 1}'s LoRA: set init_lora to its folder or to "
                "mlflow:<run_id> (or allow_missing_init=true to start from fresh adapters, for ablations)"
            )
        return None
    if cfg.init_lora.startswith("mlflow:"):
        import mlflow

        mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.tracking_uri))
        path = Path(mlflow.artifacts.download_artifacts(run_id=cfg.init_lora.split(":", 1)[1], artifact_path=LORA_DIR))
    else:
        path = Path(cfg.init_lora).expanduser().resolve()
    meta = read_metadata(path)
    from diffusers import FluxTransformer2DModel

    current = {**cfg.musar.to_dict(), "base_config_hash": base_config_hash(
        FluxTransformer2DModel.load_config(model_dir / "transformer"))}  # fmt: skip
    bad = [f"{k}: LoRA has {meta.get(k)!r}, config has {current[k]!r}" for k in STRICT_FIELDS
           if _plain(meta.get(k)) != _plain(current[k])]  # fmt: skip
    if bad:
        raise ValueError(f"init_lora {path} does not fit this stage's model/config:\n  " + "\n  ".join(bad))
    return path


def check_shards(cfg: TrainConfig) -> tuple[Path, str | None]:
    root = Path(cfg.data.shards).expanduser().resolve()
    for name, _ in cfg.data_mix():
        if not any((root / name).glob("*.parquet")):
            raise FileNotFoundError(f"data.shards: {root / name} holds no parquet shards (run `musar data build`)")
    data = _manifest(root)
    fingerprint = None
    if data:  # the data build's per-dataset content hashes, reduced to one fingerprint
        hashes = {name: d.get("hash") for name, d in sorted(data.get("datasets", {}).items())}
        fingerprint = data.get("fingerprint") or (hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:16]
                                                  if hashes else None)  # fmt: skip
    return root, fingerprint


def _manifest(root: Path) -> dict:
    path = root / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_data_source(cfg: TrainConfig, root: Path, model_dir: Path) -> tuple[str, str]:
    """("encoded" or "images", why). Pre-encoded tensors are used when the build wrote them for every
    dataset of the stage, with this model's encoders and the reference size this job trains at."""
    encoded = _manifest(root).get("encoded") or {}
    problems = []
    if not encoded:
        problems.append("the shards hold no pre-encoded tensors (build with encode=true)")
    else:
        missing = [name for name, _ in cfg.data_mix() if not any((root / "encoded" / name).glob("*.parquet"))]
        if missing:
            problems.append(f"no encoded shards for {missing}")
        size = cfg.musar.encoded_condition_size
        if encoded.get("condition_size") != size:
            problems.append(f"references were encoded at {encoded.get('condition_size')}px but musar.condition_size / "
                            f"condition_compaction gives {size}px")  # fmt: skip
        if Path(str(encoded.get("model"))).resolve() != model_dir:
            problems.append(f"they were encoded with {encoded.get('model')}, this job trains {model_dir}")
    if cfg.data.source == "images":
        return "images", "data.source=images"
    if not problems:
        return "encoded", f"pre-encoded tensors in {root / 'encoded'}"
    if cfg.data.source == "encoded":
        raise ValueError("data.source=encoded, but " + "; ".join(problems))
    return "images", "images (" + "; ".join(problems) + ")"


def run_stage(cfg: TrainConfig) -> StageResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .loop import train_loop_per_worker
    from .tracking import start_run

    model_dir = resolve_flux_dir(cfg.model)
    shards, fingerprint = check_shards(cfg)
    init_lora = resolve_init_lora(cfg, model_dir)
    source, why = resolve_data_source(cfg, shards, model_dir)
    print(f"stage {cfg.stage}: training on {why}")
    output = Path(cfg.output_dir).expanduser().resolve()
    storage = cfg.resolved_storage()
    cfg.tracking.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    run_id = start_run(cfg, flat_params(to_dict(cfg)), tags={"stage": str(cfg.stage), "data_fingerprint": str(fingerprint)})

    train_cpus = cfg.num_workers * cfg.cpus_per_worker
    ensure_ray(min_cpus=train_cpus + 2)
    check_room_for_data(train_cpus)
    data_root = shards / "encoded" if source == "encoded" else shards
    datasets = {name: ray.data.read_parquet(str(data_root / name)) for name, _ in cfg.data_mix()}
    name = f"stage{cfg.stage}-{run_id or 'untracked'}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": to_dict(cfg), "model_dir": str(model_dir), "init_lora_dir": str(init_lora) if init_lora else None,
            "mlflow_run_id": run_id, "data_fingerprint": fingerprint, "storage_path": str(Path(storage) / name),
            "data_source": source,
        },  # fmt: skip
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),  # fmt: skip
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=cfg.faults.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),  # fmt: skip
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {cfg.stage} finished without a checkpoint: {result.error}")
    lora_dir = output / f"stage{cfg.stage}" / LORA_DIR
    with result.checkpoint.as_directory() as d:
        _replace_dir(Path(d) / LORA_DIR, lora_dir)
    if run_id:
        from .tracking import finish_run

        finish_run(cfg, run_id, lora_dir, model_dir, shards)
    print(f"stage {cfg.stage}: LoRA at {lora_dir}; checkpoint {result.checkpoint.path}; MLflow run {run_id}")
    return StageResult(lora_dir=lora_dir, run_id=run_id, metrics=dict(result.metrics or {}),
                       checkpoint_path=result.checkpoint.path)  # fmt: skip


def _replace_dir(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
