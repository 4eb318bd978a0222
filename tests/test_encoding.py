"""Condition and prompt encoding with real (tiny) FLUX components loaded from disk."""

import pytest
import torch
from PIL import Image

from musar_core.encoding import (
    FluxEncoders,
    encode_conditions,
    encode_images,
    encode_target_prompt,
    phrase_token_span,
    reference_tensor,
)


@pytest.fixture(scope="module")
def enc(tiny_flux_path):
    return FluxEncoders.from_pretrained(tiny_flux_path)


def test_reference_is_resized_by_shorter_side_and_centre_cropped():
    im = Image.new("RGB", (300, 100), (0, 0, 0))
    im.paste((255, 255, 255), (100, 0, 200, 100))  # a white middle third
    t = reference_tensor(im, 64)
    assert t.shape == (3, 64, 64)
    assert t.min() >= -1 and t.max() <= 1
    assert t[:, :, 2:-2].mean() > 0.95  # the crop is the white centre


def test_condition_latents_use_flux_shift_scale_and_packing(enc):
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    packed, grid = encode_images(enc.vae, pixels)
    assert grid == (4, 4) and packed.shape == (1, 16, 4 * enc.vae.config.latent_channels)
    with torch.no_grad():
        raw = enc.vae.encode(pixels).latent_dist.mode()
    expected = (raw - enc.vae.config.shift_factor) * enc.vae.config.scaling_factor
    torch.testing.assert_close(packed[0, 0], expected[0, :, :2, :2].reshape(-1))  # first 2x2 patch, channel-major


def test_condition_prompts_have_real_length_and_mask_padding(enc):
    cond = encode_conditions(enc, [[Image.new("RGB", (80, 64)), Image.new("RGB", (64, 64))]],
                             [["dog", "a red backpack on a bench"]], condition_size=64)  # fmt: skip
    lengths = enc.tokenizer_2(["dog", "a red backpack on a bench"]).input_ids
    emb, mask = cond.prompt_embeds[0], cond.prompt_mask[0]
    assert emb.shape[1] == max(len(x) for x in lengths) < 64
    assert mask.sum(1).tolist() == [len(x) for x in lengths]
    # Padding is masked inside T5 too: the short prompt's real tokens equal its unpadded encoding.
    alone = encode_conditions(enc, [[Image.new("RGB", (64, 64))]], [["dog"]], condition_size=64)
    torch.testing.assert_close(emb[0, : len(lengths[0])], alone.prompt_embeds[0][0], rtol=1e-4, atol=1e-5)
    assert alone.prompt_mask[0] is None
    assert cond.image_ids[0][:, 0].eq(1).all()  # condition 0 sits on RoPE plane 1
    assert cond.pooled[0].shape == (2, 32)


def test_target_prompt_matches_flux_pipeline(enc, tiny_flux_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    expected, pooled_expected, _ = pipe.encode_prompt(["a dog on the beach"], None, max_sequence_length=64)
    embeds, pooled = encode_target_prompt(enc, ["a dog on the beach"], 64)
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, pooled_expected)


def test_phrase_token_span(enc):
    prompt = "a dog and another dog"
    first = phrase_token_span(enc.tokenizer_2, prompt, 2, 5, 64)
    second = phrase_token_span(enc.tokenizer_2, prompt, 18, 21, 64)
    ids = enc.tokenizer_2(prompt).input_ids
    assert first[1] >= 1 and second[0] > first[0]
    assert ids[first[0] : first[0] + first[1]] == ids[second[0] : second[0] + second[1]]
    with pytest.raises(ValueError, match="outside the prompt"):
        phrase_token_span(enc.tokenizer_2, prompt, 18, 40, 64)
    with pytest.raises(ValueError, match="falls outside the first 2 prompt tokens"):
        phrase_token_span(enc.tokenizer_2, prompt, 18, 21, 2)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing subfolders"):
        FluxEncoders.from_pretrained(tmp_path)


def test_compact_conditions_encode_smaller_and_span_the_full_position_range(enc):
    """condition_compaction=f: 1/f^2 of the tokens, RoPE positions at the centres of the full grid's
    f x f patches, so a compact reference covers the positions a full-size one would."""
    im = Image.new("RGB", (64, 64), (200, 30, 30))
    full = encode_conditions(enc, [[im]], [["dog"]], condition_size=64)
    compact = encode_conditions(enc, [[im]], [["dog"]], condition_size=64, compaction=2)
    assert full.image_latents[0].shape[1] == 16 and compact.image_latents[0].shape[1] == 4
    ids = compact.image_ids[0]
    assert ids[:, 0].eq(1).all()
    assert sorted(set(ids[:, 1].tolist())) == [0.5, 2.5]  # rows 0-1 and 2-3 of the full 4x4 grid
    assert full.image_ids[0][:, 1:].min() == 0 and full.image_ids[0][:, 1:].max() == 3
    with pytest.raises(ValueError, match="not a multiple of 16"):
        encode_conditions(enc, [[im]], [["dog"]], condition_size=48, compaction=2)


def test_compaction_config_is_validated():
    from musar_core import MusarConfig

    assert MusarConfig(condition_size=512, condition_compaction=2).encoded_condition_size == 256
    with pytest.raises(ValueError, match="condition_compaction=3 leaves a 512px reference at 170.667px"):
        MusarConfig(condition_size=512, condition_compaction=3)
    with pytest.raises(ValueError, match="condition_compaction must be a positive integer"):
        MusarConfig(condition_compaction=0)
