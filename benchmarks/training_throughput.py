"""Training samples/s with 1 and 2 CPU workers on the same tiny config, side by side in one run.

Each worker runs one torch thread. On a 2-core machine Ray's own processes share the cores with
the workers, so the 2-worker figure is a floor, not the scaling a GPU cluster sees.

    python benchmarks/training_throughput.py [--steps 6] [--rows 48]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=48)
    args = parser.parse_args()

    import mlflow

    from musar.ray_cluster import ensure_ray
    from musar_core import MusarConfig
    from pipelines.build import DataBuildConfig, build_shards
    from pipelines.panels import PanelGeometry
    from pipelines.synthetic import SynthConfig, write_synthetic
    from training.config import TrainConfig
    from training.driver import run_stage

    ensure_ray(min_cpus=4)
    root = Path(tempfile.mkdtemp(prefix="musar-bench-"))
    geometry = PanelGeometry(scale=0.125)
    raw = write_synthetic(SynthConfig(output=str(root / "raw"), rows=args.rows, geometry=geometry))
    build_shards(DataBuildConfig(input=str(raw), output=str(root / "shards"), geometry=geometry, diptych_size=(128, 64),
                                 quiet=True))  # fmt: skip
    results = {}
    for workers in (1, 2):
        cfg = TrainConfig(stage=1, model="tiny", steps=args.steps, micro_batch_size=1, grad_accum=2, num_workers=workers,
                          checkpoint_every=args.steps, log_every=1, output_dir=str(root / f"w{workers}"),
                          musar=MusarConfig(condition_size=64, condition_prompt_max_tokens=32))  # fmt: skip
        cfg.data.shards, cfg.data.target_size, cfg.data.max_prompt_tokens = str(root / "shards"), 64, 128
        cfg.tracking.tracking_uri, cfg.tracking.sample_grid = f"sqlite:///{root / 'mlflow.db'}", False
        run_id = run_stage(cfg).run_id
        history = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri).get_metric_history(run_id, "samples_per_s")
        values = [m.value for m in sorted(history, key=lambda m: m.step)][1:]  # drop the warm-up step
        results[workers] = statistics.median(values)
    print(f"\ntiny config, stage 1, micro-batch 1 x accum 2 per worker, {args.steps} steps (first dropped):")
    for workers, sps in results.items():
        print(f"  {workers} worker(s): {sps:.2f} samples/s")
    print(f"  ratio 2 workers / 1 worker: {results[2] / results[1]:.2f}x")


if __name__ == "__main__":
    main()
