"""Bounded HTTP load on the serving application: batching off vs on, side by side.

Starts a private local Ray, serves the tiny model on 127.0.0.1 (one model replica, fixed), and for each
mode sends exactly ``--requests`` compatible generation requests (same size, steps and subject count;
different prompts and seeds) from ``--concurrency`` client threads, after a short warm-up. It stops by
itself and prints throughput, p50/p99 latency, the mean batch size the server reported and the error
count per mode, then the batched / sequential throughput ratio. Traffic goes to 127.0.0.1 only.

    python benchmarks/serve_load.py                       # 64 requests, concurrency 8, batch 4
    python benchmarks/serve_load.py --requests 200 --concurrency 8 --batch-size 8 --json out.json

"Sequential" is the same application with ``batching.max_batch_size=1``: each request is its own
pipeline call. The model replica gets ``--replica-cpus`` CPUs (Ray sets its torch threads to that).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
JSON = {"Content-Type": "application/json"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64, help="timed requests per mode")
    p.add_argument("--concurrency", type=int, default=8, help="client threads sending at once (2 batches in flight)")
    p.add_argument("--batch-size", type=int, default=4, help="max_batch_size of the batched mode")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="batch_wait_timeout_s of the batched mode, in ms")
    p.add_argument("--size", type=int, default=128, help="output height = width (multiple of 16); 128 = the default")
    p.add_argument("--steps", type=int, default=8, help="8 = the default request of `musar serve`")
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--condition-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8, help="untimed requests per mode")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (= torch threads) of the model replica")
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args(argv)


def request_bodies(n: int, subjects: int, offset: int = 0) -> list[bytes]:
    from PIL import Image

    colours = ["red", "blue", "green", "orange", "purple"]
    things = ["dog", "cat", "teapot", "ball", "cube"]
    refs = []
    for k in range(subjects):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), colours[k]).save(buf, "PNG")
        refs.append(base64.b64encode(buf.getvalue()).decode())
    places = ["on the beach", "in the snow", "in a kitchen", "on a table", "in a garden", "on the moon"]
    bodies = []
    for i in range(n):
        prompt = "a " + " and a ".join(things[:subjects]) + " " + places[(i + offset) % len(places)]
        subs = [{"image": refs[k], "phrase": things[k]} for k in range(subjects)]
        bodies.append(json.dumps({"prompt": prompt, "subjects": subs, "seed": i + offset}).encode())
    return bodies


def run_load(url: str, bodies: list[bytes], concurrency: int) -> dict:
    import requests

    local = threading.local()

    def session():
        if not hasattr(local, "s"):
            local.s = requests.Session()
            local.s.trust_env = False  # loopback only, never a proxy
        return local.s

    def one(body: bytes):
        started = time.perf_counter()
        try:
            r = session().post(url + "/v1/generate", data=body, headers=JSON, timeout=300)
            ok = r.status_code == 200 and r.headers.get("content-type") == "image/png"
            batch = int(r.headers.get("x-batch-size", 0)) if ok else 0
            error = None if ok else f"{r.status_code} {r.text[:200]}"
        except Exception as err:  # counted, never raised: the run is bounded and reports errors
            ok, batch, error = False, 0, repr(err)
        return time.perf_counter() - started, ok, batch, error

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results if r[1])
    errors = [r[3] for r in results if not r[1]]
    return {
        "requests": len(bodies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "mean_batch": statistics.fmean(r[2] for r in results if r[1]) if latencies else 0.0,
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from musar_core import MusarConfig
    from serve.config import (
        AutoscalingConfig,
        BatchingConfig,
        DefaultsConfig,
        IngressDeploymentConfig,
        LimitsConfig,
        ModelDeploymentConfig,  # fmt: skip
        ServeAppConfig,
    )
    from serve.local import free_port, start_local

    ray.init(address="local", num_cpus=max(4, int(args.replica_cpus) + 2), include_dashboard=False,
             log_to_driver=False, configure_logging=False)  # fmt: skip
    port = free_port()
    modes = {"sequential": 1, "batched": args.batch_size}
    figures = {}
    try:
        for name, batch in modes.items():
            cfg = ServeAppConfig(
                model="tiny", musar=MusarConfig(condition_size=args.condition_size), app_name="musar-load",
                limits=LimitsConfig(max_size=max(512, args.size)),
                defaults=DefaultsConfig(steps=args.steps, height=args.size, width=args.size),
                batching=BatchingConfig(max_batch_size=batch, batch_wait_timeout_s=args.batch_wait_ms / 1000),
                model_deployment=ModelDeploymentConfig(
                    num_cpus=args.replica_cpus, max_ongoing_requests=max(8, 2 * args.concurrency),
                    max_queued_requests=4 * args.requests,
                    autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1)),
                ingress=IngressDeploymentConfig(num_cpus=0),
            )  # fmt: skip
            url = start_local(cfg, port=port)
            run_load(url, request_bodies(args.warmup, args.subjects, offset=10_000), args.concurrency)
            figures[name] = run_load(url, request_bodies(args.requests, args.subjects), args.concurrency)
            serve.delete(cfg.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()

    seq, bat = figures["sequential"], figures["batched"]
    ratio = bat["throughput_rps"] / seq["throughput_rps"] if seq["throughput_rps"] else float("nan")
    print(f"\nserve load: tiny model, {args.size}x{args.size}, {args.steps} steps, {args.subjects} subjects, "
          f"{args.requests} requests per mode at concurrency {args.concurrency}, 1 model replica "
          f"({args.replica_cpus:g} CPUs), batch wait {args.batch_wait_ms:g} ms")  # fmt: skip
    print(f"{'mode':<12}{'max batch':>10}{'req/s':>9}{'p50 s':>9}{'p99 s':>9}{'mean batch':>12}{'errors':>8}")
    for name, fig in figures.items():
        print(f"{name:<12}{modes[name]:>10}{fig['throughput_rps']:>9.2f}{fig['p50_s']:>9.3f}{fig['p99_s']:>9.3f}"
              f"{fig['mean_batch']:>12.2f}{fig['errors']:>8}")  # fmt: skip
    print(f"throughput ratio batched / sequential: {ratio:.2f}x (goal >= 2x at batch 4)")
    for name, fig in figures.items():
        for err in fig["first_errors"]:
            print(f"  {name} error: {err}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "figures": figures, "ratio": ratio}, indent=2))
    return 0 if seq["errors"] == bat["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
