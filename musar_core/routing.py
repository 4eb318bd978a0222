"""Attention routing: who may attend to whom, and the attention that obeys it.

Read top to bottom:

1. ``RoutingRules.allows`` - static routing (paper 3.2.2) as a relation between the query group
   and the key group: prompt <-> cond[k] blocked, cond[j] <-> cond[k] (j != k) blocked,
   cond[k] -> target blocked only with ``isolate_conditions``.
2. ``affinity_and_routes`` - dynamic routing (paper 3.3, eqs. 2-4): from the layer's own Q and K
   (after QK-norm and RoPE), S = softmax over prompt tokens of Q_X K_T^T / sqrt(d) per head,
   averaged over heads; S*[i, k] = mean of S over condition k's phrase span; route(i) = argmax_k.
   A target token then sees cond[route(i)] and no other condition. Routes may instead be given
   (``AttentionRouter(fixed_routes=...)``, e.g. a diptych's panels in training), or computed in one
   layer and reused by every later one (``routes_from_layer``; not the paper, which routes per layer).
3. ``routed_attention`` - the fast path: attention is computed only for allowed (query group,
   key group) pairs by slicing K/V per group and batching the target queries routed to each
   condition. No (L x L) mask ever exists; unmasked calls go through diffusers' attention dispatch.
4. ``reference_attention`` - the plain path: one explicit boolean mask and SDPA. Tests compare the
   fast path with it; nothing else should use it.
5. ``AttentionRouter`` - per-forward state: computes each layer's routes once, reuses them when
   gradient checkpointing recomputes the layer, and records routes and S* for visualisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .layout import PROMPT, TARGET, TokenLayout, span_weights
from .lse_attention import attention_with_lse, merge_attention

AttendFn = Callable[..., torch.Tensor]


# --- 1. static routing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RoutingRules:
    static_routing: bool = True
    dynamic_routing: bool = True
    isolate_conditions: bool = False

    def allows(self, query_group: int, key_group: int) -> bool:
        """May tokens of ``query_group`` attend to tokens of ``key_group``? (groups: layout ids)."""
        q_is_cond, k_is_cond = query_group >= 2, key_group >= 2
        if self.isolate_conditions and q_is_cond:
            return key_group == query_group
        if not self.static_routing:
            return True
        if q_is_cond and k_is_cond:
            return query_group == key_group  # inter-condition isolation
        if (query_group == PROMPT and k_is_cond) or (q_is_cond and key_group == PROMPT):
            return False  # prompt-condition decoupling
        return True

    def allowed_matrix(self, num_groups: int, device=None) -> torch.Tensor:
        """(G, G) bool: row = query group, column = key group."""
        return torch.tensor(
            [[self.allows(q, k) for k in range(num_groups)] for q in range(num_groups)], dtype=torch.bool, device=device
        )


# --- 2. dynamic routing --------------------------------------------------------------------------
def affinity_and_routes(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    span_weights: torch.Tensor | None = None,
    prompt_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S* (batch, n, c) and routes (batch, n) from joint-order q, k of shape (batch, L, heads, dim).

    ``span_weights`` (batch, m, c) defaults to the layout's own phrase spans (eq. 3 as a matmul);
    ``prompt_valid`` (batch, m) leaves padded prompt tokens out of the softmax.
    """
    t0, t1 = layout.group_ranges()[TARGET]
    q_x = q[:, t0:t1].transpose(1, 2)  # (B, H, n, D)
    k_t = k[:, : layout.prompt_len].transpose(1, 2)  # (B, H, m, D)
    logits = torch.matmul(q_x, k_t.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if prompt_valid is not None:
        logits = logits.masked_fill(~prompt_valid[:, None, None, :], float("-inf"))
    s = logits.float().softmax(dim=-1).mean(dim=1)  # eq. 2, averaged over heads: (B, n, m)
    weights = layout.span_weights(s.dtype, s.device) if span_weights is None else span_weights.to(s)
    affinity = torch.matmul(s, weights)  # eq. 3: (B, n, c)
    return affinity, affinity.argmax(dim=-1)  # eq. 4's argmax


# --- 3. fast path ----------------------------------------------------------------------------------
def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if merged and merged[-1][1] == s:
            merged[-1][1] = e
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _take(x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Rows of ``x`` (dim 1) in ``ranges``; a view when they form one run."""
    if len(ranges) == 1:
        return x[:, ranges[0][0] : ranges[0][1]]
    return torch.cat([x[:, s:e] for s, e in ranges], dim=1)


def _key_mask(key_valid: torch.Tensor | None, ranges: list[tuple[int, int]]) -> torch.Tensor | None:
    """Key-padding mask (B, 1, 1, Lk) for padded condition-prompt tokens; None when nothing is padded."""
    if key_valid is None:
        return None
    return _take(key_valid, ranges)[:, None, None, :]


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    rules: RoutingRules,
    routes: torch.Tensor | None,
    attend: AttendFn,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over joint-order (B, L, H, D) tensors that computes allowed pairs only.

    Query groups with the same allowed key set share one call. With ``routes`` (B, n), the target
    queries routed to condition r form one call over [prompt, target, cond[r]] keys: queries are
    gathered per sample (padded to the batch's largest count; padding rows are discarded), so the
    cost for the target does not grow with the number of conditions.
    """
    ranges = layout.group_ranges()
    groups = range(layout.num_groups)
    out: list[torch.Tensor | None] = [None] * layout.num_groups

    by_keys: dict[tuple[int, ...], list[int]] = {}
    for g in groups:
        if ranges[g][0] == ranges[g][1]:
            out[g] = q[:, ranges[g][0] : ranges[g][0]]  # an empty group (the condition-only pass)
            continue
        if g == TARGET and routes is not None:
            continue
        by_keys.setdefault(tuple(kg for kg in groups if rules.allows(g, kg)), []).append(g)
    for key_groups, query_groups in by_keys.items():
        q_ranges = _merge([ranges[g] for g in query_groups])
        k_ranges = _merge([ranges[g] for g in key_groups])
        o = attend(_take(q, q_ranges), _take(k, k_ranges), _take(v, k_ranges), attn_mask=_key_mask(key_valid, k_ranges))
        for g, piece in zip(sorted(query_groups), o.split([ranges[g][1] - ranges[g][0] for g in sorted(query_groups)], 1)):
            out[g] = piece

    if routes is not None and ranges[TARGET][1] > ranges[TARGET][0]:
        out[TARGET] = _routed_target_attention(q, k, v, layout, rules, routes, attend, key_valid)
    return torch.cat(out, dim=1)


def _routed_target_attention(q, k, v, layout, rules, routes, attend, key_valid):
    ranges = layout.group_ranges()
    t0, t1 = ranges[TARGET]
    shared = [ranges[g] for g in range(2) if rules.allows(TARGET, g)]

    def keys_for(r):
        k_ranges = _merge(shared + [ranges[2 + r]])
        return _take(k, k_ranges), _take(v, k_ranges), _key_mask(key_valid, k_ranges)

    return _attend_per_route(q[:, t0:t1], routes, layout.num_conditions, keys_for, attend)


def _route_groups(routes: torch.Tensor, num_conditions: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per condition r: positions (B, width_r) of the target queries routed to r, gathered per sample
    (in token order) and padded to the batch's largest count, and which of them are real (B, width_r);
    None where no sample routes a query to r. Padding positions hold some token of the sample (of
    any route): their outputs must be discarded (``valid``).

    One stable sort groups every route at once, and the widths are read from the device once per
    layer: on a GPU the forward is bound by how fast the host launches kernels, and a per-condition
    sort and read cost several launches and a queue drain each (benchmarks/flux_scale_gpu.py).
    Shape-only (meta) execution cannot read counts; it runs every query through each call.
    """
    batch, n = routes.shape
    counts = routes.new_zeros(batch, num_conditions).scatter_add_(1, routes, torch.ones_like(routes))
    widths = [n] * num_conditions if routes.is_meta else counts.amax(dim=0).tolist()
    order = torch.argsort(routes, dim=1, stable=True)  # grouped by route, token order within a route
    starts = counts.cumsum(dim=1) - counts
    groups: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for r, width in enumerate(widths):
        if width == 0:
            groups.append(None)
            continue
        j = torch.arange(width, device=routes.device)[None, :]
        index = (starts[:, r : r + 1] + j).clamp_(max=n - 1)
        groups.append((order.gather(1, index), j < counts[:, r : r + 1]))
    return groups


def _attend_per_route(q_x, routes, num_conditions, keys_for, attend) -> torch.Tensor:
    """Target queries routed to condition r form one call over ``keys_for(r)``; outputs scattered back
    (each position gets exactly one non-zero contribution, so the sum is exact)."""
    out = torch.zeros_like(q_x)
    for r, picked in enumerate(_route_groups(routes, num_conditions)):
        if picked is None:
            continue
        order, valid = picked
        index = order[:, :, None, None].expand(-1, -1, q_x.shape[2], q_x.shape[3])
        ks, vs, mask = keys_for(r)
        o = attend(torch.gather(q_x, 1, index), ks, vs, attn_mask=mask)
        out = out.scatter_add(1, index, o * valid[:, :, None, None].to(o.dtype))  # out of place: autograd
    return out


def cached_condition_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    routes: torch.Tensor | None,
    cond_kv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    attend: AttendFn,
) -> torch.Tensor:
    """Attention of a step whose conditions live in a cache (``isolate_conditions`` only).

    q/k/v hold just [prompt, target]; each condition's K/V for this layer comes from ``cond_kv``
    (computed once per generation). Prompt queries see [prompt, target]; target queries see
    [prompt, target] plus cond[route(i)] (or every condition without dynamic routing).

    Executed as one call of every query over the shared [prompt, target] keys, then for the target
    queries one call per condition over that condition's keys alone, merged exactly by log-sum-exp
    (``lse_attention``): the shared K/V are never copied per condition. ``attend`` serves the step
    without conditions.
    """
    if not cond_kv:
        return attend(q, k, v)
    m = layout.prompt_len
    shared, shared_lse = attention_with_lse(q, k, v)
    q_x = q[:, m:]
    if routes is None:
        out, lse = shared[:, m:], shared_lse[:, m:]
        for ck, cv, mask in cond_kv:
            out, lse = merge_attention(out, lse, *attention_with_lse(q_x, ck, cv, _padding(mask)))
        return torch.cat([shared[:, :m], out], dim=1)
    cond_out, cond_lse = torch.zeros_like(q_x), q_x.new_zeros(q_x.shape[:3], dtype=torch.float32)
    for (ck, cv, mask), picked in zip(cond_kv, _route_groups(routes, len(cond_kv))):
        if picked is None:
            continue
        index, valid = picked
        o, lse = attention_with_lse(torch.gather(q_x, 1, index[:, :, None, None].expand(-1, -1, *q_x.shape[2:])),
                                    ck, cv, _padding(mask))  # fmt: skip
        cond_out.scatter_add_(1, index[:, :, None, None].expand_as(o), o * valid[:, :, None, None].to(o.dtype))
        cond_lse.scatter_add_(1, index[:, :, None].expand_as(lse), lse.masked_fill(~valid[:, :, None], 0.0))
    out, _ = merge_attention(shared[:, m:], shared_lse[:, m:], cond_out, cond_lse)
    return torch.cat([shared[:, :m], out], dim=1)


def _padding(valid: torch.Tensor | None) -> torch.Tensor | None:
    return None if valid is None else valid[:, None, None, :]


# --- 4. reference path -----------------------------------------------------------------------------
def dense_mask(
    layout: TokenLayout, rules: RoutingRules, routes: torch.Tensor | None, key_valid: torch.Tensor | None, device
) -> torch.Tensor:
    """(B or 1, L, L) boolean mask, True = may attend. For tests and the reference path only."""
    labels = layout.group_labels(device)
    mask = rules.allowed_matrix(layout.num_groups, device)[labels][:, labels][None]
    if routes is not None:
        t0, t1 = layout.group_ranges()[TARGET]
        key_cond = labels - 2  # condition index of each key; negative for prompt/target keys
        is_cond_key = (key_cond >= 0)[None, None, :]
        routed = routes[:, :, None] == key_cond[None, None, :]  # (B, n, L)
        mask = mask.expand(routes.shape[0], -1, -1).clone()
        mask[:, t0:t1] &= ~is_cond_key | routed
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    return mask


def reference_attention(q, k, v, layout, rules, routes, key_valid=None) -> torch.Tensor:
    mask = dense_mask(layout, rules, routes, key_valid, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None])
    return out.transpose(1, 2)


# --- 5. per-forward state ----------------------------------------------------------------------------
def dispatch_attend(backend: str | None = None) -> AttendFn:
    """Unmasked (or key-padding-masked) group attention through diffusers' attention dispatch."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    def attend(q, k, v, attn_mask=None):
        if attn_mask is not None:  # key padding of condition prompts: native SDPA takes a broadcast mask
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
            ).transpose(1, 2)
        return dispatch_attention_fn(q, k, v, backend=backend)

    return attend


@dataclass
class ConditionCache:
    """Per-block K/V of every condition, computed once per generation (``isolate_conditions``).

    ``kv[layer][k]`` = (keys, values, key-padding mask or None) of cond[k] after QK-norm and RoPE.
    Valid for one set of references, condition prompts, guidance value and batch size.
    """

    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = field(default_factory=dict)
    num_conditions: int = 0
    batch_size: int = 0


@dataclass
class RoutingRecord:
    """Routes (B, n) and affinities S* (B, n, c) per block index, for one forward."""

    routes: dict[int, torch.Tensor] = field(default_factory=dict)
    affinity: dict[int, torch.Tensor] = field(default_factory=dict)


class AttentionRouter:
    """Routes one forward pass's attention calls; one instance per forward."""

    def __init__(
        self,
        layout: TokenLayout,
        rules: RoutingRules,
        *,
        dynamic_layers: tuple[int, ...] | None = None,
        routes_from_layer: int | None = None,
        impl: str = "routed",
        attend: AttendFn | None = None,
        key_valid: torch.Tensor | None = None,
        record: bool = False,
        capture: ConditionCache | None = None,
        cache: ConditionCache | None = None,
        cached_spans: torch.Tensor | None = None,
        fixed_routes: torch.Tensor | None = None,
    ) -> None:
        """``capture``: fill this cache with every condition's K/V (the condition-only pass).
        ``cache`` + ``cached_spans``: a step whose conditions come from a filled cache.
        ``fixed_routes`` (B, n): each target token's condition, given instead of computed (eqs. 2-4),
        in every routed layer; e.g. a diptych's panels in training where the base's attention to the
        subjects' words carries no location (the toy study). Ignored without dynamic routing.
        ``routes_from_layer`` k: layer k computes routes, later routed layers reuse them."""
        self.num_conditions = cache.num_conditions if cache is not None else layout.num_conditions
        spans = cached_spans if cache is not None else layout.phrase_spans
        if fixed_routes is not None:
            if fixed_routes.shape[-1] != layout.target_len or fixed_routes.ndim != 2:
                raise ValueError(f"fixed_routes must have shape (batch, {layout.target_len}), got {tuple(fixed_routes.shape)}")
            if not fixed_routes.is_meta and bool(((fixed_routes < 0) | (fixed_routes >= max(1, self.num_conditions))).any()):
                raise ValueError(f"fixed_routes must name conditions 0..{self.num_conditions - 1}")
        self.fixed_routes = fixed_routes
        if rules.dynamic_routing and self.num_conditions >= 2 and layout.target_len > 0 and spans is None \
                and fixed_routes is None:
            raise ValueError(
                f"dynamic routing with {self.num_conditions} conditions needs phrase_spans: the (start, length) "
                "of each condition's phrase in the prompt tokens; pass them, or set dynamic_routing=False"
            )
        self.capture, self.cache = capture, cache
        self._span_weights = None
        if cache is not None and spans is not None:  # the layout holds no conditions: spans come separately
            if spans.ndim != 3 or spans.shape[1:] != (cache.num_conditions, 2):
                raise ValueError(f"phrase_spans must have shape (batch, {cache.num_conditions}, 2), got {tuple(spans.shape)}")
            if not spans.is_meta and (bool((spans[..., 1] < 1).any()) or bool((spans[..., 0] < 0).any())
                                      or bool((spans.sum(-1) > layout.prompt_len).any())):  # fmt: skip
                raise ValueError(f"phrase_spans lie outside the {layout.prompt_len} prompt tokens: {spans.tolist()}")
            self._span_weights = span_weights(spans, layout.prompt_len, torch.float32, spans.device)
        self.layout, self.rules, self.impl = layout, rules, impl
        self.dynamic_layers = None if dynamic_layers is None else set(dynamic_layers)
        self.routes_from_layer = routes_from_layer
        self.attend = attend or dispatch_attend()
        self.key_valid = key_valid
        self.record = RoutingRecord() if record else None
        self._routes: dict[int, torch.Tensor] = {}

    def routes_for(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """This layer's routes, computed once per forward (a checkpoint recompute reuses them)."""
        if not self.rules.dynamic_routing or self.num_conditions < 2 or self.layout.target_len == 0:
            return None  # with one condition routing is a no-op
        if self.dynamic_layers is not None and layer not in self.dynamic_layers:
            return None
        if layer in self._routes:
            return self._routes[layer]
        affinity = None  # recorded as the one-hot of given routes
        if self.fixed_routes is not None:
            routes = self.fixed_routes.long()
        elif self._shares_routes(layer):
            routes = self._routes[self.routes_from_layer]
            affinity = None if self.record is None else self.record.affinity[self.routes_from_layer]
        else:
            if self._span_weights is None:  # eq. 3's weights: once per forward, not per layer
                self._span_weights = self.layout.span_weights(torch.float32, q.device)
            with torch.no_grad():
                prompt_valid = None if self.key_valid is None else self.key_valid[:, : self.layout.prompt_len]
                affinity, routes = affinity_and_routes(q.detach(), k.detach(), self.layout, self._span_weights, prompt_valid)
        self._routes[layer] = routes
        if self.record is not None:
            self.record.routes[layer] = routes
            self.record.affinity[layer] = F.one_hot(routes, self.num_conditions).float() if affinity is None else affinity
        return self._routes[layer]

    def _shares_routes(self, layer: int) -> bool:
        source = self.routes_from_layer
        return source is not None and layer > source and source in self._routes

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        routes = self.routes_for(layer, q, k)
        if self.cache is not None:
            return cached_condition_attention(q, k, v, self.layout, routes, self.cache.kv[layer], self.attend)
        if self.capture is not None:
            self.capture.kv[layer] = [self._cond_kv(k, v, c) for c in range(self.layout.num_conditions)]
        if self.impl == "reference":
            return reference_attention(q, k, v, self.layout, self.rules, routes, self.key_valid)
        return routed_attention(q, k, v, self.layout, self.rules, routes, self.attend, self.key_valid)

    def _cond_kv(self, k, v, c):
        s, e = self.layout.group_ranges()[2 + c]
        valid = None if self.key_valid is None else self.key_valid[:, s:e]
        return k[:, s:e].detach(), v[:, s:e].detach(), valid
