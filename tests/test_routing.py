"""Static and dynamic routing: fast path == reference path, blocked pairs contribute nothing."""

import itertools
import math

import pytest
import torch
from helpers import make_inputs, tiny_transformer

from musar_core import MusarConfig, MusarTransformer, RoutingRules, TokenLayout
from musar_core.layout import PROMPT, TARGET, cond_group
from musar_core.routing import affinity_and_routes, dense_mask, reference_attention, routed_attention

RULES = {
    "static": RoutingRules(static_routing=True, dynamic_routing=False),
    "static+dynamic": RoutingRules(static_routing=True, dynamic_routing=True),
    "isolated+dynamic": RoutingRules(static_routing=True, dynamic_routing=True, isolate_conditions=True),
    "dynamic only": RoutingRules(static_routing=False, dynamic_routing=True),
    "dense": RoutingRules(static_routing=False, dynamic_routing=False),
}


def sdpa_attend(calls):
    def attend(q, k, v, attn_mask=None):
        calls.append((q.shape, k.shape, None if attn_mask is None else attn_mask.shape))
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        ).transpose(1, 2)

    return attend


def random_layout(c: int, seed: int, batch: int = 3) -> TokenLayout:
    g = torch.Generator().manual_seed(seed)
    m = 10
    starts = torch.randint(0, m - 2, (batch, c), generator=g)
    lengths = torch.randint(1, 3, (batch, c), generator=g)
    return TokenLayout(
        prompt_len=m,
        target_len=12,
        cond_text_lens=torch.randint(0, 4, (c,), generator=g).tolist(),
        cond_image_lens=torch.randint(1, 7, (c,), generator=g).tolist(),
        phrase_spans=torch.stack([starts, lengths], dim=-1),
    )


