"""`musar data synth`, `musar data build` and jobs/build_shards.py: flags, errors, and joining a running Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from musar.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["geometry.scale=0.125", "diptych_size=[128,64]", "quiet=true"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(out), "--rows", "30", "--seed", "2", "geometry.scale=0.125"]) == 0
    return out


def test_synth_writes_subject200k_layout(synth_dir):
    import pyarrow.parquet as pq

    schema = pq.read_schema(next(synth_dir.glob("*.parquet")))
    assert schema.names == ["image", "collection", "quality_assessment", "description"]
    assert [f.name for f in schema.field("image").type] == ["bytes", "path"]
    assert {f.name for f in schema.field("description").type} >= {"item", "category", "description_0", "description_1"}
    with pytest.raises(SystemExit) as exit_info:  # no silent overwrite of an existing set
        main(["data", "synth", "--output", str(synth_dir), "--rows", "5"])
    assert exit_info.value.code == 1


def test_build_through_the_cli(synth_dir, tmp_path, ray_local, capsys):
    out = tmp_path / "shards"
    argv = ["data", "build", "--input", str(synth_dir), "--output", str(out), "--seed", "3", "--min-score", "5",
            "--collection", "collection_2", "--limit", "25", *SMALL]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["counts"]["input_rows"] == 25
    assert manifest["config"]["collection"] == "collection_2" and manifest["config"]["min_score"] == 5
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1 and "already holds a build" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--input", "{tmp}/missing"], 1, "does not exist"),
        (["--input", "{tmp}/empty"], 1, "holds no .parquet files"),
        (["--input", "{tmp}/empty", "--min-score", "high"], 2, "min_score: expected an integer"),
        (["--input", "{tmp}/empty", "diptych_size=[3,4]"], 2, "diptych_size"),
        (["--input", "{tmp}/empty", "--limit", "0"], 2, "limit must be >= 1"),
    ],
)
def test_build_errors_name_the_problem(args, code, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["data", "build", "--output", str(tmp_path / "out")] + [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    assert message in capsys.readouterr().err


def test_output_uri_is_refused(synth_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "build", "--input", str(synth_dir), "--output", "s3://bucket/shards", *SMALL])
    assert exit_info.value.code == 1 and "local or shared-mount path" in capsys.readouterr().err


def test_job_entry_point_parser():
    help_run = subprocess.run([sys.executable, "jobs/build_shards.py", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
    assert help_run.returncode == 0 and "--input" in help_run.stdout and "--min-score" in help_run.stdout
    bad = subprocess.run([sys.executable, "jobs/build_shards.py", "--input", "x", "--output", "y", "--bogus", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr


def test_job_joins_the_running_cluster(synth_dir, tmp_path, ray_local):
    """As under `ray job submit`: RAY_ADDRESS names the cluster and the job connects instead of starting Ray."""
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    run = subprocess.run([sys.executable, str(ROOT / "jobs/build_shards.py"), "--input", str(synth_dir), "--output",
                          str(tmp_path / "job"), *SMALL], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=240, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Connecting to existing Ray cluster" in run.stderr
    assert json.loads((tmp_path / "job" / "manifest.json").read_text())["counts"]["input_rows"] == 30
