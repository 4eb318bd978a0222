"""``musar serve``: the MUSAR HTTP service (Ray Serve) on this machine, until Ctrl-C.

    musar serve                                   # embedded tiny model on http://127.0.0.1:8000/
    musar serve --model /models/FLUX.1-dev --device cuda --dtype bfloat16 musar.condition_size=512 \\
        limits.max_size=1024 defaults.height=1024 defaults.width=1024 defaults.steps=28 \\
        loras.stage3=runs/stage3/lora loras.prod=mlflow:<run_id>
    musar serve --config my_serve.yaml --auth-token-env MUSAR_SERVE_TOKEN

Joins a running Ray cluster when there is one (RAY_ADDRESS, ``ray start --head``), else starts a local
Ray. The web page is at ``/``, the API at ``/v1/generate``, ``/v1/models`` and ``/healthz``. For a
cluster deployment use ``serve deploy serve/serve_config.yaml``.
"""

from __future__ import annotations

import time

from serve.config import ServeAppConfig

__all__ = ["ServeAppConfig", "run_serve"]


def run_serve(cfg: ServeAppConfig, *, block: bool = True) -> str:
    """Deploy the application and (with ``block``) serve until interrupted; returns the base URL."""
    from musar.ray_cluster import ensure_ray
    from serve.local import start_local

    ensure_ray()
    url = start_local(cfg)
    note = " (embedded tiny random model: images are noise)" if cfg.model == "tiny" else ""
    print(f"MUSAR is serving {cfg.model}{note} at {url}/  (API: {url}/v1/generate, {url}/v1/models, {url}/healthz)")
    if not block:
        return url
    from ray import serve

    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping: the application drains its requests, then its replicas exit")
        serve.delete(cfg.app_name)
    return url
