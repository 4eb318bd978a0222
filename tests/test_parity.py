"""MUSAR switched off is stock FLUX: the forward drives the same modules in the same order."""

import torch
from helpers import make_inputs, tiny_transformer

from musar_core import MusarConfig, MusarTransformer


def test_no_conditions_no_lora_equals_stock_flux(tmp_path):
    stock = tiny_transformer(seed=3)
    stock.save_pretrained(tmp_path / "transformer")
    musar = MusarTransformer.from_pretrained(tmp_path)  # through the loading path users take
    inputs = make_inputs(stock, batch=2, grid=(4, 6), prompt_len=7)
    with torch.no_grad():
        expected = stock(**{k: v for k, v in inputs.items() if k not in ("conditions", "phrase_spans")}).sample
        got = musar(**inputs).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_conditions_without_musar_equal_stock_flux_on_concatenated_sequence():
    """Cond modulation = target's, routing off, LoRA present but zero -> stock FLUX on [T;CT] x [X;CI]."""
    stock = tiny_transformer(seed=4)
    musar = MusarTransformer(stock, MusarConfig(static_routing=False, dynamic_routing=False)).add_lora()
    inputs = make_inputs(stock, batch=2, grid=(4, 4), prompt_len=6, conditions=[(3, (2, 2)), (5, (4, 2))], timestep=0.6)
    cond = inputs["conditions"]
    cond.timestep = 0.6
    cond.pooled = [inputs["pooled_projections"]] * len(cond)
    n = inputs["hidden_states"].shape[1]
    with torch.no_grad():
        got = musar(**inputs).sample
        stock_out = stock(
            hidden_states=torch.cat([inputs["hidden_states"], *cond.image_latents], dim=1),
            encoder_hidden_states=torch.cat([inputs["encoder_hidden_states"], *cond.prompt_embeds], dim=1),
            pooled_projections=inputs["pooled_projections"],
            timestep=inputs["timestep"],
            img_ids=torch.cat([inputs["img_ids"], *cond.image_ids]),
            txt_ids=torch.zeros(inputs["txt_ids"].shape[0] + sum(e.shape[1] for e in cond.prompt_embeds), 3),
            guidance=inputs["guidance"],
        ).sample
    # peft wraps the stock layers too, but with B = 0 every adapter adds exactly nothing.
    torch.testing.assert_close(got, stock_out[:, :n], rtol=1e-5, atol=1e-5)


def test_condition_modulation_is_what_differs():
    """The same setup with MUSAR's own condition modulation (t = 0, own pooled) is not stock."""
    stock = tiny_transformer(seed=4)
    musar = MusarTransformer(stock, MusarConfig(static_routing=False, dynamic_routing=False))
    inputs = make_inputs(stock, conditions=[(3, (2, 2))], timestep=0.6)
    with torch.no_grad():
        a = musar(**inputs).sample
        inputs["conditions"].timestep = 0.6
        b = musar(**inputs).sample
    assert not torch.allclose(a, b)
