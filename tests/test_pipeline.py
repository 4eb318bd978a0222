"""MUSARPipeline end to end on a tiny FLUX folder loaded from disk, and `musar generate`."""

import numpy as np
import pytest
import torch
from PIL import Image

from musar.cli import main
from musar_core import MusarConfig, MUSARPipeline, Subject
from musar_core.routing_maps import SUBJECT_COLOURS, assignment_image, render_routing_map

SIZE = dict(height=64, width=64, num_inference_steps=2)
CONFIG = MusarConfig(condition_size=32)


@pytest.fixture(scope="module")
def pipe(tiny_flux_path):
    return MUSARPipeline.from_pretrained(tiny_flux_path, config=CONFIG)


def ref(colour):
    return Image.new("RGB", (48, 40), colour)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    "prompt, subjects",
    [
        ("a dog on the beach", []),
        ("a dog on the beach", [Subject(ref("red"), "dog")]),
        ("a dog and a cat on the beach", [Subject(ref("red"), "dog"), Subject(ref("blue"), "cat")]),
        ("a dog, a cat and a teapot", [Subject(ref("red"), "dog"), Subject(ref("blue"), "cat"),
                                       Subject(ref("green"), "teapot")]),
        ("a dog and another dog", [Subject(ref("red"), "dog", occurrence=0), Subject(ref("blue"), "dog", occurrence=1)]),
    ],
    ids=["0", "1", "2", "3", "2-same-phrase"],
)
def test_generates_with_zero_to_three_subjects(pipe, prompt, subjects):
    out = pipe(prompt, subjects, seed=0, return_routing=True, **SIZE)
    assert len(out.images) == 1 and out.images[0].size == (64, 64)
    if len(subjects) >= 2:
        assert len(out.routing.affinity) == 2  # one record per step
        assert set(out.routing.routes[0]) == set(range(4))  # every block routes
        assert out.routing.affinity[0][0].shape == (1, 16, len(subjects))


def test_compact_conditions_generate_with_a_quarter_of_the_reference_tokens(tiny_flux_path):
    compact = MUSARPipeline.from_pretrained(tiny_flux_path, config=CONFIG.replace(condition_compaction=2))
    out = compact("a dog and a cat", [Subject(ref("red"), "dog"), Subject(ref("blue"), "cat")], seed=0, **SIZE)
    assert out.images[0].size == (64, 64)
    assert compact.transformer.config.encoded_condition_size == 16


def test_zero_subjects_equals_flux_pipeline(pipe, tiny_flux_path):
    from diffusers import FluxPipeline

    flux = FluxPipeline.from_pretrained(tiny_flux_path)
    kwargs = dict(height=64, width=64, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=64)
    expected = flux("a red backpack in the snow", generator=torch.Generator().manual_seed(7), **kwargs).images[0]
    got = pipe("a red backpack in the snow", generator=torch.Generator().manual_seed(7), **kwargs).images[0]
    assert np.array_equal(pixels(got), pixels(expected))


def test_true_cfg_with_zero_subjects_equals_flux_pipeline(pipe, tiny_flux_path):
    from diffusers import FluxPipeline

    flux = FluxPipeline.from_pretrained(tiny_flux_path)
    prompts = ["a red backpack in the snow", "a dog on the beach"]
    kwargs = dict(height=64, width=64, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=64,
                  num_images_per_prompt=2, true_cfg_scale=4.0, negative_prompt=["a blurry photo", "a cat"])  # fmt: skip
    expected = flux(prompts, generator=torch.Generator().manual_seed(7), **kwargs).images
    got = pipe(prompts, generator=torch.Generator().manual_seed(7), **kwargs).images
    plain = pipe(prompts, generator=torch.Generator().manual_seed(7),
                 **{k: v for k, v in kwargs.items() if k not in ("true_cfg_scale", "negative_prompt")}).images  # fmt: skip
    assert len(got) == len(expected) == 4
    for a, b, c in zip(got, expected, plain):
        assert np.array_equal(pixels(a), pixels(b))
        assert not np.array_equal(pixels(a), pixels(c))


