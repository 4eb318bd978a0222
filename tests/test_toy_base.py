"""The toy study's base model builder, at micro scale: a loadable FLUX folder with a word-level T5."""

import json

import pytest

from musar_core import MusarConfig, MUSARPipeline, Subject
from musar_core.encoding import phrase_token_span
from toystudy.base import ToyBaseConfig, build_toy_base, word_t5_tokenizer
from toystudy.world import VOCABULARY, describe_panel, sample_scene
from toystudy.world import Subject as ToySubject


def test_word_tokenizer_gives_one_token_per_world_word():
    import numpy as np

    tok = word_t5_tokenizer()
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng, 3)
        for text in (scene.prompt, describe_panel(scene.placements[0], scene.background, rng)):
            pieces = tok.tokenize(text)
            assert "<unk>" not in tok.convert_ids_to_tokens(tok(text).input_ids)
            assert len(pieces) == len(text.replace(",", " ,").replace(".", " .").split())
    phrase = ToySubject("heart", "blue", "dotted").phrase
    prompt = f"a red solid circle on the left and {phrase} on the right, on a white background"
    start = prompt.index(phrase)
    assert phrase_token_span(tok, prompt, start, start + len(phrase), 96) == (8, 4)
    assert len(VOCABULARY) < len(tok)


def test_micro_base_builds_and_loads_like_flux(tmp_path, capsys):
    cfg = ToyBaseConfig(output=str(tmp_path / "base"), scenes=24, vae_steps=2, vae_batch=4, steps=3, batch=4,
                        log_every=1, time_budget_min=None)  # fmt: skip
    out = build_toy_base(cfg)
    assert "rendered 24 scenes (6 wide, 6 pairs)" in capsys.readouterr().out  # pair scenes by default
    info = json.loads((out / "toy_base.json").read_text())
    assert info["steps_done"] == 3 and len(info["loss_curve"]) == 3
    pipe = MUSARPipeline.from_pretrained(out, config=MusarConfig(condition_size=64, subject_rank=4, noise_rank=2))
    assert pipe.encoders.pixels_per_token == 8  # 4x VAE: a 64 px panel is 8 x 8 tokens
    from PIL import Image

    ref = Image.new("RGB", (64, 64), "red")
    image = pipe("a red solid circle and a blue dotted heart, on a white background",
                 [Subject(ref, "a red solid circle"), Subject(ref, "a blue dotted heart")],
                 height=64, width=64, num_inference_steps=2, guidance_scale=1.0, seed=0).images[0]  # fmt: skip
    assert image.size == (64, 64)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        build_toy_base(cfg)
    more = build_toy_base(ToyBaseConfig(**{**cfg.__dict__, "output": str(tmp_path / "more"), "steps": 2,
                                           "resume_from": str(out), "train_clip": True, "pair_fraction": 0.0}))  # fmt: skip
    info = json.loads((more / "toy_base.json").read_text())
    assert info["steps_done"] == 2 and info["total_steps"] == 5 and info["resumed_from"]["steps"] == 3
    assert info["config"]["pair_fraction"] == 0.0
    assert "rendered 24 scenes (6 wide, 0 pairs)" in capsys.readouterr().out  # w5's recipe: no pair scenes
    with pytest.raises(ValueError, match="pair_fraction"):
        ToyBaseConfig(wide_fraction=0.5, pair_fraction=0.6)


def test_pool_weights_follow_the_scene_shares_and_keep_earlier_builds():
    from toystudy.base import pool_weights

    assert pool_weights(ToyBaseConfig(pair_fraction=0)).tolist() == [0.75, 0.25]  # w5's recipe: square, wide
    assert pool_weights(ToyBaseConfig()).tolist() == [0.5, 0.25, 0.25]  # the default: square, wide, pairs
    assert pool_weights(ToyBaseConfig(wide_fraction=0.0, pair_fraction=0.25)).tolist() == [0.75, 0.25]  # square, pairs
    assert pool_weights(ToyBaseConfig(), pairs=False).tolist() == [0.75, 0.25, 0.0]  # before pair_start
    assert pool_weights(ToyBaseConfig(), kinds=("square", "pair")).tolist() == [0.5, 0.25]  # no wide scene rendered
    with pytest.raises(ValueError, match="pair_start"):
        ToyBaseConfig(pair_start=1.0)


