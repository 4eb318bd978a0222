"""Real Ray Train + DeepSpeed runs on 2 CPU workers (gloo), tiny model, a few steps each."""

import mlflow
import pytest
import torch
from shard_factory import write_training_shards

from musar_core import MusarTransformer
from training.config import TrainConfig
from training.driver import run_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_training_shards(tmp_path_factory.mktemp("shards"))


def _config(tmp_path, shards, tiny_flux_path, **kw) -> TrainConfig:
    cfg = TrainConfig(model=str(tiny_flux_path), steps=kw.pop("steps", 2), micro_batch_size=1, grad_accum=2, num_workers=2,
                      checkpoint_every=kw.pop("checkpoint_every", 2), log_every=1, output_dir=str(tmp_path / "out"), **kw)  # fmt: skip
    cfg.data.shards, cfg.data.target_size, cfg.data.max_prompt_tokens = str(shards), 32, 64
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 1
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.tracking.sample_count, cfg.tracking.sample_steps = 1, 1
    cfg.musar = cfg.musar.replace(condition_size=32, condition_prompt_max_tokens=16)
    return cfg


def _losses(cfg, run_id):
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    return [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]


def test_three_stages_chain_and_track(ray_local, tmp_path, shards, tiny_flux_path):
    previous = None
    for stage in (1, 2, 3):
        cfg = _config(tmp_path, shards, tiny_flux_path, stage=stage, init_lora=previous)
        result = run_stage(cfg)
        assert result.metrics["step"] == 2 and len(_losses(cfg, result.run_id)) == 2
        loaded = MusarTransformer.from_pretrained(tiny_flux_path, config=cfg.musar, lora=result.lora_dir)
        if previous is not None:  # stage n + 1 started from stage n's weights and moved on
            before = MusarTransformer.from_pretrained(tiny_flux_path, config=cfg.musar, lora=previous)
            diffs = [(a - b).abs().max().item() for a, b in zip(loaded.lora_parameters(), before.lora_parameters())]
            assert max(diffs) > 0
        previous = str(result.lora_dir)
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["stage"] == "3" and run.data.params["musar.subject_rank"] == "128"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"lora", "samples"} <= artifacts


@pytest.mark.timeout(600)  # three Ray Train runs, all start-up: 270 s alone on a slow 2-core machine
def test_zero_stages_give_the_same_losses(ray_local, tmp_path, shards, tiny_flux_path):
    losses = {}
    for zero in (0, 2, 3):
        cfg = _config(tmp_path / f"z{zero}", shards, tiny_flux_path, zero_stage=zero, steps=3, checkpoint_every=3)
        cfg.tracking.sample_grid = False
        losses[zero] = _losses(cfg, run_stage(cfg).run_id)
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[2]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(losses[3]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)


def test_resume_after_a_worker_is_killed(ray_local, tmp_path, shards, tiny_flux_path):
    cfg = _config(tmp_path, shards, tiny_flux_path, steps=4, checkpoint_every=2)
    cfg.faults.kill_rank_at_step = (1, 3)
    cfg.tracking.sample_grid = False
    result = run_stage(cfg)
    assert list((tmp_path / "out" / "ray").rglob(".killed-rank1-step3"))  # the kill happened
    assert result.metrics["step"] == 4
    assert result.metrics["resumed_from"] == 2  # continued from the step-2 checkpoint, not from scratch
    assert result.metrics["optimizer_step"] == 4  # Adam's state was restored, not re-initialised