@pytest.mark.parametrize("cached", [False, True], ids=["per-step", "condition-cache"])
def test_true_cfg_negative_pass_sees_neither_subjects_nor_the_prompt(pipe, tiny_flux_path, monkeypatch, cached):
    if cached:
        pipe = MUSARPipeline.from_pretrained(tiny_flux_path, config=CONFIG.replace(isolate_conditions=True))
    seen = []
    forward = pipe.transformer.forward

    def recording(*args, **kwargs):
        has_subjects = kwargs.get("conditions") is not None or kwargs.get("condition_cache") is not None
        seen.append((has_subjects, kwargs["encoder_hidden_states"].clone()))
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", recording)
    subjects = [Subject(ref("red"), "dog"), Subject(ref("blue"), "cat")]
    pipe("a dog and a cat", subjects, seed=0, true_cfg_scale=3.0, condition_cache=cached, **SIZE)
    assert [has for has, _ in seen] == [True, False] * SIZE["num_inference_steps"]
    empty = pipe.encoders.text_encoder_2(pipe.encoders.tokenizer_2(
        [""], padding="max_length", max_length=seen[1][1].shape[1], return_tensors="pt").input_ids)[0]  # fmt: skip
    torch.testing.assert_close(seen[1][1], empty)  # the default negative is the empty prompt
    assert not torch.equal(seen[0][1], seen[1][1])


def test_true_cfg_equal_to_the_prompt_is_a_no_op_without_subjects(pipe):
    plain = pipe("a dog on the beach", seed=3, **SIZE).images[0]
    guided = pipe("a dog on the beach", seed=3, true_cfg_scale=5.0, negative_prompt="a dog on the beach", **SIZE).images[0]
    assert np.abs(pixels(plain) - pixels(guided)).max() <= 1  # u + s (c - u) = c when u = c


def test_seed_is_deterministic_and_batches_are_per_image(pipe):
    subjects = [Subject(ref("red"), "dog"), Subject(ref("blue"), "cat")]
    a = pipe("a dog and a cat", subjects, seed=3, **SIZE).images[0]
    b = pipe("a dog and a cat", subjects, seed=3, **SIZE).images[0]
    assert np.array_equal(pixels(a), pixels(b))
    batch = pipe(["a dog and a cat", "a cat and a dog"], subjects, seed=3, num_images_per_prompt=2, **SIZE).images
    assert len(batch) == 4
    # Image 0 of a batch is the same seed alone, up to batched-kernel float rounding.
    assert np.abs(pixels(batch[0]) - pixels(a)).max() <= 2
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))


def test_lora_round_trip_changes_outputs_exactly_as_saved(pipe, tiny_flux_path, tmp_path):
    from helpers import randomize_lora

    subjects = [Subject(ref("red"), "dog"), Subject(ref("blue"), "cat")]
    trained = MUSARPipeline.from_pretrained(tiny_flux_path, config=CONFIG)
    trained.transformer.add_lora()
    randomize_lora(trained.transformer, scale=0.3)
    expected = trained("a dog and a cat", subjects, seed=1, **SIZE).images[0]
    trained.transformer.save_lora(tmp_path / "lora")
    loaded = MUSARPipeline.from_pretrained(tiny_flux_path, config=CONFIG, lora=tmp_path / "lora")
    got = loaded("a dog and a cat", subjects, seed=1, **SIZE).images[0]
    assert np.array_equal(pixels(got), pixels(expected))
    plain = pipe("a dog and a cat", subjects, seed=1, **SIZE).images[0]
    assert not np.array_equal(pixels(plain), pixels(expected))
    with pytest.raises(ValueError, match="subject_rank"):
        MUSARPipeline.from_pretrained(tiny_flux_path, config=CONFIG.replace(subject_rank=8), lora=tmp_path / "lora")


def test_routing_map_has_one_colour_per_subject(pipe):
    subjects = [Subject(ref("red"), "dog"), Subject(ref("blue"), "cat"), Subject(ref("green"), "teapot")]
    out = pipe("a dog, a cat and a teapot", subjects, seed=0, return_routing=True, **SIZE)
    assignment = assignment_image(out.routing, step=1)
    assert assignment.size == (4, 4)
    colours = {c for _, c in assignment.getcolors()}
    assert colours <= set(SUBJECT_COLOURS[:3]) and colours
    sheet = render_routing_map(out.images[0], out.routing, cell=64)
    assert sheet.size == (64 * 4, 28 + 2 * (64 + 16))  # overlay + 3 heatmaps; 2 steps
    legend = {sheet.getpixel((6 + 6, 14))}
    assert legend == {SUBJECT_COLOURS[0]}


