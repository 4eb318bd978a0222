"""FLOP model of one MUSAR step, at any FLUX shape: where the cost of c subjects goes.

Per block and token, FLUX's token-wise linears cost 12 D^2 multiply-adds in both block kinds
(double: q, k, v, out + a 4x MLP; single: q, k, v + a 4x MLP in + a 5D->D out), i.e. 24 D^2 FLOPs.
Attention costs 4 D FLOPs per (query, key) pair (QK^T and AV over all heads). Modulation,
norms and RoPE are O(D) per token and ignored. Dynamic routing adds Q_X K_T^T once more:
2 D FLOPs per (target, prompt) pair.

Variants: ``plain`` FLUX without conditions; ``dense`` concatenation (every pair); ``routed`` (static
+ dynamic routing, blocked pairs skipped; conditions see the target unless isolated); ``cached``
(isolated conditions: K/V computed by a one-off condition pass, steps run on prompt + target only).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int = 3072
    layers: int = 57  # 19 double + 38 single
    prompt: int = 512
    target: int = 1024  # 512 px
    cond_image: int = 1024  # 512 px reference
    cond_prompt: int = 64

    @property
    def cond(self) -> int:
        return self.cond_image + self.cond_prompt


def _layer(shape: Shape, tokens: int, pairs: int, routing_pairs: int = 0) -> float:
    d = shape.hidden
    return 24 * d * d * tokens + 4 * d * pairs + 2 * d * routing_pairs


def step_flops(shape: Shape, c: int, variant: str, isolate: bool = False, dynamic: bool = True) -> float:
    """FLOPs of one denoising step (all layers) of ``variant`` with ``c`` conditions."""
    m, n, lc = shape.prompt, shape.target, shape.cond
    if variant == "plain" or c == 0:
        tokens, pairs, routing = m + n, (m + n) ** 2, 0
    elif variant == "dense":
        tokens = m + n + c * lc
        pairs, routing = tokens**2, 0
    elif variant in ("routed", "cached"):
        routed_target = dynamic and c >= 2
        target_keys = m + n + (lc if routed_target else c * lc)
        pairs = m * (m + n) + n * target_keys
        routing = n * m if routed_target else 0
        if variant == "routed":
            tokens = m + n + c * lc
            pairs += c * lc * (lc if isolate else lc + n)
        else:
            tokens = m + n
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return shape.layers * _layer(shape, tokens, pairs, routing)


def condition_pass_flops(shape: Shape, c: int) -> float:
    """The one-off pass that fills the condition cache: c isolated conditions through every layer."""
    return shape.layers * _layer(shape, c * shape.cond, c * shape.cond**2)


def generation_flops(shape: Shape, c: int, variant: str, steps: int = 28, **kw) -> float:
    total = steps * step_flops(shape, c, variant, **kw)
    return total + (condition_pass_flops(shape, c) if variant == "cached" and c else 0.0)


def relative(shape: Shape, c: int, variant: str, per: str = "step", steps: int = 28, **kw) -> float:
    """Cost relative to plain FLUX without conditions, per step or per ``steps``-step generation."""
    if per == "step":
        return step_flops(shape, c, variant, **kw) / step_flops(shape, 0, "plain")
    return generation_flops(shape, c, variant, steps, **kw) / generation_flops(shape, 0, "plain", steps)
