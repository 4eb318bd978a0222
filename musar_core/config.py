"""The model-level switches of MUSAR, in one typed object.

Every choice that changes what a trained LoRA means (ranks, target modules, RoPE scheme,
routing switches) lives here so that checkpoints can record it and refuse a mismatched load.
Defaults follow the paper (section 4.1) and ``DESIGN.md`` section 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Token-wise linears of a FLUX double-stream block, relative to the block (DESIGN.md section 1).
DOUBLE_BLOCK_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
# Token-wise linears of a FLUX single-stream block, relative to the block.
SINGLE_BLOCK_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "proj_mlp",
    "proj_out",
)

# Condition image plane k sits on RoPE axis 0 at k + 1 (FLUX.1 Kontext style); the target is plane 0.
ROPE_SCHEME_PLANE_OFFSET = "plane_offset_v1"
# Condition k sits on the target's plane, in the (k + 1)-th panel to the left of column 0, like the left
# part of a diptych (OminiControl's shifted positions for subject conditions; README, toy study).
ROPE_SCHEME_LEFT_PANELS = "left_panels_v1"
ROPE_SCHEMES = (ROPE_SCHEME_PLANE_OFFSET, ROPE_SCHEME_LEFT_PANELS)


@dataclass(frozen=True)
class MusarConfig:
    """What MUSAR adds to a stock FLUX transformer.

    Ablation switches (paper section 4.4): ``static_routing=False`` lets prompt and conditions,
    and conditions among themselves, attend to each other; ``shared_lora=True`` puts one LoRA on
    every token, the prompt included (the "w/o bias mitigation" variant, together with
    ``static_routing=False``); ``dynamic_routing=False`` lets every target token see every condition.
    """

    subject_rank: int = 128
    noise_rank: int = 4
    # alpha = rank keeps the LoRA scale at 1; the paper gives ranks only.
    subject_alpha: float | None = None
    noise_alpha: float | None = None
    double_block_targets: tuple[str, ...] = DOUBLE_BLOCK_LORA_TARGETS
    single_block_targets: tuple[str, ...] = SINGLE_BLOCK_LORA_TARGETS

    static_routing: bool = True
    dynamic_routing: bool = True
    shared_lora: bool = False
    # Also block cond[k] -> target, so conditions depend only on themselves (cacheable K/V).
    isolate_conditions: bool = False
    # Block indices (0..num_layers+num_single_layers-1, double blocks first) that route
    # dynamically; None means all of them, as the paper does.
    dynamic_routing_layers: tuple[int, ...] | None = None
    # Not the paper: block k computes the routes and every later routed block reuses them, for a base
    # whose later blocks ground the subjects' words worse than an early one (the toy study). None:
    # every routed block computes its own (eqs. 2-4 per layer, as the paper does).
    routes_from_layer: int | None = None

    rope_scheme: str = ROPE_SCHEME_PLANE_OFFSET
    condition_size: int = 512
    # Compact conditions (as OminiControl2 and UNO do for several references): encode references at
    # condition_size / f and scale their RoPE positions by f, so a compact reference spans the same
    # position range as a full one with 1/f^2 of the tokens. 1 = the paper's full-size conditions.
    condition_compaction: int = 1
    condition_prompt_max_tokens: int = 64
    # "routed": block-sparse execution, no dense mask; "reference": explicit boolean mask + SDPA.
    attention_impl: str = "routed"
    # diffusers attention-dispatch backend name for the unmasked group calls (None: diffusers' default).
    attention_backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("subject_rank", "noise_rank", "condition_size", "condition_compaction", "condition_prompt_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MusarConfig.{name} must be a positive integer, got {value!r}")
        if self.rope_scheme not in ROPE_SCHEMES:
            raise ValueError(f"MusarConfig.rope_scheme must be one of {ROPE_SCHEMES}, got {self.rope_scheme!r}")
        if self.attention_impl not in ("routed", "reference"):
            raise ValueError(f"MusarConfig.attention_impl must be 'routed' or 'reference', got {self.attention_impl!r}")
        if self.isolate_conditions and not self.static_routing:
            raise ValueError(
                "MusarConfig.isolate_conditions=True needs static_routing=True: isolating conditions "
                "from the target while letting them see the prompt and each other is contradictory"
            )
        if self.condition_size % 16:
            raise ValueError(f"MusarConfig.condition_size must be a multiple of 16, got {self.condition_size}")
        if self.condition_size % (16 * self.condition_compaction):
            raise ValueError(
                f"MusarConfig.condition_compaction={self.condition_compaction} leaves a {self.condition_size}px reference "
                f"at {self.condition_size / self.condition_compaction:g}px, not a multiple of 16: choose a factor that "
                "divides condition_size / 16"
            )
        if self.dynamic_routing_layers is not None:
            object.__setattr__(self, "dynamic_routing_layers", tuple(int(i) for i in self.dynamic_routing_layers))
        if self.routes_from_layer is not None:
            if not isinstance(self.routes_from_layer, int) or self.routes_from_layer < 0:
                raise ValueError(f"MusarConfig.routes_from_layer must be a block index >= 0, got {self.routes_from_layer!r}")
            if self.dynamic_routing_layers is not None and self.routes_from_layer not in self.dynamic_routing_layers:
                raise ValueError(
                    f"MusarConfig.routes_from_layer={self.routes_from_layer} is not one of dynamic_routing_layers "
                    f"{self.dynamic_routing_layers}: that block computes no routes to share"
                )
        object.__setattr__(self, "double_block_targets", tuple(self.double_block_targets))
        object.__setattr__(self, "single_block_targets", tuple(self.single_block_targets))

    @property
    def encoded_condition_size(self) -> int:
        """The pixel size references are encoded at (condition_size / condition_compaction)."""
        return self.condition_size // self.condition_compaction

    @property
    def subject_scale(self) -> float:
        return (self.subject_alpha or self.subject_rank) / self.subject_rank

    @property
    def noise_scale(self) -> float:
        return (self.noise_alpha or self.noise_rank) / self.noise_rank

    def replace(self, **changes) -> "MusarConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "MusarConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MusarConfig fields: {unknown}")
        return cls(**data)


__all__ = [
    "DOUBLE_BLOCK_LORA_TARGETS",
    "SINGLE_BLOCK_LORA_TARGETS",
    "ROPE_SCHEME_LEFT_PANELS",
    "ROPE_SCHEME_PLANE_OFFSET",
    "MusarConfig",
]
