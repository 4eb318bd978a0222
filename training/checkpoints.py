"""Checkpoints of a training stage: DeepSpeed state for exact resume plus the LoRA folder.

Each worker writes its own files into a fresh local directory (DeepSpeed's per-rank optimizer
shards, its RNG state) and hands it to ``ray.train.report``; Ray Train merges the ranks' files into
one checkpoint in storage and registers it only once every file is there, so a crash mid-save
never leaves a checkpoint that looks complete. Frozen FLUX weights are never written.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"
LORA_DIR = "lora"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


@contextlib.contextmanager
def gathered(params, zero_stage: int):
    """Full LoRA tensors on every rank (ZeRO-3 partitions them; other stages keep them whole)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def write_checkpoint(directory: Path, engine, model, *, rank: int, step: int, zero_stage: int, lora_metadata: dict,
                     state: dict) -> None:  # fmt: skip
    """Collective: every rank must call it with its own (empty) ``directory``."""
    engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={"step": step}, exclude_frozen_parameters=True)
    with gathered(model.lora_parameters(), zero_stage):
        if rank == 0:
            model.save_lora(directory / LORA_DIR, **lora_metadata)
    torch.save(rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))


def read_checkpoint(directory: Path, engine, *, rank: int) -> dict:
    """Restore DeepSpeed (LoRA weights, optimizer, LR schedule) and this rank's RNG; returns the trainer state."""
    engine.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=False)
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((directory / STATE_FILE).read_text())
