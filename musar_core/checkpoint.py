"""MUSAR LoRA folders: peft-format adapters plus the metadata that says what they mean.

Layout of a folder::

    musar_lora.json                    metadata (below)
    subject/adapter_config.json        peft LoraConfig
    subject/adapter_model.safetensors  peft keys, e.g. transformer_blocks.0.attn.to_q.lora_A.weight
    noise/...                          (or shared/ for the shared_lora ablation)

A LoRA only means something together with the base model, ranks, target modules, RoPE scheme and
routing it was trained with, so those are recorded and a load into a different setup is refused
with a message naming each mismatch. Saves are atomic: written beside the destination, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .lora import adapter_names, inject_adapters, target_module_names

if TYPE_CHECKING:
    from .transformer import MusarTransformer

logger = logging.getLogger(__name__)

METADATA_FILE = "musar_lora.json"
FORMAT_VERSION = 1
ARCHITECTURE_KEYS = (
    "patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
    "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope",
)  # fmt: skip
# A mismatch here makes the weights mean something else: refuse.
STRICT_FIELDS = (
    "base_config_hash", "subject_rank", "noise_rank", "subject_alpha", "noise_alpha", "double_block_targets",
    "single_block_targets", "shared_lora", "static_routing", "isolate_conditions", "rope_scheme",
)  # fmt: skip
# Inference-time choices: a mismatch is allowed (e.g. the dynamic-routing ablation) but logged.
ADVISORY_FIELDS = ("dynamic_routing", "condition_size", "condition_compaction", "condition_prompt_max_tokens")


def base_config_hash(transformer_or_config) -> str:
    """Hash of the architecture keys of a FLUX transformer (or of its config mapping)."""
    cfg = dict(getattr(transformer_or_config, "config", transformer_or_config))
    arch = {k: (list(cfg[k]) if isinstance(cfg.get(k), (tuple, list)) else cfg.get(k)) for k in ARCHITECTURE_KEYS}
    if arch["out_channels"] is None:
        arch["out_channels"] = arch["in_channels"]
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def lora_metadata(model: "MusarTransformer", **extra) -> dict:
    cfg = model.config.to_dict()
    meta = {
        "format": "musar-lora",
        "format_version": FORMAT_VERSION,
        "base_model": str(model.transformer.config.get("_name_or_path", "") or ""),
        "base_config_hash": base_config_hash(model.transformer),
        **{k: cfg[k] for k in STRICT_FIELDS[1:] + ADVISORY_FIELDS},
        "adapters": list(adapter_names(model.config)),
        "training_stage": None,
        "data_fingerprint": None,
    }
    meta.update(extra)
    return meta


def save_lora(model: "MusarTransformer", path: str | os.PathLike, **extra) -> Path:
    """Write the adapters and metadata; ``extra`` (training_stage, data_fingerprint, ...) goes in the metadata."""
    if not model.has_lora:
        raise ValueError("nothing to save: this transformer has no LoRA adapters (call add_lora() first)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        targets = target_module_names(model.transformer, model.config)
        for name in adapter_names(model.config):
            state = _adapter_state(model.transformer, name)
            (tmp / name).mkdir()
            save_file(state, tmp / name / "adapter_model.safetensors", metadata={"format": "pt"})
            rank = model.config.noise_rank if name == "noise" else model.config.subject_rank
            alpha = (model.config.noise_alpha if name == "noise" else model.config.subject_alpha) or rank
            adapter_config = {
                "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
                "target_modules": targets, "base_model_name_or_path": lora_metadata(model)["base_model"],
            }  # fmt: skip
            (tmp / name / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        (tmp / METADATA_FILE).write_text(json.dumps(lora_metadata(model, **extra), indent=2, default=str))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    meta_file = Path(path) / METADATA_FILE
    if not meta_file.is_file():
        raise ValueError(f"{path} is not a MUSAR LoRA folder: {METADATA_FILE} is missing")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != "musar-lora" or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} version {meta.get('format_version')!r}")
    return meta


def check_compatible(meta: dict, model: "MusarTransformer") -> None:
    """Raise ValueError naming every strict field where the checkpoint and the model differ."""
    current = lora_metadata(model)
    mismatches = [f"{k}: checkpoint has {meta.get(k)!r}, model has {current[k]!r}" for k in STRICT_FIELDS
                  if _norm(meta.get(k)) != _norm(current[k])]  # fmt: skip
    if mismatches:
        raise ValueError("MUSAR LoRA does not fit this model/config:\n  " + "\n  ".join(mismatches))
    for k in ADVISORY_FIELDS:
        if _norm(meta.get(k)) != _norm(current[k]):
            logger.warning("MUSAR LoRA was trained with %s=%r, running with %r", k, meta.get(k), current[k])


def load_lora(model: "MusarTransformer", path: str | os.PathLike) -> dict:
    """Check the metadata, inject adapters if needed, load their weights exactly (no missing/extra keys)."""
    path = Path(path)
    meta = read_metadata(path)
    check_compatible(meta, model)
    if not model.has_lora:
        inject_adapters(model.transformer, model.config)
    params = dict(model.transformer.named_parameters())
    for name in adapter_names(model.config):
        state = load_file(path / name / "adapter_model.safetensors")
        expected = _adapter_state(model.transformer, name).keys()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path / name}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        with torch.no_grad():
            for key, value in state.items():
                target = params[_internal_key(key, name)]
                if target.shape != value.shape:
                    raise ValueError(f"{path / name}: {key} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
                target.copy_(value.to(target.dtype))
    return meta


def _adapter_state(transformer, name: str) -> dict[str, torch.Tensor]:
    """peft's state-dict keys (adapter name removed) -> tensors, for one adapter."""
    out = {}
    for key, param in transformer.named_parameters():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.{name}."
            if marker in key:
                out[key.replace(marker, f".{part}.")] = param.detach().contiguous()
    return out


def _internal_key(peft_key: str, name: str) -> str:
    for part in ("lora_A", "lora_B"):
        if f".{part}." in peft_key:
            return peft_key.replace(f".{part}.", f".{part}.{name}.")
    raise KeyError(peft_key)


def _norm(value):
    return list(value) if isinstance(value, tuple) else value
