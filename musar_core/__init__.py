"""MUSAR on FLUX: reference conditions, static and dynamic attention routing, token-routed LoRA.

Pure PyTorch + diffusers + peft; this package never imports Ray.
"""

from .conditions import ConditionTokens, condition_image_ids, image_ids, pack_latents, text_ids, unpack_latents
from .config import MusarConfig
from .layout import PROMPT, TARGET, TokenLayout, cond_group
from .pipeline import MUSARPipeline, MUSARPipelineOutput, RoutingTrace
from .routing import AttentionRouter, RoutingRecord, RoutingRules
from .subjects import Subject
from .transformer import MusarOutput, MusarTransformer

__all__ = [
    "MUSARPipeline",
    "MUSARPipelineOutput",
    "RoutingTrace",
    "Subject",
    "AttentionRouter",
    "ConditionTokens",
    "MusarConfig",
    "MusarOutput",
    "MusarTransformer",
    "PROMPT",
    "RoutingRecord",
    "RoutingRules",
    "TARGET",
    "TokenLayout",
    "cond_group",
    "condition_image_ids",
    "image_ids",
    "pack_latents",
    "text_ids",
    "unpack_latents",
]

__version__ = "0.1.0"
