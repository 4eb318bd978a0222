"""Attention with log-sum-exp: the exact merge the condition cache's steps rely on."""

import pytest
import torch
import torch.nn.functional as F

from musar_core.lse_attention import _math, attention_with_lse, merge_attention


def sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)


def qkv(batch=2, lq=7, lk=11, heads=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, lq, heads, dim, generator=g), torch.randn(batch, lk, heads, dim, generator=g),
            torch.randn(batch, lk, heads, dim, generator=g))  # fmt: skip


def test_fused_cpu_kernel_equals_math_with_and_without_padding():
    q, k, v = qkv()
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 8:] = False
    for mask in (None, valid[:, None, None, :]):
        out, lse = attention_with_lse(q, k, v, mask)
        ref_out, ref_lse = _math(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        torch.testing.assert_close(out, ref_out.transpose(1, 2), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse.transpose(1, 2), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out, sdpa(q, k, v, mask), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("parts", [2, 4])
def test_merging_disjoint_key_sets_equals_attention_over_their_union(parts):
    q, k, v = qkv(lk=20)
    valid = torch.rand(2, 20, generator=torch.Generator().manual_seed(1)) > 0.3
    valid[:, ::5] = True  # every part keeps at least one key
    cuts = torch.linspace(0, 20, parts + 1).long().tolist()
    out = lse = None
    for a, b in zip(cuts, cuts[1:]):
        piece = attention_with_lse(q, k[:, a:b], v[:, a:b], valid[:, None, None, a:b])
        out, lse = piece if out is None else merge_attention(out, lse, *piece)
    torch.testing.assert_close(out, sdpa(q, k, v, valid[:, None, None, :]), atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_log_sum_exp():
    """The fused kernels give no gradient for the log-sum-exp; with autograd on, the math path runs."""
    q, k, v = (x.requires_grad_() for x in qkv(lk=12))
    a, b = attention_with_lse(q, k[:, :5], v[:, :5]), attention_with_lse(q, k[:, 5:], v[:, 5:])
    merged, _ = merge_attention(*a, *b)
    grads = torch.autograd.grad(merged.square().sum(), (q, k, v))
    ref = torch.autograd.grad(sdpa(q, k, v).square().sum(), (q, k, v))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bfloat16_merge_stays_close_to_float32():
    q, k, v = qkv(lk=16)
    a = attention_with_lse(*(x.bfloat16() for x in (q, k[:, :6], v[:, :6])))
    b = attention_with_lse(*(x.bfloat16() for x in (q, k[:, 6:], v[:, 6:])))
    merged, _ = merge_attention(*a, *b)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.float(), sdpa(q, k, v), atol=3e-2, rtol=3e-2)
