"""`ray job submit` of a training stage against a real `ray start --head` cluster.

This is how users run the jobs, and it differs from the in-process Ray of the other tests: the working
directory is uploaded and the job runs from a copy of it, with the cluster's Python environment.
The cluster here is its own head (own ports and temp dir), started with ``--block`` and terminated at
the end, so the test session's Ray is left alone.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from shard_factory import write_training_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip("the ray CLI is not installed beside this Python")
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics = _free_ports(6)
    temp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{ray_cli.parent}{os.pathsep}{os.environ['PATH']}"}
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=true",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start --head did not come up (exit code {head.poll()})") from None
                time.sleep(1)
        yield str(ray_cli), url, env
    finally:
        head.terminate()  # --block: the head stops every process it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(temp, ignore_errors=True)


def test_stage_runs_as_a_ray_job_against_a_real_cluster(ray_head, tmp_path, tiny_flux_path):
    ray_cli, url, env = ray_head
    shards = write_training_shards(tmp_path / "shards")
    db = tmp_path / "mlflow.db"
    job = subprocess.run(
        [ray_cli, "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
         "python", "jobs/train_stage1.py", "--config", "configs/local_tiny.yaml", f"model={tiny_flux_path}",
         f"data.shards={shards}", "data.target_size=32", f"output_dir={tmp_path / 'train'}", "steps=1",
         f"tracking.tracking_uri=sqlite:///{db}", "tracking.sample_grid=false"],
        env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    log = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in log, log[-4000:]
    lora = tmp_path / "train" / "stage1" / "lora"
    assert (lora / "subject" / "adapter_model.safetensors").is_file(), log[-4000:]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("musar-local").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["stage"] == "1" and runs[0].info.status == "FINISHED"
