"""Metric models from local folders, loaded strictly, plus tiny random stand-ins for tests.

Nothing here downloads: the user points ``dino_model`` and ``clip_model`` at folders fetched
beforehand (on a machine with internet: ``huggingface-cli download facebook/dino-vits16 --local-dir
/models/dino-vits16`` and ``huggingface-cli download timm/vit_base_patch32_clip_224.openai --local-dir
/models/clip-vit-b-32``).

- ``dino_model``: a transformers ViT folder (``config.json`` + safetensors/bin weights) of DINO v1
  ViT-S/16, loaded as ``ViTModel(add_pooling_layer=False)``: DINO checkpoints carry no pooler, and a
  pooler would be a randomly initialised layer.
- ``clip_model``: an open_clip folder (``open_clip_config.json`` with ``model_cfg`` and
  ``preprocess_cfg``, and ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), the
  layout of open_clip's hub repos, loaded through open_clip's ``local-dir:`` schema so the folder's
  own config (QuickGELU for OpenAI weights, image size, normalisation) applies.

Strict means: a missing folder, config or weight file, and any missing, unexpected or mis-shaped
weight is a :class:`MetricModelError` naming the config key, never a silently random layer. The
tiny builders write folders of the same layouts, so tests go through this exact loading code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DINO_KEY, CLIP_KEY = "dino_model", "clip_model"
DINO_EXPECTED = "DINO v1 ViT-S/16 in transformers format (facebook/dino-vits16)"
CLIP_EXPECTED = "CLIP ViT-B/32 in open_clip format (e.g. timm/vit_base_patch32_clip_224.openai)"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pth", "*.pt")
# What the paper's metrics use; other shapes run (tests use tiny ones) but are flagged as non-standard.
STANDARD_DINO = {"model_type": "vit", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                 "patch_size": 16}  # fmt: skip
STANDARD_CLIP = {"embed_dim": 512, "vision_cfg.width": 768, "vision_cfg.layers": 12, "vision_cfg.patch_size": 32,
                 "vision_cfg.image_size": 224, "text_cfg.width": 512, "text_cfg.layers": 12}  # fmt: skip


class MetricModelError(ValueError):
    """A metric model folder is missing or does not match its model exactly; the message names the config key."""


def _folder(path: str | Path | None, key: str, expected: str) -> Path:
    if path is None or str(path).strip() == "":
        raise MetricModelError(f"{key} is not set: point it at a local folder holding {expected} (nothing is downloaded)")
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise MetricModelError(f"{key}: {folder} does not exist; it must be a local folder holding {expected}")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise MetricModelError(f"{key}: {folder} holds no weight file ({', '.join(WEIGHT_PATTERNS)}); expected {expected}")
    return folder


def _dotted(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
    return cfg


def dino_config(path: str | Path | None, key: str = DINO_KEY) -> dict:
    folder = _folder(path, key, DINO_EXPECTED)
    if not (folder / "config.json").is_file():
        raise MetricModelError(f"{key}: {folder} has no config.json; expected {DINO_EXPECTED}")
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "vit":
        raise MetricModelError(f"{key}: {folder} holds a {cfg.get('model_type')!r} model, not a ViT; expected {DINO_EXPECTED}")
    return cfg


def clip_config(path: str | Path | None, key: str = CLIP_KEY) -> dict:
    folder = _folder(path, key, CLIP_EXPECTED)
    cfg_file = folder / "open_clip_config.json"
    if not cfg_file.is_file():
        raise MetricModelError(f"{key}: {folder} has no open_clip_config.json; expected {CLIP_EXPECTED}")
    cfg = json.loads(cfg_file.read_text())
    if "model_cfg" not in cfg:
        raise MetricModelError(f"{key}: {cfg_file} has no 'model_cfg'")
    return cfg


def load_dino(path: str | Path | None, key: str = DINO_KEY, device: str = "cpu"):
    """``ViTModel`` without pooling layer, float32, eval mode; any weight mismatch is an error."""
    import torch
    from transformers import ViTModel

    dino_config(path, key)
    folder = Path(path).expanduser().resolve()
    try:
        model, info = ViTModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True,
                                               local_files_only=True, dtype=torch.float32)  # fmt: skip
    except (OSError, ValueError, RuntimeError) as err:
        raise MetricModelError(f"{key}: cannot load {folder} as {DINO_EXPECTED}: {err}") from err
    problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}" for k, v in problems.items())
        raise MetricModelError(f"{key}: the weights in {folder} do not match a ViTModel without pooling layer ({detail})")
    return model.eval().to(device)


@dataclass
class ClipParts:
    model: object
    preprocess: object  # open_clip's validation transform (resize shorter side, centre crop, normalise)
    tokenizer: object


def load_clip(path: str | Path | None, key: str = CLIP_KEY, device: str = "cpu") -> ClipParts:
    """open_clip model + its own eval transform + tokenizer from a ``local-dir:`` folder, loaded strictly."""
    import open_clip

    clip_config(path, key)
    folder = Path(path).expanduser().resolve()
    try:
        # require_pretrained: open_clip would otherwise warn and return a random model when no weights load.
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{folder}", require_pretrained=True, pretrained_image=False, pretrained_text=False, device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise MetricModelError(f"{key}: the weights in {folder} do not load strictly into its open_clip config: {err}") from err
    return ClipParts(model.eval(), preprocess, tokenizer)


def metric_model_info(dino_path: str | Path, clip_path: str | Path) -> dict:
    """What a run logs about its metric models: paths, fingerprints and whether they are the paper's."""
    from .fingerprints import folder_fingerprint

    dino, clip = dino_config(dino_path), clip_config(clip_path)["model_cfg"]
    return {
        "dino_model": str(Path(dino_path).expanduser().resolve()),
        "dino_fingerprint": folder_fingerprint(Path(dino_path).expanduser()),
        "dino_standard": all(dino.get(k) == v for k, v in STANDARD_DINO.items()),
        "clip_model": str(Path(clip_path).expanduser().resolve()),
        "clip_fingerprint": folder_fingerprint(Path(clip_path).expanduser()),
        "clip_standard": all(_dotted(clip, k) == v for k, v in STANDARD_CLIP.items()),
    }


# ---- tiny random models (tests) --------------------------------------------------------------------
TINY_DINO_CONFIG = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        image_size=224, patch_size=16)  # fmt: skip
# The real CLIP BPE vocabulary size (open_clip bundles the vocab, so the tokenizer works offline).
TINY_CLIP_MODEL_CFG = {"embed_dim": 16,
                       "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip


def build_tiny_dino(path: str | Path, seed: int = 0) -> Path:
    """A DINO-v1-style ViT folder (no pooler, 224 px, patch 16), random weights, via ``save_pretrained``."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(**TINY_DINO_CONFIG), add_pooling_layer=False).save_pretrained(path)
    return Path(path)


def build_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """An open_clip ``local-dir`` folder: tiny ViT CLIP config + random weights as ``open_clip_model.safetensors``."""
    import open_clip
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_MODEL_CFG)
    preprocess = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}  # fmt: skip
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_MODEL_CFG, "preprocess_cfg": preprocess}, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors")
    return path