def test_pair_scenes_start_at_pair_start(tmp_path):
    """The curriculum: square and wide scenes first, pair scenes only after ``pair_start`` of the steps."""
    cfg = ToyBaseConfig(output=str(tmp_path / "base"), scenes=24, vae_steps=1, vae_batch=4, steps=16, batch=2,
                        log_every=4, time_budget_min=None, wide_fraction=0.25, pair_fraction=0.5, pair_start=0.5)  # fmt: skip
    info = json.loads((build_toy_base(cfg) / "toy_base.json").read_text())
    assert sum(info["pool_steps"].values()) == 16 and info["pool_steps"]["pair"] > 0
    assert info["first_pair_step"] > 8  # half the draws are pairs once they may be


def test_pair_scenes_repeat_one_subject_and_name_the_right_panel_by_shape_alone():
    """The copy prior: the right panel's colour and pattern are in the left panel's pixels, never in words."""
    import numpy as np

    from pipelines.samples import LEFT_INTRO, RIGHT_INTRO
    from toystudy.base import pair_scene
    from toystudy.detector import detect
    from toystudy.world import ALL_SUBJECTS

    tok = word_t5_tokenizer()
    for i in range(12):
        subject = ALL_SUBJECTS[(37 * i) % len(ALL_SUBJECTS)]
        image, prompt = pair_scene(subject, 64, np.random.default_rng(i))
        again, same = pair_scene(subject, 64, np.random.default_rng(i))
        assert (np.asarray(image) == np.asarray(again)).all() and prompt == same  # deterministic
        assert image.size == (128, 64)
        for half in (image.crop((0, 0, 64, 64)), image.crop((64, 0, 128, 64))):
            assert [d.subject for d in detect(half)] == [subject]
        left, right = prompt.removeprefix(LEFT_INTRO).split(RIGHT_INTRO)
        name, description = right.split(". ", 1)
        assert name == subject.shape.capitalize() and "this item" in description  # colour, pattern unnamed
        assert left.split(".")[0].lower().endswith(subject.shape)
        assert tok.unk_token_id not in tok(prompt).input_ids


def test_attribute_benchmark_reads_a_base_at_each_noise_level(tmp_path, monkeypatch, capsys):
    """benchmarks/toy_base_attributes.py on a micro base: one table row per sigma, rates in [0, 1]."""
    import runpy
    from pathlib import Path

    out = build_toy_base(ToyBaseConfig(output=str(tmp_path / "base"), scenes=8, vae_steps=1, vae_batch=2, steps=1,
                                       batch=2, time_budget_min=None))  # fmt: skip
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "toy_base_attributes.py")
    argv = [script, "--base", str(out), "--cases", "3", "--steps", "1", "--sigmas", "0.5", "1"]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(script, run_name="__main__")
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 0.5 |") or r.startswith("| 1 |")]
    assert len(rows) == 2
    assert all(0 <= float(v) <= 1 for r in rows for v in r.split("|")[2:7])
    monkeypatch.setattr("sys.argv", [*argv, "--cfg", "0.5"])
    with pytest.raises(SystemExit):  # argparse refuses a guidance scale below 1
        runpy.run_path(script, run_name="__main__")


@pytest.mark.parametrize("dropout, expect", [(0.0, "none"), (0.5, "some")])
def test_prompt_dropout_replaces_prompts_with_the_empty_prompt(dropout, expect):
    """The unconditional velocity that true CFG needs is only learnt if empty prompts are trained on."""
    import time

    import torch

    from toystudy.base import _Pool, _t5, pretrain

    tok = word_t5_tokenizer(max_length=12)
    null = tok([""], padding="max_length", max_length=12, return_tensors="pt").input_ids
    ids = tok(["a red solid circle"] * 8, padding="max_length", max_length=12, return_tensors="pt").input_ids
    clip_ids = torch.zeros(8, 77, dtype=torch.long)
    pool = _Pool(torch.randn(8, 16, 16), ids, torch.randn(8, 32), (4, 4), null, torch.zeros(1, 32), clip_ids, clip_ids[:1])

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.seen = _t5(64, len(tok)), []

        def forward(self, x):
            self.seen.append(x.clone())
            return self.inner(x)

    from diffusers import FluxTransformer2DModel

    t5 = Recording()
    cfg = ToyBaseConfig(steps=6, batch=8, layers=1, single_layers=1, heads=2, head_dim=16, time_budget_min=None,
                        prompt_dropout=dropout, train_clip=False)  # fmt: skip
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))  # fmt: skip
    pooled_seen = []
    transformer.register_forward_pre_hook(lambda m, a, kw: pooled_seen.append(kw["pooled_projections"].clone()),
                                          with_kwargs=True)  # fmt: skip
    pretrain(cfg, [pool], t5, lambda m: None, time.perf_counter(), transformer)
    rows, pooled = torch.cat(t5.seen), torch.cat(pooled_seen)
    empty = (rows == null).all(dim=1)
    assert ((rows == ids[0]).all(dim=1) | empty).all()  # every row is the prompt or the empty prompt
    assert (empty.sum() == 0) if expect == "none" else (0 < empty.sum() < len(rows))
    assert (pooled[empty] == 0).all() and (pooled[~empty] != 0).all()  # the pooled vector drops with its prompt


