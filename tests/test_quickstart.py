"""The README's main command, end to end: synthetic data -> shards -> 3 stages -> generation."""

import json

import mlflow
import pytest
from PIL import Image

from musar.quickstart import QuickstartConfig, run_quickstart

pytestmark = pytest.mark.slow


def test_quickstart_runs_everything_and_says_where(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MUSAR_CACHE", str(tmp_path / "cache"))
    summary = run_quickstart(QuickstartConfig(output_dir=str(tmp_path / "qs"), rows=24, steps=2))
    out = capsys.readouterr().out
    assert "quickstart finished" in out and str(tmp_path / "qs") in out
    manifest = json.loads((tmp_path / "qs" / "shards" / "manifest.json").read_text())
    assert manifest["counts"]["input_rows"] == 24
    for stage in (1, 2, 3):
        assert (tmp_path / "qs" / "train" / f"stage{stage}" / "lora" / "musar_lora.json").is_file()
    assert Image.open(summary["generated image"]).size == (64, 64)
    assert Image.open(summary["routing map"]).size[0] > 64
    runs = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'qs' / 'mlflow.db'}").search_runs(
        [mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'qs' / 'mlflow.db'}")
         .get_experiment_by_name("musar-quickstart").experiment_id])  # fmt: skip
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
