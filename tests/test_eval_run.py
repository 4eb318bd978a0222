"""End to end: tiny FLUX + tiny metric models on a small DreamBench subset, one complete MLflow run,
then a resumed rerun; plus fail-fast errors before any work."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from helpers import randomize_lora
from mlflow.tracking import MlflowClient
from PIL import Image

from evaluation.generate import generate_images, image_path
from evaluation.metric_models import MetricModelError, build_tiny_clip, build_tiny_dino
from evaluation.run import EvalConfig, EvalTrackingConfig, plan_eval, run_eval
from musar.cli import job_main
from musar_core import MusarConfig, MusarTransformer

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "dreambench"
CASES = ["single/backpack/01", "single/dog/10", "multi/pair_39", "multi/triplet_08"]
SEEDS = 2


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_flux_path) -> EvalConfig:
    if not (DREAMBENCH / "prompts_and_classes.txt").is_file():
        pytest.fail(f"the DreamBench test copy is missing: expected {DREAMBENCH} (shared/ beside the repository)")
    root = tmp_path_factory.mktemp("eval")
    build_tiny_dino(root / "dino")
    build_tiny_clip(root / "clip")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # A trained-looking LoRA (ranks unlike the eval config's defaults), published as a training run's artifact.
    model = MusarTransformer.from_pretrained(tiny_flux_path, config=MusarConfig(subject_rank=4, noise_rank=2, condition_size=64))
    model.add_lora()
    randomize_lora(model)
    model.save_lora(root / "stage3" / "lora", training_stage=3)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("train")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(root / "stage3" / "lora"), artifact_path="lora")
    # An external case file: a folder of images of our own beside a DreamBench subject.
    (root / "my_can").mkdir()
    for i in range(2):
        shutil.copy(DREAMBENCH / "can" / f"0{i}.jpg", root / "my_can" / f"{i}.jpg")
    (root / "mycases.json").write_text(json.dumps([{"id": "can_cat", "prompt": "a can and a cat on the moon",
        "subjects": [{"dir": "my_can", "phrase": "can"}, {"name": "cat", "phrase": "cat"}]}]))  # fmt: skip
    return EvalConfig(
        dreambench=str(DREAMBENCH), model=str(tiny_flux_path), lora=f"mlflow:{run.info.run_id}",
        dino_model=str(root / "dino"), clip_model=str(root / "clip"), cases=CASES + ["external/*"],
        case_files=[str(root / "mycases.json")], num_seeds=SEEDS, height=64, width=64, steps=1, max_sequence_length=32,
        output_dir=str(root / "out"), quiet=True, musar=MusarConfig(condition_size=64, condition_prompt_max_tokens=16),
        tracking=EvalTrackingConfig(tracking_uri=uri, experiment="eval-test", sample_cases=2),
    )  # fmt: skip


@pytest.fixture(scope="module")
def first(config, ray_local):
    return run_eval(config)


def test_end_to_end_logs_a_complete_mlflow_run(config, first):
    client = MlflowClient(config.tracking.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["musar.kind"] == "eval"
    p, m = run.data.params, run.data.metrics
    assert p["lora"] == config.lora and p["lora_fingerprint"] != "none" and p["model"] == config.model
    assert p["musar.subject_rank"] == "4" and p["musar.noise_rank"] == "2"  # taken from the LoRA's metadata
    assert p["seeds"] == "0,1" and p["split.single.cases"] == "2/750" and p["split.multi.cases"] == "2/80"
    assert p["split.external/mycases.cases"] == "1/1" and len(p["split.multi.fingerprint"]) == 16
    assert p["dino_standard"] == "False" and p["generation_fingerprint"] == first.image_root.name
    for split in ("single", "multi", "external/mycases"):
        assert all(f"{split}/{k}" in m for k in ("dino", "clip_i", "clip_t"))
        assert -1 <= m[f"{split}/dino"] <= 1 and -100 <= m[f"{split}/clip_t"] <= 100
    assert (m["single/cases"], m["single/images"], m["multi/images"]) == (2, 4, 4)
    assert {"single/subject/dog/dino", "multi/subject/dog5/clip_i", "multi/subject/monster_toy/clip_t",
            "external/mycases/subject/my_can/dino"} <= set(m)  # fmt: skip
    assert m["generation/generated"] == 10 and m["generation/skipped"] == 0

    artifacts = {f.path for f in client.list_artifacts(first.run_id)} | {
        f.path for d in ("tables", "samples") for f in client.list_artifacts(first.run_id, d)}  # fmt: skip
    assert {"config.json", "report.md", "report.html", "tables/images.parquet", "tables/images.csv", "tables/cases.csv",
            "tables/subjects.csv", "samples/single.png", "samples/multi.png",
            "samples/external_mycases.png"} <= artifacts  # fmt: skip
    cases = Path(client.download_artifacts(first.run_id, "tables/cases.csv")).read_text().splitlines()
    assert len(cases) == 1 + 5 and any("multi/triplet_08" in line and "can+duck_toy+monster_toy" in line for line in cases)
    grid = Image.open(client.download_artifacts(first.run_id, "samples/multi.png"))
    assert grid.width == (3 + SEEDS) * 128 + 16  # references | generations of the triplet row
    report = Path(client.download_artifacts(first.run_id, "report.md")).read_text()
    assert "| MUSAR (paper) | 0.774 | 30.29 | 0.833 | 0.704 | 33.90 | 0.720 |" in report
    assert f"this run ({run.info.run_name})" in report and "not comparable with Table 1" in report
    assert "![multi](samples/multi.png)" in report and "<table>" in Path(first.report_dir / "report.html").read_text()

    # images are stored with their case metadata (sidecar + PNG text chunk)
    path = image_path(first.image_root, "multi/pair_39", 1)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["prompt"] == "a dog and another dog on the beach" and meta["seed"] == 1
    assert [(s["name"], s["occurrence"]) for s in meta["subjects"]] == [("dog3", 0), ("dog5", 1)]
    assert json.loads(Image.open(path).text["musar"])["case_id"] == "multi/pair_39"
    assert Image.open(path).size == (64, 64)


def test_rerun_resumes_regenerates_only_what_is_missing(config, first):
    pngs = sorted(first.image_root.rglob("*.png"))
    assert len(pngs) == 5 * SEEDS
    lost = image_path(first.image_root, "single/dog/10", 1)
    original = lost.read_bytes()
    lost.unlink()
    before = {p: p.stat().st_mtime_ns for p in pngs if p != lost}
    second = run_eval(config)
    assert (second.generation.generated, second.generation.skipped) == (1, 5 * SEEDS - 1)
    assert lost.read_bytes() == original  # same seed, same image
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished images were not touched
    assert second.metrics["single/dino"] == pytest.approx(first.metrics["single/dino"])
    report = (second.report_dir / "report.md").read_text()
    first_name = MlflowClient(config.tracking.tracking_uri).get_run(first.run_id).info.run_name
    assert f"| {first_name} |" in report and "| yes |" in report  # the previous run, same cases and seeds

    # Nothing left: no pipeline call at all (no Ray job even starts).
    plan = plan_eval(config)
    stats = generate_images(**plan.generation_kwargs(config))
    assert (stats.generated, stats.skipped, stats.actors) == (0, 5 * SEEDS, 0)
    # A changed generation setting is a different fingerprint, hence a different folder.
    assert plan_eval(dataclasses.replace(config, steps=2)).image_root != plan.image_root


def test_an_edited_case_is_not_reused(config, first, tmp_path):
    cfg = dataclasses.replace(config, splits=[], cases=[], case_files=[str(tmp_path / "mycases.json")])
    (tmp_path / "my_can").symlink_to(Path(config.case_files[0]).parent / "my_can")
    entry = json.loads(Path(config.case_files[0]).read_text())[0]
    (tmp_path / "mycases.json").write_text(json.dumps([entry]))
    plan = plan_eval(cfg)
    assert generate_images(**{**plan.generation_kwargs(cfg), "quiet": True}).generated == 0  # same case: reused
    (tmp_path / "mycases.json").write_text(json.dumps([{**entry, "prompt": "a can and a cat on mars"}]))
    plan = plan_eval(cfg)
    kwargs = plan.generation_kwargs(cfg)
    assert generate_images(**{**kwargs, "seeds": [0]}).generated == 1  # same id, new prompt: regenerated


@pytest.mark.parametrize("key", ["dino_model", "clip_model"])
def test_missing_metric_model_folder_fails_before_any_work(config, tmp_path, key):
    cfg = dataclasses.replace(config, output_dir=str(tmp_path / "out"), **{key: str(tmp_path / "missing")})
    with pytest.raises(MetricModelError, match=f"^{key}: .*missing does not exist"):
        run_eval(cfg)
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_missing_metric_model_by_its_key(config, tmp_path, capsys):
    argv = ["--dreambench", config.dreambench, "--model", config.model, "--clip-model", config.clip_model,
            "--dino-model", str(tmp_path / "nowhere"), "--limit", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        job_main(EvalConfig, run_eval, argv, prog="musar eval")
    assert exit_.value.code == 1 and "dino_model:" in capsys.readouterr().err


def test_job_script_runs_as_a_plain_script(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "eval_dreambench.py"), "--print-config", "--limit", "3",
                          "tracking.experiment=x"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "limit: 3" in out.stdout and "experiment: x" in out.stdout and "num_seeds: 4" in out.stdout
