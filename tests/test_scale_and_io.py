"""FLUX.1-dev shapes on the meta device, sharded loading, checkpoints, bf16, bad input."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers import make_inputs, randomize_lora, tiny_transformer

from musar_core import ConditionTokens, MusarConfig, MusarTransformer, condition_image_ids, image_ids, text_ids
from musar_core.checkpoint import METADATA_FILE
from musar_core.flux_dev import FLUX_DEV_TRANSFORMER_CONFIG


def _flux_dev_on_meta():
    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER_CONFIG)


@pytest.mark.parametrize("target_hw", [(512, 512), (512, 1024)], ids=["512x512", "1024x512"])
def test_flux_dev_shapes_with_five_conditions_on_meta(target_hw):
    flux = _flux_dev_on_meta()
    assert round(sum(p.numel() for p in flux.parameters()) / 1e9, 2) == 11.90
    model = MusarTransformer(flux)
    with torch.device("meta"):
        model.add_lora()
    c, m, mt = 5, 512, 64
    h, w = target_hw[0] // 16, target_hw[1] // 16
    cond = ConditionTokens(
        image_latents=[torch.empty(1, 32 * 32, 64, device="meta") for _ in range(c)],
        image_ids=[condition_image_ids(k, 32, 32, device="meta") for k in range(c)],
        prompt_embeds=[torch.empty(1, mt, 4096, device="meta") for _ in range(c)],
        pooled=[torch.empty(1, 768, device="meta") for _ in range(c)],
    )
    spans = torch.tensor([[[k * 3, 2] for k in range(c)]], device="meta")
    out = model(
        hidden_states=torch.empty(1, h * w, 64, device="meta"),
        encoder_hidden_states=torch.empty(1, m, 4096, device="meta"),
        pooled_projections=torch.empty(1, 768, device="meta"),
        timestep=torch.empty(1, device="meta"),
        img_ids=image_ids(h, w, device="meta"),
        txt_ids=text_ids(m, device="meta"),
        guidance=torch.empty(1, device="meta"),
        conditions=cond,
        phrase_spans=spans,
        return_routing=True,
    )
    assert out.sample.shape == (1, h * w, 64)
    assert len(out.routing.routes) == 57  # dynamic routing in every block
    # RoPE layout: no two image tokens (target plane 0, condition planes 1..5) share a position.
    ids = torch.cat([image_ids(h, w)] + [condition_image_ids(k, 32, 32) for k in range(c)])
    assert torch.unique(ids, dim=0).shape[0] == ids.shape[0]


@pytest.mark.parametrize("compaction", [1, 2])
def test_left_panel_rope_scheme_puts_each_condition_in_its_own_panel_left_of_the_target(compaction):
    """left_panels_v1: plane 0, condition k in columns [-(k+1) W, -k W): never on the target's positions
    (columns >= 0, any target size) nor another condition's; rows as the target's."""
    side = 8 // compaction
    conds = [condition_image_ids(k, side, side, compaction=compaction, scheme="left_panels_v1") for k in range(3)]
    for k, ids in enumerate(conds):
        assert (ids[:, 0] == 0).all() and ids[:, 1].min() >= 0 and ids[:, 1].max() < 8
        assert ids[:, 2].min() >= -8 * (k + 1) and ids[:, 2].max() < -8 * k
    every = torch.cat([image_ids(8, 24)] + conds)  # a 3-panel-wide target too
    assert torch.unique(every, dim=0).shape[0] == every.shape[0]
    default = condition_image_ids(1, side, side, compaction=compaction)
    assert torch.equal(default[:, 1:], conds[1][:, 1:] + torch.tensor([0.0, 16.0])) and (default[:, 0] == 2).all()
    with pytest.raises(ValueError, match="unknown RoPE scheme"):
        condition_image_ids(0, 4, 4, scheme="shared")


def test_loads_sharded_safetensors_folder(tmp_path):
    stock = tiny_transformer(seed=12)
    stock.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    model = MusarTransformer.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(stock.state_dict().items(), model.transformer.state_dict().items()):
        assert torch.equal(a, b), name


def test_lora_round_trip_reproduces_outputs_and_records_metadata(tmp_path):
    stock = tiny_transformer(seed=13)
    model = MusarTransformer(stock).add_lora()
    randomize_lora(model, seed=4)
    inputs = make_inputs(stock, conditions=[(2, (2, 2)), (3, (2, 2))])
    with torch.no_grad():
        expected = model(**inputs).sample
    path = model.save_lora(tmp_path / "lora", training_stage=2, data_fingerprint="abc")
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["subject_rank"] == 128 and meta["noise_rank"] == 4 and meta["training_stage"] == 2
    assert meta["rope_scheme"] == "plane_offset_v1" and meta["isolate_conditions"] is False
    from safetensors.torch import load_file

    keys = load_file(path / "subject" / "adapter_model.safetensors").keys()
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in keys  # peft's state-dict keys
    fresh = MusarTransformer(tiny_transformer(seed=13))
    fresh.load_lora(path)
    with torch.no_grad():
        got = fresh(**inputs).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # Saving again over the folder replaces it whole.
    randomize_lora(model, seed=5)
    model.save_lora(path)
    assert json.loads((path / METADATA_FILE).read_text())["training_stage"] is None
    assert not list(tmp_path.glob(".lora*"))


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(config=MusarConfig(subject_rank=64)), "subject_rank"),
        (dict(config=MusarConfig(isolate_conditions=True)), "isolate_conditions"),
        (dict(config=MusarConfig(shared_lora=True)), "shared_lora"),
        (dict(num_layers=3), "base_config_hash"),
    ],
)
def test_incompatible_lora_is_refused_naming_the_field(tmp_path, change, field):
    model = MusarTransformer(tiny_transformer()).add_lora()
    path = model.save_lora(tmp_path / "lora")
    config = change.pop("config", MusarConfig())
    other = MusarTransformer(tiny_transformer(**change), config)
    with pytest.raises(ValueError, match=field):
        other.load_lora(path)


def test_not_a_lora_folder(tmp_path):
    with pytest.raises(ValueError, match=METADATA_FILE):
        MusarTransformer(tiny_transformer()).load_lora(tmp_path)


def test_bf16_forward():
    stock = tiny_transformer(seed=14)
    model = MusarTransformer(stock).add_lora()
    randomize_lora(model)
    inputs = make_inputs(stock, conditions=[(2, (2, 2)), (3, (2, 2))])
    with torch.no_grad():
        ref = model(**inputs).sample
        model.to(torch.bfloat16)
        bf = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
        c = inputs["conditions"]
        bf["conditions"] = ConditionTokens(
            [x.bfloat16() for x in c.image_latents], c.image_ids, [x.bfloat16() for x in c.prompt_embeds],
            [x.bfloat16() for x in c.pooled],
        )  # fmt: skip
        out = model(**bf).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


class TestBadInput:
    def setup_method(self):
        self.stock = tiny_transformer()
        self.model = MusarTransformer(self.stock)

    def test_dynamic_routing_without_spans(self):
        inputs = make_inputs(self.stock, conditions=[(2, (2, 2)), (2, (2, 2))])
        inputs["phrase_spans"] = None
        with pytest.raises(ValueError, match="phrase_spans"):
            self.model(**inputs)

    def test_spans_outside_the_prompt(self):
        inputs = make_inputs(self.stock, prompt_len=8, conditions=[(2, (2, 2)), (2, (2, 2))])
        inputs["phrase_spans"] = torch.tensor([[[0, 2], [7, 3]]] * 2)
        with pytest.raises(ValueError, match="outside the 8 prompt tokens"):
            self.model(**inputs)

    def test_spans_of_the_wrong_shape(self):
        inputs = make_inputs(self.stock, conditions=[(2, (2, 2)), (2, (2, 2))])
        inputs["phrase_spans"] = torch.tensor([[[0, 2]]] * 2)
        with pytest.raises(ValueError, match=r"shape \(batch, 2, 2\)"):
            self.model(**inputs)

    def test_condition_latents_with_wrong_channels(self):
        inputs = make_inputs(self.stock, conditions=[(2, (2, 2))])
        inputs["conditions"].image_latents[0] = torch.randn(2, 4, 8)
        with pytest.raises(ValueError, match="condition 0: image_latents"):
            self.model(**inputs)

    def test_condition_batch_mismatch(self):
        inputs = make_inputs(self.stock, conditions=[(2, (2, 2))])
        inputs["conditions"].prompt_embeds[0] = torch.randn(3, 2, 32)
        with pytest.raises(ValueError, match="condition 0: prompt_embeds"):
            self.model(**inputs)

    def test_missing_condition_pooled(self):
        inputs = make_inputs(self.stock, conditions=[(2, (2, 2)), (2, (2, 2))])
        inputs["conditions"].pooled.pop()
        with pytest.raises(ValueError, match="2 image_latents but 1 pooled"):
            self.model(**inputs)

    def test_target_ids_mismatch(self):
        inputs = make_inputs(self.stock)
        inputs["img_ids"] = image_ids(3, 3)
        with pytest.raises(ValueError, match="img_ids must be"):
            self.model(**inputs)

    def test_missing_guidance(self):
        inputs = make_inputs(self.stock)
        inputs["guidance"] = None
        with pytest.raises(ValueError, match="guidance"):
            self.model(**inputs)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(subject_rank=0), "subject_rank"),
            (dict(isolate_conditions=True, static_routing=False), "isolate_conditions"),
            (dict(attention_impl="flash"), "attention_impl"),
            (dict(rope_scheme="shared"), "rope_scheme"),
            (dict(condition_size=500), "condition_size"),
        ],
    )
    def test_config_errors(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            MusarConfig(**kwargs)
