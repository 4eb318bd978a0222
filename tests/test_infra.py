"""Infra definitions are real: they parse, validate, name files that exist and arguments the jobs accept."""

import shlex
from pathlib import Path

import pytest
import yaml

from musar.config import load_config
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S_VERSION = "1.31"
CRD_KINDS = {"RayCluster", "RayJob", "RayService"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_k8s_documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted((INFRA / "kuberay").glob("*.yaml")) + sorted((INFRA / "mlflow").glob("*.yaml"))
            for d in documents(p)]  # fmt: skip


def by_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in all_k8s_documents() if d["kind"] == kind]


def test_every_yaml_parses():
    files = list(INFRA.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        assert documents(path), path


@pytest.mark.parametrize("path_doc", [pd for pd in all_k8s_documents() if pd[1]["kind"] not in CRD_KINDS],
                         ids=lambda pd: f"{pd[0].name}:{pd[1]['kind']}:{pd[1]['metadata']['name']}")  # fmt: skip
def test_core_kubernetes_objects_validate_against_the_schema(path_doc):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(path_doc[1], K8S_VERSION, strict=True)


def test_ray_crds_have_the_fields_kuberay_needs():
    clusters, jobs = by_kind("RayCluster"), by_kind("RayJob")
    assert clusters and len(jobs) >= 4
    for _, doc in clusters:
        assert doc["apiVersion"] == "ray.io/v1"
        spec = doc["spec"]
        assert spec["headGroupSpec"]["template"]["spec"]["containers"]
        for group in spec["workerGroupSpecs"]:
            assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= group.keys()
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for _, doc in jobs:
        assert doc["apiVersion"] == "ray.io/v1" and doc["spec"]["entrypoint"]
        assert "clusterSelector" in doc["spec"] or "rayClusterSpec" in doc["spec"]


def _entrypoints():
    out = [(p.name, d["spec"]["entrypoint"]) for p, d in by_kind("RayJob")]
    for p, d in by_kind("ConfigMap"):
        for text in d.get("data", {}).values():
            inner = yaml.safe_load(text)
            if isinstance(inner, dict) and inner.get("kind") == "RayJob":
                out.append((f"{p.name}:configmap", inner["spec"]["entrypoint"]))
    return out


@pytest.mark.parametrize("name, entrypoint", _entrypoints())
def test_entrypoints_name_existing_scripts_and_arguments_their_parser_accepts(name, entrypoint, capsys):
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), entrypoint
    args = argv[2:]
    if "--config" in args:
        assert (ROOT / args[args.index("--config") + 1]).is_file()
    script = Path(argv[1]).stem
    if script.startswith("train_stage"):
        from training.jobs import stage_main

        assert stage_main(int(script[-1]), args + ["--print-config"]) == 0  # the real parser, no training
    else:
        from evaluation.run import EvalConfig, run_eval
        from musar.cli import job_main

        assert script == "eval_dreambench"
        assert job_main(EvalConfig, run_eval, args + ["--print-config"]) == 0
    capsys.readouterr()


def test_resources_match_the_training_config():
    cfg = load_config(TrainConfig, ROOT / "configs" / "a100_flux_dev.yaml", ["stage=1"])
    (_, cluster), = by_kind("RayCluster")
    group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "a100")
    gpus = int(group["rayStartParams"]["num-gpus"])
    cpus = int(group["rayStartParams"]["num-cpus"])
    container = group["template"]["spec"]["containers"][0]["resources"]
    assert int(container["limits"]["nvidia.com/gpu"]) == gpus and int(container["requests"]["cpu"]) >= cpus
    assert cfg.use_gpu and cfg.num_workers <= gpus * group["maxReplicas"]
    assert cfg.cpus_per_worker * min(gpus, cfg.num_workers) <= cpus
    launcher = documents(INFRA / "cluster-launcher" / "aws-a100.yaml")[0]
    node = launcher["available_node_types"]["a100"]["resources"]
    assert node["GPU"] == gpus and node["CPU"] == cpus
    assert launcher["docker"]["image"] == group["template"]["spec"]["containers"][0]["image"]


def test_scheduled_evaluation_submits_the_same_rayjob_as_the_manual_one():
    manual = documents(INFRA / "kuberay" / "rayjob-eval.yaml")[0]
    (_, cm), = [pd for pd in by_kind("ConfigMap") if pd[1]["metadata"]["name"] == "musar-eval-rayjob"]
    scheduled = yaml.safe_load(cm["data"]["rayjob.yaml"])
    assert scheduled["spec"]["entrypoint"] == manual["spec"]["entrypoint"]
    (_, cron), = by_kind("CronJob")
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == "musar-eval-rayjob"


def test_one_tracking_server_for_everything():
    (_, env), = [pd for pd in by_kind("ConfigMap") if pd[1]["metadata"]["name"] == "musar-env"]
    uri = env["data"]["MLFLOW_TRACKING_URI"]
    (_, svc), = [pd for pd in by_kind("Service") if pd[1]["metadata"]["name"] == "mlflow"]
    assert uri == f"http://mlflow.{svc['metadata']['namespace']}.svc:{svc['spec']['ports'][0]['port']}"
    assert load_config(TrainConfig, ROOT / "configs" / "a100_flux_dev.yaml").tracking.tracking_uri == uri


def test_dockerfiles_copy_what_exists():
    for name in ("Dockerfile", "Dockerfile.cpu"):
        for line in (INFRA / "docker" / name).read_text().splitlines():
            if line.startswith("COPY") and "--from" not in line:
                for src in line.split()[1:-1]:
                    if not src.startswith("--") and src != ".":
                        assert (ROOT / src).exists(), f"{name}: {src}"


def test_rayservice_serve_config_validates_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from musar.config import from_dict
    from serve.config import ServeAppConfig

    (_, service), = by_kind("RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(serve_config)
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (ROOT / module.replace(".", "/")).with_suffix(".py").is_file() and attr == "build_app"
    args = from_dict(ServeAppConfig, app["args"])  # the application's own typed config accepts them
    assert args.device == "cuda" and "stage3" in args.loras
    model = next(d for d in app["deployments"] if d["name"] == "MusarModel")
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus_available = int(group["rayStartParams"]["num-gpus"]) * group["maxReplicas"]
    assert model["ray_actor_options"]["num_gpus"] == 1
    assert model["autoscaling_config"]["max_replicas"] <= gpus_available
    assert model["max_ongoing_requests"] >= app["args"]["batching"]["max_batch_size"]
