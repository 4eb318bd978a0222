"""Toy-study models one at a time on two threads vs two at a time on one thread each, in one run.

Trains and judges the same models (the full variant, one per seed) through the study's own
``train_and_judge_all`` twice: ``concurrent_models=1, cpus_per_worker=2`` (the study's setting
before concurrency), then ``concurrent_models=2, cpus_per_worker=1`` (its default). Prints the wall
time of each and their ratio. The toy's matrices are too small for a second torch thread to help
much, and one model's Ray Train start-up overlaps the other's steps; on a machine with more cores
than Ray Train workers, both settings gain less from each other.

    python benchmarks/study_concurrency.py --base outputs/toy/base --shards outputs/toy/study/shards \\
        [--models 2] [--steps 150 40 40] [--eval-cases 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a `musar toy base` folder")
    parser.add_argument("--shards", required=True, help="a toy study's shards folder (with encoded/)")
    parser.add_argument("--models", type=int, default=2, help="models (training seeds) per setting")
    parser.add_argument("--steps", type=int, nargs=3, default=[150, 40, 40], help="steps of stages 1-3")
    parser.add_argument("--eval-cases", type=int, default=2, help="judging cases per subject count")
    args = parser.parse_args()
    if args.models < 1 or min(args.steps) < 1 or args.eval_cases < 1:
        parser.error("--models, --steps and --eval-cases must be >= 1")
    shards = Path(args.shards).expanduser().absolute()
    if not list((shards / "encoded" / "single").glob("*.parquet")):
        parser.error(f"no encoded shards in {shards / 'encoded'}: run a toy study (it pre-encodes its shards) first")

    from musar.ray_cluster import ensure_ray
    from toystudy.study import StudyConfig, evaluation_cases, train_and_judge_all

    root = Path(tempfile.mkdtemp(prefix="musar-concurrency-"))
    base = StudyConfig(base=str(Path(args.base).expanduser().absolute()), output=str(root), stage_steps=tuple(args.steps),
                       seeds=tuple(range(args.models)), eval_cases=args.eval_cases, eval_seeds=1,
                       tracking_uri=f"sqlite:///{root / 'mlflow.db'}")  # fmt: skip
    ensure_ray(min_cpus=base.concurrent_models + 2)
    cases = evaluation_cases(base)
    settings = {"1 model at a time, 2 threads": dict(concurrent_models=1, cpus_per_worker=2),
                "2 models at a time, 1 thread each": dict(concurrent_models=2, cpus_per_worker=1)}  # fmt: skip
    seconds = {}
    for name, change in settings.items():
        cfg = dataclasses.replace(base, output=str(root / name.split(",")[0].replace(" ", "-")), **change)
        tick = time.perf_counter()
        train_and_judge_all(cfg, [("full", seed, None) for seed in cfg.seeds], shards, cases)
        seconds[name] = time.perf_counter() - tick
        print(f"[study concurrency] {name}: {seconds[name]:.0f} s", flush=True)
    one, two = seconds.values()
    print(f"\n{args.models} full models, stage steps {args.steps}, {args.eval_cases} judging cases per subject count:")
    for name, s in seconds.items():
        print(f"  {name}: {s:.0f} s ({s / args.models:.0f} s per model)")
    print(f"  speed-up of 2 at a time: {one / two:.2f}x")


if __name__ == "__main__":
    main()
