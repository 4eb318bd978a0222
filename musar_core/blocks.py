"""MUSAR's forward through one stock FLUX block.

The stock block forward gives all tokens of a stream one modulation and one set of LoRA weights;
MUSAR needs per-group modulation (conditions at t = 0 with their own pooled vector), per-token
LoRA and routed attention. So these functions drive the *same modules* of a stock
``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` in the same order of operations, and
differ only where MUSAR must: modulation per segment, :func:`routed_linear` instead of calling a
linear, and ``ctx.router`` instead of unmasked joint attention. With no conditions, no LoRA and no
routing they compute exactly what the stock blocks compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from .layout import Segment, TokenLayout
from .lora import RowPlan, routed_linear
from .routing import AttentionRouter


@dataclass
class TokenEmbeddings:
    """Which conditioning embedding modulates each token of a stream.

    ``stacked`` (B, U, D) holds the forward's U distinct embeddings (prompt and target share one);
    ``rows[stream]`` (S,) picks one per token, or is None when a single embedding
    (``single[stream]``) covers the stream, as in stock FLUX. Built once per forward so that a
    block's adaLN is one matmul over the U embeddings and one row gather, whatever the number of
    conditions: on a GPU the routed forward is bound by kernel launches (benchmarks/flux_scale_gpu.py).
    """

    stacked: torch.Tensor
    rows: dict[str, torch.Tensor | None]
    single: dict[str, torch.Tensor]

    @classmethod
    def build(cls, group_temb: dict[int, torch.Tensor], streams: dict[str, list[Segment]]) -> "TokenEmbeddings":
        slots: dict[int, int] = {}
        distinct: list[torch.Tensor] = []
        for temb in group_temb.values():
            if id(temb) not in slots:
                slots[id(temb)] = len(distinct)
                distinct.append(temb)
        stacked = torch.stack(distinct, dim=1)
        rows: dict[str, torch.Tensor | None] = {}
        single: dict[str, torch.Tensor] = {}
        for name, segments in streams.items():
            live = [(s.length, slots[id(group_temb[s.group])]) for s in segments if s.length]
            used = {slot for _, slot in live}
            if len(used) <= 1:
                rows[name], single[name] = None, distinct[next(iter(used), 0)]
            else:
                rows[name] = torch.cat([torch.full((length,), slot, dtype=torch.long, device=stacked.device)
                                        for length, slot in live])  # fmt: skip
        return cls(stacked, rows, single)


@dataclass
class BlockContext:
    """Everything a block needs about the current forward besides its own weights."""

    layout: TokenLayout
    router: AttentionRouter
    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) in joint order
    group_temb: dict[int, torch.Tensor]  # group id -> (B, D) conditioning embedding
    text_segments: list[Segment]
    image_segments: list[Segment]
    joint_segments: list[Segment]
    text_plan: RowPlan
    image_plan: RowPlan
    joint_plan: RowPlan
    embeddings: TokenEmbeddings = field(init=False)

    def __post_init__(self) -> None:
        streams = {"text": self.text_segments, "image": self.image_segments, "joint": self.joint_segments}
        self.embeddings = TokenEmbeddings.build(self.group_temb, streams)


def _modulation(norm: nn.Module, ctx: BlockContext, stream: str, chunks: int) -> list[torch.Tensor]:
    """adaLN parameters per token: each token gets the projection of its own group's embedding.

    Returns ``chunks`` tensors of shape (B, S, D), or (B, 1, D) when one embedding covers the stream.
    """
    emb = ctx.embeddings
    rows = emb.rows[stream]
    if rows is None:
        return [p[:, None] for p in norm.linear(norm.silu(emb.single[stream])).chunk(chunks, dim=1)]
    params = norm.linear(norm.silu(emb.stacked))  # (B, U, chunks * D)
    return list(params.index_select(1, rows).chunk(chunks, dim=-1))


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


def _rope(x: torch.Tensor, rope) -> torch.Tensor:
    return apply_rotary_emb(x, rope, sequence_dim=1)


def _feed_forward(ff: nn.Module, x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    for module in ff.net:
        if hasattr(module, "proj") and hasattr(module, "gelu"):  # diffusers GELU: proj then activation
            x = module.gelu(routed_linear(module.proj, x, plan))
        elif isinstance(module, nn.Linear) or hasattr(module, "base_layer"):
            x = routed_linear(module, x, plan)
        else:
            x = module(x)
    return x


def double_block_forward(block: nn.Module, text: torch.Tensor, image: torch.Tensor, ctx: BlockContext, layer: int):
    """One ``FluxTransformerBlock``: separate weights per stream, routed joint attention."""
    attn = block.attn
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block.norm1, ctx, "image", 6)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(block.norm1_context, ctx, "text", 6)
    norm_image = block.norm1.norm(image) * (1 + scale_msa) + shift_msa
    norm_text = block.norm1_context.norm(text) * (1 + c_scale_msa) + c_shift_msa

    q_img = attn.norm_q(_heads(routed_linear(attn.to_q, norm_image, ctx.image_plan), attn.head_dim))
    k_img = attn.norm_k(_heads(routed_linear(attn.to_k, norm_image, ctx.image_plan), attn.head_dim))
    v_img = _heads(routed_linear(attn.to_v, norm_image, ctx.image_plan), attn.head_dim)
    q_txt = attn.norm_added_q(_heads(routed_linear(attn.add_q_proj, norm_text, ctx.text_plan), attn.head_dim))
    k_txt = attn.norm_added_k(_heads(routed_linear(attn.add_k_proj, norm_text, ctx.text_plan), attn.head_dim))
    v_txt = _heads(routed_linear(attn.add_v_proj, norm_text, ctx.text_plan), attn.head_dim)

    lay = ctx.layout
    q = _rope(lay.to_joint(q_txt, q_img), ctx.rope)
    k = _rope(lay.to_joint(k_txt, k_img), ctx.rope)
    v = lay.to_joint(v_txt, v_img)
    out = ctx.router(layer, q, k, v).flatten(2, 3).to(q.dtype)
    out_text, out_image = lay.from_joint(out)

    image_attn = attn.to_out[1](routed_linear(attn.to_out[0], out_image.contiguous(), ctx.image_plan))
    text_attn = routed_linear(attn.to_add_out, out_text.contiguous(), ctx.text_plan)

    image = image + gate_msa * image_attn
    norm_image = block.norm2(image) * (1 + scale_mlp) + shift_mlp
    image = image + gate_mlp * _feed_forward(block.ff, norm_image, ctx.image_plan)

    text = text + c_gate_msa * text_attn
    norm_text = block.norm2_context(text) * (1 + c_scale_mlp) + c_shift_mlp
    text = text + c_gate_mlp * _feed_forward(block.ff_context, norm_text, ctx.text_plan)
    if text.dtype == torch.float16:
        text = text.clip(-65504, 65504)
    return text, image


def single_block_forward(block: nn.Module, x: torch.Tensor, ctx: BlockContext, layer: int) -> torch.Tensor:
    """One ``FluxSingleTransformerBlock`` over the joint sequence: parallel attention and MLP."""
    attn = block.attn
    residual = x
    shift, scale, gate = _modulation(block.norm, ctx, "joint", 3)
    norm_x = block.norm.norm(x) * (1 + scale) + shift
    mlp = block.act_mlp(routed_linear(block.proj_mlp, norm_x, ctx.joint_plan))

    q = _rope(attn.norm_q(_heads(routed_linear(attn.to_q, norm_x, ctx.joint_plan), attn.head_dim)), ctx.rope)
    k = _rope(attn.norm_k(_heads(routed_linear(attn.to_k, norm_x, ctx.joint_plan), attn.head_dim)), ctx.rope)
    v = _heads(routed_linear(attn.to_v, norm_x, ctx.joint_plan), attn.head_dim)
    out = ctx.router(layer, q, k, v).flatten(2, 3).to(q.dtype)

    x = residual + gate * routed_linear(block.proj_out, torch.cat([out, mlp], dim=2), ctx.joint_plan)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x