def qkv(layout, batch=3, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layout.joint_len, heads, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("c", [1, 2, 3, 4])
@pytest.mark.parametrize("rules_name", list(RULES))
def test_fast_path_equals_reference_and_never_builds_a_dense_mask(c, rules_name):
    rules = RULES[rules_name]
    layout = random_layout(c, seed=c)
    q, k, v = qkv(layout, seed=c)
    routes = None
    if rules.dynamic_routing and c >= 2:
        routes = affinity_and_routes(q, k, layout)[1]
    calls = []
    fast = routed_attention(q, k, v, layout, rules, routes, sdpa_attend(calls))
    ref = reference_attention(q, k, v, layout, rules, routes)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    assert all(mask_shape is None for _, _, mask_shape in calls)
    # Per sample (batch 1: no padding of routed query batches), blocked pairs are skipped, not masked.
    one = TokenLayout(layout.prompt_len, layout.target_len, layout.cond_text_lens, layout.cond_image_lens,
                      layout.phrase_spans[:1])  # fmt: skip
    calls = []
    routed_attention(q[:1], k[:1], v[:1], one, rules, None if routes is None else routes[:1], sdpa_attend(calls))
    L = layout.joint_len
    computed = sum(qs[1] * ks[1] for qs, ks, _ in calls)
    blocks_something = rules.static_routing or routes is not None
    assert computed < L * L if blocks_something else computed == L * L


def test_fast_path_with_padded_condition_prompts_uses_key_padding_only():
    layout = random_layout(3, seed=7)
    q, k, v = qkv(layout, seed=7)
    rules = RULES["static+dynamic"]
    routes = affinity_and_routes(q, k, layout)[1]
    key_valid = torch.ones(3, layout.joint_len, dtype=torch.bool)
    for kk in range(3):
        s, e = layout.cond_text_range(kk)
        if e > s:
            key_valid[0, e - 1] = False  # last prompt token of each condition is padding in sample 0
    calls = []
    fast = routed_attention(q, k, v, layout, rules, routes, sdpa_attend(calls), key_valid)
    ref = reference_attention(q, k, v, layout, rules, routes, key_valid)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    assert all(m is None or (m[1], m[2]) == (1, 1) for _, _, m in calls)


def test_static_relation_matches_the_paper():
    r = RoutingRules()
    c0, c1 = cond_group(0), cond_group(1)
    assert not r.allows(PROMPT, c0) and not r.allows(c0, PROMPT)  # prompt-condition decoupling
    assert not r.allows(c0, c1) and not r.allows(c1, c0)  # inter-condition isolation
    assert r.allows(PROMPT, TARGET) and r.allows(TARGET, PROMPT) and r.allows(TARGET, TARGET)
    assert r.allows(TARGET, c0) and r.allows(c0, c0) and r.allows(c0, TARGET)
    assert not RoutingRules(isolate_conditions=True).allows(c0, TARGET)
    assert all(RoutingRules(static_routing=False).allows(a, b) for a, b in itertools.product(range(4), repeat=2))


@pytest.mark.parametrize("rules_name", ["static", "static+dynamic", "isolated+dynamic"])
def test_blocked_key_groups_contribute_nothing_per_attention_call(rules_name):
    rules = RULES[rules_name]
    layout = random_layout(3, seed=11)
    q, k, v = qkv(layout, seed=11)
    routes = affinity_and_routes(q, k, layout)[1] if rules.dynamic_routing else None
    base = routed_attention(q, k, v, layout, rules, routes, sdpa_attend([]))
    ranges = layout.group_ranges()
    for key_group in range(layout.num_groups):
        s, e = ranges[key_group]
        k2, v2 = k.clone(), v.clone()
        k2[:, s:e] += 3.0
        v2[:, s:e] -= 5.0
        out = routed_attention(q, k2, v2, layout, rules, routes, sdpa_attend([]))
        for query_group in range(layout.num_groups):
            qs, qe = ranges[query_group]
            changed = (out[:, qs:qe] - base[:, qs:qe]).abs().amax(dim=(2, 3)) > 1e-6  # (B, rows)
            if not rules.allows(query_group, key_group):
                assert not changed.any(), (query_group, key_group)
            elif query_group == TARGET and key_group >= 2 and routes is not None:
                routed_here = routes == key_group - 2
                assert torch.equal(changed, routed_here), "only tokens routed to this condition may change"
            else:
                assert changed.all(), (query_group, key_group)


def test_dynamic_routing_on_a_hand_built_similarity():
    """Prompt keys are one-hot; each target query points at one prompt token: routes are known."""
    m, n, heads, dim = 6, 5, 2, 8
    layout = TokenLayout(m, n, (1, 1, 1), (1, 1, 1), phrase_spans=torch.tensor([[[0, 2], [2, 1], [3, 3]]]))
    q = torch.zeros(1, layout.joint_len, heads, dim)
    k = torch.zeros_like(q)
    for j in range(m):
        k[0, j, :, j] = 1.0
    pointed = [0, 2, 5, 1, 4]  # prompt token each target query points at
    for i, j in enumerate(pointed):
        q[0, m + i, :, j] = 20.0
    affinity, routes = affinity_and_routes(q, k, layout)
    assert routes.tolist() == [[0, 1, 2, 0, 2]]
    # S* by the paper's formula, written out with loops.
    scale = 1 / math.sqrt(dim)
    for i in range(n):
        s = torch.stack([torch.softmax(q[0, m + i, h] @ k[0, :m, h].T * scale, 0) for h in range(heads)]).mean(0)
        for kk, (p, length) in enumerate([(0, 2), (2, 1), (3, 3)]):
            assert affinity[0, i, kk].item() == pytest.approx(s[p : p + length].mean().item(), rel=1e-5)


def test_dense_mask_is_the_routing_rule():
    layout = TokenLayout(2, 2, (1, 0), (1, 1), phrase_spans=torch.tensor([[[0, 1], [1, 1]]]))
    routes = torch.tensor([[1, 0]])
    mask = dense_mask(layout, RoutingRules(), routes, None, "cpu")[0].int()
    # joint order: T T X X CT0 CI0 CI1
    expected = [
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 1],  # target token 0 routed to condition 1
        [1, 1, 1, 1, 1, 1, 0],  # target token 1 routed to condition 0
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 0, 0, 1],
    ]
    assert mask.tolist() == expected


@pytest.mark.parametrize(
    "config",
    [
        MusarConfig(),
        MusarConfig(dynamic_routing=False),
        MusarConfig(isolate_conditions=True),
        MusarConfig(static_routing=False, shared_lora=True),
        MusarConfig(dynamic_routing_layers=(0, 3)),
        MusarConfig(routes_from_layer=1),
    ],
    ids=["full", "no-dynamic", "isolated", "no-static-shared-lora", "some-layers", "routes-from-layer"],
)
@pytest.mark.parametrize("c", [1, 2, 4])
def test_whole_model_fast_equals_reference(config, c):
    stock = tiny_transformer(seed=5)
    inputs = make_inputs(stock, conditions=[(2 + k % 2, (2, 2 + k % 2)) for k in range(c)], seed=c)
    fast_model = MusarTransformer(stock, config).add_lora()
    from helpers import randomize_lora

    randomize_lora(fast_model)
    ref_model = MusarTransformer(stock, config.replace(attention_impl="reference"))
    with torch.no_grad():
        fast = fast_model(**inputs, return_routing=True)
        ref = ref_model(**inputs, return_routing=True)
    torch.testing.assert_close(fast.sample, ref.sample, rtol=1e-4, atol=1e-5)
    for layer, routes in fast.routing.routes.items():
        assert torch.equal(routes, ref.routing.routes[layer])
    dynamic = config.dynamic_routing and c >= 2
    expected_layers = set(config.dynamic_routing_layers or range(4)) if dynamic else set()
    assert set(fast.routing.routes) == expected_layers


