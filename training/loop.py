"""The per-worker training loop run by Ray Train's ``TorchTrainer``.

Per optimizer step: ``grad_accum`` homogeneous micro-batches, each drawn from one of the stage's
datasets (stage 2: diptych with probability 0.8, else single; the draw is seeded by the step, so
all workers take the same kind and a resumed run draws the same kinds). Noise and timesteps are
seeded by (seed, step, micro-batch, rank): after a resume the sampling continues from the step,
although Ray Data does not promise the same streaming order of rows.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import time
from pathlib import Path

import torch

from musar.config import from_dict

from .batches import encode_samples, panel_routes, samples_from_batch
from .checkpoints import read_checkpoint, write_checkpoint
from .config import TrainConfig
from .encoded import encoded_batch, pixels_per_token


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def choose_dataset(cfg: TrainConfig, step: int, micro: int) -> str:
    mix = cfg.data_mix()
    if len(mix) == 1:
        return mix[0][0]
    u = torch.rand(1, generator=torch.Generator().manual_seed(_seed(cfg.seed, "mix", step, micro))).item()
    acc = 0.0
    for name, share in mix:
        acc += share
        if u < acc:
            return name
    return mix[-1][0]


def _batches(shard, batch_size: int):
    """Endless micro-batches from one worker's dataset shard (a new epoch when one ends)."""
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"a dataset shard holds fewer rows than one micro-batch ({batch_size})")


def train_loop_per_worker(config: dict) -> None:
    cfg: TrainConfig = from_dict(TrainConfig, config["train"])
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(cfg.cpus_per_worker)
    import deepspeed
    import ray.train
    import ray.train.torch

    from musar_core import MusarTransformer
    from musar_core.encoding import FluxEncoders
    from musar_core.objective import flow_matching_loss

    from .engine import build_engine

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)

    torch.manual_seed(cfg.seed)  # identical fresh-LoRA initialisation on every rank
    enc = None  # pre-encoded data needs no encoders on the worker
    token_pixels = pixels_per_token(config["model_dir"])
    if config.get("data_source", "images") == "images":
        enc = FluxEncoders.from_pretrained(config["model_dir"])
        for module in (enc.vae, enc.text_encoder, enc.text_encoder_2):
            module.to(device).requires_grad_(False)
    model = MusarTransformer.from_pretrained(config["model_dir"], config=cfg.musar)
    model.requires_grad_(False)
    if config.get("init_lora_dir"):
        model.load_lora(config["init_lora_dir"])
    else:
        model.add_lora()
    for p in model.lora_parameters():
        p.requires_grad_(True)
    model.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    model.to(device)
    engine, optimizer, scheduler = build_engine(model, cfg)

    step, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            step = resumed_from = read_checkpoint(Path(d), engine, rank=rank)["step"]

    streams = {name: _batches(ray.train.get_dataset_shard(name), cfg.micro_batch_size) for name, _ in cfg.data_mix()}
    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
        tracker = mlflow.start_run(run_id=config["mlflow_run_id"])
    lora_meta = {"training_stage": cfg.stage, "data_fingerprint": config.get("data_fingerprint")}
    kill = cfg.faults.kill_rank_at_step
    total = cfg.total_steps
    while step < total:
        started = time.perf_counter()
        losses, kinds = [], []
        for micro in range(cfg.grad_accum):
            name = choose_dataset(cfg, step, micro)
            sizes = dict(target_size=cfg.data.target_size, condition_size=cfg.musar.condition_size,
                         compaction=cfg.musar.condition_compaction, rope_scheme=cfg.musar.rope_scheme,
                         max_prompt_tokens=cfg.data.max_prompt_tokens,
                         max_condition_prompt_tokens=cfg.musar.condition_prompt_max_tokens, device=device, dtype=dtype)  # fmt: skip
            if enc is None:
                batch = encoded_batch(next(streams[name]), pixels_per_token=token_pixels, **sizes)
            else:
                batch = encode_samples(samples_from_batch(next(streams[name])), enc, **sizes)
            if cfg.diptych_routes == "panels":
                batch.routes = panel_routes(batch)
            generator = torch.Generator().manual_seed(_seed(cfg.seed, "noise", step, micro, rank))
            loss = flow_matching_loss(engine, batch, generator=generator, guidance=1.0,
                                      timestep_shift=cfg.timestep_shift)  # fmt: skip
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            kinds.append(name)
        step += 1
        elapsed = time.perf_counter() - started
        metrics = {
            "step": step,
            "loss": sum(losses) / len(losses),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "step_time_s": elapsed,
            "samples_per_s": cfg.effective_batch_size / elapsed,
            "diptych_share": sum(k.startswith("diptych") for k in kinds) / len(kinds),
            "resumed_from": -1 if resumed_from is None else resumed_from,
            "optimizer_step": _optimizer_step(optimizer),
        }
        if kill is not None and rank == kill[0] and step == kill[1]:
            marker = Path(config["storage_path"]) / f".killed-rank{rank}-step{step}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("fault injection: this worker killed itself once here\n")
                os.kill(os.getpid(), signal.SIGKILL)
        logging_step = step % cfg.log_every == 0 or step == total
        if tracker is not None and logging_step:
            import mlflow

            mlflow.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
        if step % cfg.checkpoint_every == 0 or step == total:
            with tempfile.TemporaryDirectory(prefix="musar-ckpt-") as tmp:
                write_checkpoint(Path(tmp), engine, model, rank=rank, step=step, zero_stage=cfg.zero_stage,
                                 lora_metadata=lora_meta, state={"stage": cfg.stage, "losses": losses})  # fmt: skip
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif logging_step:
            # Not every step: a worker holds one unread report, and Ray Train's controller reads it
            # only every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a report per fast step stalls the
            # worker (measured: tiny steps of 0.2 s took 2 s each).
            ray.train.report(metrics)
    if tracker is not None:
        import mlflow

        mlflow.end_run()


def _optimizer_step(optimizer) -> int:
    """Adam's own step counter of the first LoRA parameter (continues across a resume)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if "step" in state:
            return int(state["step"])
    return 0
