"""DeepSpeed engine for MUSAR: only the LoRA parameters train; the FLUX base stays frozen.

ZeRO-2 by default (optimizer states and gradients of the LoRA partitioned across workers); ZeRO-3
also partitions the frozen base weights. bf16 + NCCL on GPUs, fp32 + gloo on CPU
(``DS_ACCELERATOR=cpu``). The optimizer is torch's AdamW handed to DeepSpeed, so no DeepSpeed
optimizer op has to be compiled on CPU.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.effective_batch_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage == 3:
        # Save 16-bit weights gathered; the LoRA is saved separately from gathered parameters.
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    if cfg.mixed_precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.mixed_precision == "fp16":
        ds["fp16"] = {"enabled": True}
    return ds


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then constant or cosine decay to 0 over the stage."""
    warmup, total, schedule = cfg.optim.warmup_steps, cfg.total_steps, cfg.optim.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def build_engine(model: torch.nn.Module, cfg: TrainConfig):
    """deepspeed.initialize over the MUSAR transformer with an AdamW on its LoRA parameters."""
    import deepspeed

    params = [p for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad (did the model get its LoRA?)")
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    return engine, optimizer, scheduler
