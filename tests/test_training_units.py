"""Training pieces that need no cluster: objective, config validation, data mix, schedules."""

import pytest
import torch
from helpers import make_inputs, randomize_lora, tiny_transformer

from musar.config import ConfigError, load_config
from musar_core import MusarTransformer
from musar_core.objective import EncodedBatch, flow_matching_loss, sample_timesteps
from training.config import TrainConfig
from training.engine import deepspeed_config, lr_lambda
from training.loop import choose_dataset


def _batch(stock, conditions=((2, (2, 2)), (3, (2, 2)))):
    inp = make_inputs(stock, batch=2, conditions=list(conditions))
    return EncodedBatch(inp["hidden_states"], inp["img_ids"], inp["encoder_hidden_states"], inp["pooled_projections"],
                        inp["txt_ids"], inp["conditions"], inp["phrase_spans"])  # fmt: skip


def test_objective_is_velocity_mse_on_target_tokens_with_conditions_at_t0():
    stock = tiny_transformer(seed=30)
    model = MusarTransformer(stock).add_lora()
    batch = _batch(stock)
    seen = []
    handle = stock.time_text_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    gen = torch.Generator().manual_seed(5)
    loss = flow_matching_loss(model, batch, generator=gen)
    handle.remove()
    # Recompute by hand with the same random draws.
    gen = torch.Generator().manual_seed(5)
    t = sample_timesteps(2, gen)
    eps = torch.randn(batch.target_latents.shape, generator=gen)
    x0 = batch.target_latents
    pred = model(hidden_states=(1 - t[:, None, None]) * x0 + t[:, None, None] * eps, encoder_hidden_states=batch.prompt_embeds,
                 pooled_projections=batch.pooled, timestep=t, img_ids=batch.img_ids, txt_ids=batch.txt_ids,
                 guidance=torch.ones(2), conditions=batch.conditions, phrase_spans=batch.phrase_spans).sample  # fmt: skip
    assert pred.shape == x0.shape  # target tokens only
    torch.testing.assert_close(loss, ((pred - (eps - x0)) ** 2).mean())
    assert torch.allclose(seen[0], t * 1000)  # the target's embedding
    assert all(torch.equal(s, torch.zeros(2)) for s in seen[1:]) and len(seen) == 3  # both conditions at t = 0


def test_panel_routes_send_each_diptych_panel_to_its_condition():
    from musar_core.conditions import image_ids
    from training.batches import panel_routes

    stock = tiny_transformer(seed=31)
    batch = _batch(stock)
    batch.target_latents, batch.img_ids = batch.target_latents.repeat(1, 2, 1), image_ids(4, 8)  # a 4 x 8 diptych
    routes = panel_routes(batch)
    assert routes.shape == (2, 32) and routes.dtype == torch.long
    assert routes[0].view(4, 8).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]] * 4 and torch.equal(routes[0], routes[1])
    # the loss passes them on: routes that send every token to condition 1 give another loss
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    model = MusarTransformer(stock).add_lora()
    randomize_lora(model)
    batch.routes = routes
    panels = flow_matching_loss(model, batch, generator=gen())
    batch.routes = torch.ones_like(routes)
    assert not torch.allclose(flow_matching_loss(model, batch, generator=gen()), panels)
    assert panel_routes(_batch(stock, conditions=((2, (2, 2)),))) is None  # one condition: nothing to route
    batch.img_ids = image_ids(4, 7)
    with pytest.raises(ValueError, match="does not split into 2 equal panels"):
        panel_routes(batch)


def test_timesteps_are_logit_normal():
    t = sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(torch.logit(t).std().item() - 1) < 0.02


def test_timestep_shift_moves_draws_toward_high_noise():
    plain = sample_timesteps(20000, torch.Generator().manual_seed(0))
    shifted = sample_timesteps(20000, torch.Generator().manual_seed(0), shift=3.0)
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))  # the same draws, mapped
    assert torch.equal(sample_timesteps(64, torch.Generator().manual_seed(1), shift=1.0),
                       sample_timesteps(64, torch.Generator().manual_seed(1)))  # fmt: skip
    assert abs(shifted.median().item() - 0.75) < 0.01
    with pytest.raises(ValueError, match="timestep shift must be > 0"):
        sample_timesteps(2, shift=0.0)
    with pytest.raises(ValueError, match="timestep_shift must be > 0"):
        TrainConfig(timestep_shift=-1.0)