def test_prompt_dropout_must_leave_some_prompts():
    with pytest.raises(ValueError, match=r"prompt_dropout must lie in \[0, 1\)"):
        ToyBaseConfig(prompt_dropout=1.0)


def test_timestep_shift_moves_training_toward_high_noise():
    """Shift s maps each logit-normal draw t to s t / (1 + (s - 1) t) on the same RNG stream, so
    s = 1 reproduces earlier builds and s > 1 trains more where a silhouette is decided."""
    import time

    import torch
    from diffusers import FluxTransformer2DModel

    from toystudy.base import _Pool, _t5, pretrain

    tok = word_t5_tokenizer(max_length=12)
    ids = tok(["a red solid circle"] * 8, padding="max_length", max_length=12, return_tensors="pt").input_ids
    clip_ids = torch.zeros(8, 77, dtype=torch.long)
    pool = _Pool(torch.randn(8, 16, 16), ids, torch.randn(8, 32), (4, 4), ids[:1], torch.zeros(1, 32), clip_ids,
                 clip_ids[:1])  # fmt: skip
    seen = {}
    for shift in (1.0, 3.0):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                             pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))  # fmt: skip
        seen[shift] = []
        transformer.register_forward_pre_hook(lambda m, a, kw, s=shift: seen[s].append(kw["timestep"].clone()),
                                              with_kwargs=True)  # fmt: skip
        cfg = ToyBaseConfig(steps=5, batch=8, layers=1, single_layers=1, heads=2, head_dim=16, time_budget_min=None,
                            prompt_dropout=0.0, timestep_shift=shift, train_clip=False)  # fmt: skip
        pretrain(cfg, [pool], _t5(64, len(tok)), lambda m: None, time.perf_counter(), transformer)
    plain, shifted = torch.cat(seen[1.0]), torch.cat(seen[3.0])
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert (shifted > plain).all() and ((0 < shifted) & (shifted < 1)).all()
    with pytest.raises(ValueError, match="timestep_shift must be > 0"):
        ToyBaseConfig(timestep_shift=0.0)


@pytest.mark.parametrize("train_clip", [False, True])
def test_clip_trains_only_when_asked(train_clip):
    """A trained CLIP gives the AdaLN path the prompt's meaning; a frozen one must stay as saved."""
    import time

    import torch

    from toystudy.base import _clip, _Pool, _t5, pretrain

    clip_tokenizer, clip = _clip(32)
    tok = word_t5_tokenizer(max_length=12)
    prompts = ["a red solid circle", "a blue heart", "a green dotted square", "a ring"]
    clip_ids = clip_tokenizer(prompts + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids = tok(prompts + [""], padding="max_length", max_length=12, return_tensors="pt").input_ids
    clip.eval().requires_grad_(False)  # as the build hands it over
    with torch.no_grad():
        pooled = clip(clip_ids).pooler_output
    pool = _Pool(torch.randn(4, 16, 16), ids[:-1], pooled[:-1], (4, 4), ids[-1:], pooled[-1:], clip_ids[:-1],
                 clip_ids[-1:])  # fmt: skip
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    cfg = ToyBaseConfig(steps=3, batch=4, layers=1, single_layers=1, heads=2, head_dim=16, time_budget_min=None,
                        train_clip=train_clip)  # fmt: skip
    pretrain(cfg, [pool], _t5(64, len(tok)), lambda m: None, time.perf_counter(), clip=clip)
    changed = any(not torch.equal(before[k], v) for k, v in clip.state_dict().items())
    assert changed == train_clip
    assert not any(p.requires_grad for p in clip.parameters())  # frozen again for saving and sampling
    with pytest.raises(ValueError, match="train_clip needs the CLIP text model"):
        pretrain(ToyBaseConfig(steps=1, train_clip=True), [pool], _t5(64, len(tok)), lambda m: None, time.perf_counter())
