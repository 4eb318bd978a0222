"""The tiny FLUX folder loads through the same code path as FLUX.1-dev and behaves sanely."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from musar_core.tiny import (
    TINY_SCHEDULER_CONFIG,
    TINY_T5_MAX_LENGTH,
    TINY_TRANSFORMER_CONFIG,
    build_tiny_flux,
    tiny_flux_dir,
)

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, seed):
    return pipe(
        "a photo of a dog and a cat on the beach",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=TINY_T5_MAX_LENGTH,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images


def test_folder_layout_and_size(tiny_dir):
    assert (tiny_dir / "model_index.json").is_file()
    for sub in SUBFOLDERS:
        assert (tiny_dir / sub).is_dir(), sub
    size = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    # ~11 MB, dominated by the real 49408-token CLIP vocabulary (embedding + tokenizer.json).
    assert size < 16 * 2**20, size
    assert not [p.name for p in tiny_dir.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_pipeline_loads_all_components(pipe):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    expected = {
        "transformer": FluxTransformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "text_encoder_2": T5EncoderModel,
        "tokenizer_2": T5TokenizerFast,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }
    for name, cls in expected.items():
        assert isinstance(getattr(pipe, name), cls), name
    assert pipe.vae_scale_factor == 8  # FLUX's real spatial factor
    assert pipe.vae.config.latent_channels * 4 == pipe.transformer.config.in_channels
    assert pipe.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.3611)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer_2.model_max_length == TINY_T5_MAX_LENGTH
    assert pipe.text_encoder.config.hidden_size == pipe.transformer.config.pooled_projection_dim
    assert pipe.text_encoder_2.config.d_model == pipe.transformer.config.joint_attention_dim
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)
    for key, value in TINY_SCHEDULER_CONFIG.items():
        assert pipe.scheduler.config[key] == value, key


def test_subfolder_loading(tiny_dir):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    for key, value in TINY_TRANSFORMER_CONFIG.items():
        got = transformer.config[key]
        assert (list(got) if isinstance(value, tuple) else got) == (list(value) if isinstance(value, tuple) else value)


def test_generates_deterministically(pipe):
    first, second = _generate(pipe, seed=0), _generate(pipe, seed=0)
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, _generate(pipe, seed=1))


def test_clip_tokenizer_is_real_clip_bpe(tiny_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    assert len(tok) == 49408
    assert tok.tokenize("a dog and a cat") == ["a</w>", "dog</w>", "and</w>", "a</w>", "cat</w>"]
    # Ids of openai/clip-vit-large-patch14 for this prompt.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    sentence = "two images concatenated side by side, the left part is a backpack!"
    ids = tok(sentence).input_ids
    assert tok.unk_token_id not in ids[1:-1]
    # CLIP lowercases and detaches punctuation; words round-trip.
    assert tok.decode(ids, skip_special_tokens=True).split() == sentence.replace(",", " ,").replace("!", " !").split()


def test_t5_tokenizer_fast_offsets(tiny_dir):
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer_2")
    assert tok.is_fast
    assert isinstance(T5TokenizerFast.from_pretrained(tiny_dir, subfolder="tokenizer_2"), T5TokenizerFast)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)

    text = "a dog and another dog"
    enc = tok(text, return_offsets_mapping=True)
    assert enc.input_ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in enc.input_ids
    for start in (text.index("dog"), text.rindex("dog")):
        for char in range(start, start + 3):
            assert any(s <= char < e for s, e in enc.offset_mapping), (char, enc.offset_mapping)
    assert tok.decode(enc.input_ids, skip_special_tokens=True) == text
    assert tok.tokenize("Two images concatenated side by side")[:2] == ["▁Two", "▁images"]

    padded = tok(text, padding="max_length", max_length=TINY_T5_MAX_LENGTH, truncation=True)
    assert len(padded.input_ids) == TINY_T5_MAX_LENGTH


def test_build_is_deterministic(tmp_path):
    a = build_tiny_flux(tmp_path / "a", seed=0)
    b = build_tiny_flux(tmp_path / "b", seed=0)
    c = build_tiny_flux(tmp_path / "c", seed=1)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    wa, wb, wc = (load_file(p / weights) for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    for sub in ("tokenizer", "tokenizer_2"):
        assert (a / sub / "tokenizer.json").read_bytes() == (b / sub / "tokenizer.json").read_bytes()

    # Rebuilding over an existing folder replaces it.
    build_tiny_flux(a, seed=1)
    wa1 = load_file(a / weights)
    assert all(torch.equal(wa1[k], wc[k]) for k in wa1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_tiny_flux_dir_caches(tmp_path, monkeypatch):
    path = tiny_flux_dir(tmp_path)
    assert path == tmp_path / "tiny-flux-v1"
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert tiny_flux_dir(tmp_path) == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp

    monkeypatch.setenv("MUSAR_CACHE", os.fspath(tmp_path))
    assert tiny_flux_dir() == path
    assert Path(path / "transformer").is_dir()