def _cond_outputs(model, inputs, k):
    out = model(**inputs, output_hidden_states=True)
    s, e = out.layout.group_ranges()[cond_group(k)]
    return out.hidden_states[:, s:e]


def test_isolated_conditions_are_independent_across_the_whole_network():
    stock = tiny_transformer(seed=6)
    model = MusarTransformer(stock, MusarConfig(isolate_conditions=True)).add_lora()
    from helpers import randomize_lora

    randomize_lora(model)
    inputs = make_inputs(stock, conditions=[(2, (2, 2)), (3, (2, 2)), (2, (2, 2))])
    with torch.no_grad():
        before = [_cond_outputs(model, inputs, k) for k in range(3)]
        inputs["conditions"].image_latents[1] = inputs["conditions"].image_latents[1] + 1.0
        inputs["conditions"].prompt_embeds[1] = inputs["conditions"].prompt_embeds[1] - 1.0
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"] * 2.0
        inputs["hidden_states"] = inputs["hidden_states"] + 0.5
        after = [_cond_outputs(model, inputs, k) for k in range(3)]
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=0)
    assert not torch.allclose(after[1], before[1])


def test_default_routing_isolates_per_call_not_across_the_network():
    """DESIGN.md: without isolate_conditions, cond[j] -> target -> cond[k] over two blocks."""
    stock = tiny_transformer(seed=6)
    model = MusarTransformer(stock, MusarConfig())
    inputs = make_inputs(stock, conditions=[(2, (2, 2)), (3, (2, 2))])
    with torch.no_grad():
        before = _cond_outputs(model, inputs, 0)
        inputs["conditions"].image_latents[1] = inputs["conditions"].image_latents[1] + 1.0
        after = _cond_outputs(model, inputs, 0)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("impl", ["routed", "reference"])
def test_padded_masked_prompt_equals_the_prompt_at_its_real_length(impl):
    """Pre-encoded prompts are padded to a common length with a mask: padding must change nothing,
    neither the attention nor dynamic routing's softmax over prompt tokens."""
    model = MusarTransformer(tiny_transformer(), MusarConfig(attention_impl=impl)).add_lora()
    real = make_inputs(model.transformer, batch=1, prompt_len=6, conditions=[(3, (2, 2)), (2, (2, 2))], seed=4)
    padded = dict(real)
    padded["encoder_hidden_states"] = torch.cat([real["encoder_hidden_states"], torch.randn(1, 4, 32) * 5], dim=1)
    padded["txt_ids"] = torch.zeros(10, 3)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    with torch.no_grad():
        want = model(**real, return_routing=True)
        got = model(**padded, prompt_mask=mask, return_routing=True)
        unmasked = model(**padded).sample
    torch.testing.assert_close(got.sample, want.sample, atol=1e-5, rtol=1e-5)
    for layer, routes in want.routing.routes.items():
        assert torch.equal(got.routing.routes[layer], routes)
    assert not torch.allclose(unmasked, want.sample, atol=1e-3)  # the padding was live without the mask
    with pytest.raises(ValueError, match=r"prompt_mask must be \(1, 10\)"):
        model(**padded, prompt_mask=mask[:, :6])


@pytest.mark.parametrize("impl", ["routed", "reference"])
def test_fixed_routes_replace_dynamic_routing_exactly(impl):
    """Routes given to the forward (a diptych's panels in training) act like computed ones: the model's
    own routes, fed back, give the same output, with no phrase spans needed. One routed layer, so the
    routes it computed are all there is to feed back."""
    stock = tiny_transformer(seed=7)
    model = MusarTransformer(stock, MusarConfig(attention_impl=impl, dynamic_routing_layers=(1,))).add_lora()
    from helpers import randomize_lora

    randomize_lora(model)
    inputs = make_inputs(stock, conditions=[(2, (2, 2)), (3, (2, 2))], seed=3)
    with torch.no_grad():
        own = model(**inputs, return_routing=True)
        given = own.routing.routes[1]
        fixed = model(**{**inputs, "phrase_spans": None}, routes=given, return_routing=True)
        flipped = model(**{**inputs, "phrase_spans": None}, routes=1 - given)
    assert 0 < int(given.sum()) < given.numel()  # both conditions are used
    assert set(fixed.routing.routes) == {1} and torch.equal(fixed.routing.routes[1], given)
    torch.testing.assert_close(fixed.sample, own.sample, rtol=0, atol=0)
    assert not torch.allclose(flipped.sample, own.sample)