class TestBadInput:
    def test_phrase_absent(self, pipe):
        with pytest.raises(ValueError, match="'cat' does not occur in the prompt"):
            pipe("a dog", [Subject(ref("red"), "cat")], **SIZE)

    def test_repeated_phrase_without_occurrence(self, pipe):
        with pytest.raises(ValueError, match="occurs 2 times in the prompt; pass occurrence=0..1"):
            pipe("a dog and another dog", [Subject(ref("red"), "dog"), Subject(ref("blue"), "dog", occurrence=1)], **SIZE)

    def test_occurrence_that_does_not_exist(self, pipe):
        with pytest.raises(ValueError, match="occurrence 2 does not exist"):
            pipe("a dog and another dog", [Subject(ref("red"), "dog", occurrence=2)], **SIZE)

    def test_too_many_subjects(self, pipe):
        subjects = [Subject(ref("red"), "dog", occurrence=i) for i in range(6)]
        with pytest.raises(ValueError, match="6 subjects given; this pipeline allows at most 5"):
            pipe("dog " * 6, subjects, **SIZE)

    def test_unreadable_image(self, pipe, tmp_path):
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not an image")
        with pytest.raises(ValueError, match="cannot read image"):
            pipe("a dog", [Subject(bad, "dog")], **SIZE)

    def test_size_not_a_multiple_of_16(self, pipe):
        with pytest.raises(ValueError, match="multiples of 16, got 60x64"):
            pipe("a dog", [], height=60, width=64, num_inference_steps=1)

    def test_mismatched_subject_counts_in_a_batch(self, pipe):
        with pytest.raises(ValueError, match="same number of subjects"):
            pipe(["a dog", "a dog and a cat"], [[Subject(ref("red"), "dog")], []], **SIZE)

    def test_true_cfg_scale_below_one(self, pipe):
        with pytest.raises(ValueError, match="true_cfg_scale must be >= 1"):
            pipe("a dog", true_cfg_scale=0.5, **SIZE)

    def test_negative_prompt_without_true_cfg(self, pipe):
        with pytest.raises(ValueError, match="negative_prompt is only used with true_cfg_scale > 1"):
            pipe("a dog", negative_prompt="blurry", **SIZE)

    def test_negative_prompt_count_differs_from_prompts(self, pipe):
        with pytest.raises(ValueError, match="got 1 negative prompts for 2 prompts"):
            pipe(["a dog", "a cat"], true_cfg_scale=2.0, negative_prompt=["blurry"], **SIZE)

    def test_not_a_flux_folder(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="model_index.json"):
            MUSARPipeline.from_pretrained(tmp_path)


def test_cpu_offload_moves_models_only_while_they_run(pipe):
    pipe.enable_model_cpu_offload("cpu")
    try:
        out = pipe("a dog and a cat", [Subject(ref("red"), "dog"), Subject(ref("blue"), "cat")], seed=0, **SIZE)
        assert out.images[0].size == (64, 64)
    finally:
        pipe._offload_device = None


def test_musar_generate_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MUSAR_CACHE", str(tmp_path / "cache"))
    ref("red").save(tmp_path / "dog.png")
    ref("blue").save(tmp_path / "cat.png")
    code = main(["generate", "--model", "tiny", "--prompt", "a dog and a cat", "--subject", f"{tmp_path}/dog.png=dog",
                 "--subject", f"{tmp_path}/cat.png=cat", "--steps", "2", "--height", "64", "--width", "64",
                 "--out", str(tmp_path / "out.png"), "--routing-map", str(tmp_path / "maps.png"),
                 "musar.condition_size=32"])  # fmt: skip
    assert code == 0
    assert Image.open(tmp_path / "out.png").size == (64, 64) and (tmp_path / "maps.png").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "a dog", "--subject", "dog.png", "--steps", "1"])
    assert exit_info.value.code == 1 and "expected IMAGE_PATH=PHRASE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [(["--negative-prompt", "blurry"], "negative_prompt is only used with true_cfg_scale > 1"),
     (["--true-cfg-scale", "0.5"], "true_cfg_scale must be >= 1")],
)  # fmt: skip
def test_musar_generate_rejects_bad_guidance_before_loading_a_model(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "/nonexistent", "--prompt", "a dog", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