def test_loss_goes_down_when_overfitting_one_batch():
    stock = tiny_transformer(seed=31)
    model = MusarTransformer(stock).add_lora()
    stock.requires_grad_(False)
    params = model.lora_parameters()
    for p in params:
        p.requires_grad_(True)
    base = {k: v.clone() for k, v in stock.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW(params, lr=3e-3)
    batch = _batch(stock)
    losses = []
    for _ in range(40):
        loss = flow_matching_loss(model, batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    after = {k: v for k, v in stock.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], base[k]) for k in base)  # base weights bitwise unchanged


def test_stage_mix_is_80_20_over_micro_batches():
    cfg = TrainConfig(stage=2)
    kinds = [choose_dataset(cfg, step, micro) for step in range(2000) for micro in range(2)]
    share = kinds.count("diptych_random") / len(kinds)
    assert 0.77 < share < 0.83 and set(kinds) == {"diptych_random", "single"}
    assert kinds == [choose_dataset(cfg, step, micro) for step in range(2000) for micro in range(2)]  # by step
    assert {choose_dataset(TrainConfig(stage=3), s, 0) for s in range(50)} == {"diptych_same_category"}
    half = TrainConfig(stage=2)
    half.data.diptych_fraction = 0.5
    assert dict(half.data_mix()) == {"diptych_random": 0.5, "single": 0.5}


def test_deepspeed_batch_arithmetic_and_schedule():
    cfg = TrainConfig(micro_batch_size=2, grad_accum=3, num_workers=4, global_batch_size=24, zero_stage=3, steps=100)
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match=r"global_batch_size=32 but .* = 2 x 3 x 4 = 24"):
        TrainConfig(micro_batch_size=2, grad_accum=3, num_workers=4, global_batch_size=32)
    cosine = TrainConfig(steps=100)
    cosine.optim.warmup_steps, cosine.optim.schedule = 10, "cosine"
    g = lr_lambda(cosine)
    assert g(0) == pytest.approx(0.1) and g(9) == pytest.approx(1.0) and g(100) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stage=4"], "stage must be 1, 2 or 3"),
        (["zero_stage=5"], "zero_stage"),
        (["mixed_precision=bf16"], "mixed_precision needs use_gpu"),
        (["optim.schedule=linear"], "optim.schedule"),
        (["data.diptych_fraction=1.5"], "diptych_fraction"),
        (["micro_batch_size=0"], "micro_batch_size"),
        (["optim.lr=fast"], "optim.lr: expected a number"),
        (["diptych_routes=random"], "diptych_routes must be one of"),
    ],
)
def test_config_validation_names_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, None, overrides)


def test_shipped_configs_resolve_and_validate():
    a100 = load_config(TrainConfig, "configs/a100_flux_dev.yaml", ["stage=3"])
    assert a100.effective_batch_size == 16 and a100.total_steps == 10_000 and a100.musar.subject_rank == 128
    assert load_config(TrainConfig, "configs/a100_flux_dev.yaml", ["stage=1"]).total_steps == 20_000
    tiny = load_config(TrainConfig, "configs/local_tiny.yaml")
    assert tiny.num_workers == 2 and tiny.zero_stage == 2 and not tiny.use_gpu


def test_stage_two_without_previous_lora_is_refused(tmp_path):
    from musar_core.tiny import build_tiny_flux
    from training.driver import resolve_init_lora

    model_dir = build_tiny_flux(tmp_path / "m")
    with pytest.raises(ValueError, match="stage 2 starts from stage 1's LoRA"):
        resolve_init_lora(TrainConfig(stage=2), model_dir)
    assert resolve_init_lora(TrainConfig(stage=2, allow_missing_init=True), model_dir) is None
    model = MusarTransformer.from_pretrained(model_dir).add_lora()
    randomize_lora(model)
    good = model.save_lora(tmp_path / "lora")
    assert resolve_init_lora(TrainConfig(stage=2, init_lora=str(good)), model_dir) == good
    cfg = TrainConfig(stage=2, init_lora=str(good))
    cfg.musar = cfg.musar.replace(noise_rank=8)
    with pytest.raises(ValueError, match="noise_rank: LoRA has 4, config has 8"):
        resolve_init_lora(cfg, model_dir)
