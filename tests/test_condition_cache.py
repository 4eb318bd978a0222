"""Condition cache (isolate_conditions): computed once, equal to recomputing conditions every step."""

import numpy as np
import pytest
import torch
from helpers import make_inputs, randomize_lora, tiny_transformer
from PIL import Image

from musar_core import MusarConfig, MUSARPipeline, MusarTransformer, Subject


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("c", [1, 3])
def test_cached_forward_equals_uncached(dynamic, c):
    stock = tiny_transformer(seed=40)
    model = MusarTransformer(stock, MusarConfig(isolate_conditions=True, dynamic_routing=dynamic)).add_lora()
    randomize_lora(model)
    inputs = make_inputs(stock, conditions=[(2 + k, (2, 2 + k % 2)) for k in range(c)], seed=c)
    inputs["conditions"].prompt_mask = [None] * c
    inputs["conditions"].prompt_mask[0] = torch.tensor([[True] * 2, [True, False]])  # padded prompt in sample 1
    with torch.no_grad():
        expected = model(**inputs, return_routing=True)
        cache = model.build_condition_cache(inputs["conditions"], inputs["guidance"])
        got = model(**{**inputs, "conditions": None}, condition_cache=cache, return_routing=True)
    torch.testing.assert_close(got.sample, expected.sample, rtol=1e-5, atol=1e-6)
    for layer, routes in expected.routing.routes.items():
        assert torch.equal(got.routing.routes[layer], routes)
    assert len(cache.kv) == 4 and len(cache.kv[0]) == c


def test_cache_needs_isolated_conditions():
    stock = tiny_transformer()
    inputs = make_inputs(stock, conditions=[(2, (2, 2))])
    with pytest.raises(ValueError, match="isolate_conditions=True"):
        MusarTransformer(stock).build_condition_cache(inputs["conditions"], inputs["guidance"])
    model = MusarTransformer(stock, MusarConfig(isolate_conditions=True))
    cache = model.build_condition_cache(inputs["conditions"], inputs["guidance"])
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, condition_cache=cache)
    bad = {**inputs, "conditions": None, "phrase_spans": torch.tensor([[[0, 2]], [[7, 3]]])}
    with pytest.raises(ValueError, match="outside the 8 prompt tokens"):
        model(**bad, condition_cache=cache)
    one = make_inputs(stock, batch=1)
    with pytest.raises(ValueError, match="built for batch 2, got batch 1"):
        model(**one, condition_cache=cache)


def test_cached_generation_equals_uncached(tiny_flux_path):
    pipe = MUSARPipeline.from_pretrained(tiny_flux_path, config=MusarConfig(condition_size=32, isolate_conditions=True))
    pipe.transformer.add_lora()
    randomize_lora(pipe.transformer, scale=0.3)
    subjects = [Subject(Image.new("RGB", (40, 40), "red"), "dog"), Subject(Image.new("RGB", (40, 40), "blue"), "cat")]
    kw = dict(height=64, width=64, num_inference_steps=3, seed=2)
    cached = pipe("a dog and a cat", subjects, condition_cache=True, **kw).images[0]
    plain = pipe("a dog and a cat", subjects, condition_cache=False, **kw).images[0]
    diff = np.abs(np.asarray(cached, dtype=np.int16) - np.asarray(plain, dtype=np.int16)).max()
    assert diff <= 1  # fp32 equality of latents, up to uint8 rounding
