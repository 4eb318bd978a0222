"""Attention that also returns its log-sum-exp, and the exact merge of attentions over disjoint key sets.

Why: softmax attention over the union of two key sets equals the mix of the attentions over each set,
weighted by their log-sum-exps. A cached generation step uses this so that the [prompt, target] keys
every query shares are attended once for all queries, and each condition adds one call over only its
own keys: no per-condition copy of the shared K/V, so the cost of a step stops growing with c beyond
the condition keys themselves.

The fused kernels (PyTorch's CPU flash kernel; CUDA flash for half precision, memory-efficient
otherwise) return the log-sum-exp but not its gradient, so whenever autograd needs one the explicit
math path runs instead. Tensors are (batch, tokens, heads, head_dim); log-sum-exps (batch, tokens,
heads) in float32.
"""

from __future__ import annotations

import math

import torch


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _math(q, k, v, mask):
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    lse = scores.logsumexp(dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v)
    return out, lse


def _fused(q, k, v, mask):
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=_additive(mask, q.dtype))
    if mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        return out, lse
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, _additive(mask, q.dtype), True)[:2]
    return out, lse[..., : q.shape[-2]]  # some versions pad the log-sum-exp's length to a block multiple


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp. ``attn_mask``: bool (True = may attend) or additive,
    broadcastable to (batch, heads, queries, keys)."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if needs_grad or q.device.type not in ("cpu", "cuda"):
        out, lse = _math(qh, kh, vh, attn_mask)
    else:
        out, lse = _fused(qh, kh, vh, attn_mask)
    return out.transpose(1, 2), lse.float().transpose(1, 2)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A and B (disjoint) from the attentions over A and over B."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse)[..., None]
    out = out_a.float() * weight_a + out_b.float() * (1.0 - weight_a)
    return out.to(out_a.dtype), lse
