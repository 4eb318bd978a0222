"""Dual-branch LoRA lands on the right rows of every targeted linear, and nowhere else."""

import pytest
import torch
from helpers import make_inputs, randomize_lora, tiny_transformer

import musar_core.blocks as blocks
from musar_core import MusarConfig, MusarTransformer
from musar_core.lora import NOISE, SHARED, SUBJECT, target_module_names


def _record_linears(monkeypatch):
    calls = []
    original = blocks.routed_linear

    def recording(layer, x, plan):
        out = original(layer, x, plan)
        calls.append((layer, x.detach(), out.detach(), plan))
        return out

    monkeypatch.setattr(blocks, "routed_linear", recording)
    return calls


def _delta(layer, x, adapter):
    return layer.lora_B[adapter](layer.lora_A[adapter](x)) * layer.scaling[adapter]


@pytest.mark.parametrize("shared", [False, True])
def test_each_adapter_delta_lands_only_on_its_own_rows(monkeypatch, shared):
    stock = tiny_transformer(seed=8)
    model = MusarTransformer(stock, MusarConfig(shared_lora=shared)).add_lora()
    randomize_lora(model, scale=0.2)
    inputs = make_inputs(stock, conditions=[(3, (2, 2)), (2, (2, 4))])
    calls = _record_linears(monkeypatch)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    lay = out.layout
    m, n = lay.prompt_len, lay.target_len
    visited = set()
    with torch.no_grad():
        for layer, x, y, _plan in calls:
            if not hasattr(layer, "base_layer"):
                continue
            visited.add(id(layer))
            diff = y - layer.base_layer(x)
            rows = x.shape[1]
            # Which stream is this? text = [T, CT...], image = [X, CI...], joint = [T, X, CT0, CI0, ...]
            if rows == lay.text_len:
                owners = [(0, m, "prompt"), (m, rows, "cond")]
            elif rows == lay.image_len:
                owners = [(0, n, "target"), (n, rows, "cond")]
            else:
                assert rows == lay.joint_len
                owners = [(0, m, "prompt"), (m, m + n, "target"), (m + n, rows, "cond")]
            for start, end, who in owners:
                got = diff[:, start:end]
                if shared:
                    expected = _delta(layer, x[:, start:end], SHARED)
                else:
                    adapter = {"prompt": None, "target": NOISE, "cond": SUBJECT}[who]
                    expected = torch.zeros_like(got) if adapter is None else _delta(layer, x[:, start:end], adapter)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"{who} rows")
                if who == "prompt" and not shared:
                    assert torch.count_nonzero(got) == 0  # exactly nothing, not merely small
                else:
                    assert got.abs().max() > 0
    wanted = {id(stock.get_submodule(name)) for name in target_module_names(stock, model.config)}
    assert visited == wanted, "every targeted linear is run through the router"


def test_lora_targets_are_the_documented_modules():
    stock = tiny_transformer()
    model = MusarTransformer(stock).add_lora()
    names = target_module_names(stock, model.config)
    assert len(names) == 2 * 12 + 2 * 5
    assert "proj_out" not in names and not any("norm" in n or "embed" in n for n in names)
    subject = stock.get_submodule("transformer_blocks.0.attn.to_q")
    assert subject.lora_A[SUBJECT].out_features == 128 and subject.lora_A[NOISE].out_features == 4


def test_fresh_adapters_change_nothing_and_base_weights_are_untouched():
    stock = tiny_transformer(seed=9)
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    inputs = make_inputs(stock, conditions=[(2, (2, 2)), (2, (2, 2))])
    with torch.no_grad():
        plain = MusarTransformer(stock)(**inputs).sample
        model = MusarTransformer(stock).add_lora()
        with_lora = model(**inputs).sample
    torch.testing.assert_close(with_lora, plain, rtol=0, atol=0)
    after = {k.replace(".base_layer", ""): v for k, v in stock.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