def test_fixed_routes_isolate_the_unrouted_condition():
    """Every target token routed to condition 0: condition 1 cannot reach the target's output."""
    stock = tiny_transformer(seed=8)
    model = MusarTransformer(stock, MusarConfig()).add_lora()
    from helpers import randomize_lora

    randomize_lora(model)
    inputs = make_inputs(stock, conditions=[(2, (2, 2)), (2, (2, 2))], seed=4)
    routes = torch.zeros(2, 16, dtype=torch.long)
    with torch.no_grad():
        before = model(**inputs, routes=routes).sample
        inputs["conditions"].image_latents[1] = inputs["conditions"].image_latents[1] + 1.0
        after = model(**inputs, routes=routes).sample
        inputs["conditions"].image_latents[0] = inputs["conditions"].image_latents[0] + 1.0
        moved = model(**inputs, routes=routes).sample
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not torch.allclose(moved, before)


def test_fixed_routes_are_checked():
    stock = tiny_transformer(seed=8)
    model = MusarTransformer(stock, MusarConfig())
    inputs = make_inputs(stock, conditions=[(2, (2, 2)), (2, (2, 2))])
    with pytest.raises(ValueError, match=r"fixed_routes must have shape \(batch, 16\)"):
        model(**inputs, routes=torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="fixed_routes must name conditions 0..1"):
        model(**inputs, routes=torch.full((2, 16), 2))


@pytest.mark.parametrize("impl", ["routed", "reference"])
def test_routes_from_one_layer_are_reused_by_every_later_layer(impl):
    """``routes_from_layer=0``: block 0 routes, every block follows it - exactly as if block 0's routes were
    given to the forward; the per-block default routes differently on the same weights."""
    stock = tiny_transformer(seed=9)
    shared = MusarTransformer(stock, MusarConfig(attention_impl=impl, routes_from_layer=0)).add_lora()
    from helpers import randomize_lora

    randomize_lora(shared)
    per_block = MusarTransformer(stock, MusarConfig(attention_impl=impl))
    inputs = make_inputs(stock, conditions=[(2, (2, 2)), (3, (2, 2))], seed=5)
    with torch.no_grad():
        out = shared(**inputs, return_routing=True)
        first = out.routing.routes[0]
        given = per_block(**{**inputs, "phrase_spans": None}, routes=first)
        own = per_block(**inputs, return_routing=True)
    assert set(out.routing.routes) == {0, 1, 2, 3}
    for layer in (1, 2, 3):
        assert torch.equal(out.routing.routes[layer], first)
        torch.testing.assert_close(out.routing.affinity[layer], out.routing.affinity[0], rtol=0, atol=0)
    torch.testing.assert_close(out.sample, given.sample, rtol=0, atol=0)
    assert any(not torch.equal(own.routing.routes[layer], first) for layer in (1, 2, 3))


def test_routes_from_layer_is_checked():
    with pytest.raises(ValueError, match="routes_from_layer must be a block index >= 0"):
        MusarConfig(routes_from_layer=-1)
    with pytest.raises(ValueError, match=r"routes_from_layer=1 is not one of dynamic_routing_layers \(0, 3\)"):
        MusarConfig(routes_from_layer=1, dynamic_routing_layers=(0, 3))
    with pytest.raises(ValueError, match="routes_from_layer=4 names no block: this transformer has 4"):
        MusarTransformer(tiny_transformer(seed=9), MusarConfig(routes_from_layer=4))


def test_route_groups_gather_each_route_in_token_order_with_padding_marked():
    """One sort for every route: sample 0 routes tokens 1, 3 to condition 1; sample 1 routes token 2
    there; nobody routes to condition 2. Widths are the batch's largest count per route."""
    from musar_core.routing import _route_groups

    routes = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]])
    groups = _route_groups(routes, 3)
    assert groups[2] is None
    (pos0, valid0), (pos1, valid1) = groups[0], groups[1]
    assert valid0.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert pos0[valid0].tolist() == [0, 2, 4, 0, 1, 3, 4]  # each sample's route-0 tokens, in order
    assert valid1.tolist() == [[True, True], [True, False]]
    assert pos1[valid1].tolist() == [1, 3, 2]
    assert pos0.shape == (2, 4) and pos1.shape == (2, 2) and int(pos1.max()) < 5  # padding: some real token
