"""``musar quickstart``: the whole platform end to end on one machine, in a few minutes.

1. writes a small synthetic Subject200K-format set (procedural subjects, some low-quality rows);
2. builds single / random-diptych / same-category-diptych shards with the Ray Data pipeline;
3. trains the three curriculum stages with the tiny config on a local Ray (2 workers, DeepSpeed),
   each stage starting from the previous stage's LoRA, logging to a local MLflow store;
4. generates a two-subject image with the stage-3 LoRA and renders its routing map.
Then it prints where everything is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from musar_core import MusarConfig


@dataclass
class QuickstartConfig:
    output_dir: str = "outputs/quickstart"
    rows: int = 48  # synthetic Subject200K rows
    steps: int = 3  # optimizer steps per stage
    num_workers: int = 2
    zero_stage: int = 2
    image_scale: float = 0.125  # synthetic composites at 1/8 of Subject200K's 1056x528
    target_size: int = 64
    seed: int = 0
    musar: MusarConfig = field(default_factory=lambda: MusarConfig(condition_size=64, condition_prompt_max_tokens=32))


def run_quickstart(cfg: QuickstartConfig) -> dict:
    from pipelines.build import DataBuildConfig, build_shards
    from pipelines.panels import PanelGeometry
    from pipelines.synthetic import SynthConfig, write_synthetic
    from training.config import TrainConfig
    from training.driver import run_stage

    from .ray_cluster import ensure_ray

    started = time.perf_counter()
    ensure_ray(min_cpus=cfg.num_workers + 2)  # before the data build starts a Ray of its own
    root = Path(cfg.output_dir).resolve()
    geometry = PanelGeometry(scale=cfg.image_scale)
    print(f"[1/4] synthetic Subject200K-format data ({cfg.rows} rows)", flush=True)
    raw = write_synthetic(SynthConfig(output=str(root / "subject200k"), rows=cfg.rows, seed=cfg.seed, overwrite=True,
                                      geometry=geometry))  # fmt: skip
    print("[2/4] Ray Data: filter, crop, pair -> shards", flush=True)
    side = geometry.left_box[2] - geometry.left_box[0]
    manifest = build_shards(DataBuildConfig(input=str(raw), output=str(root / "shards"), seed=cfg.seed, overwrite=True,
                                            geometry=geometry, diptych_size=(2 * side, side)))  # fmt: skip
    lora, runs = None, []
    for stage in (1, 2, 3):
        print(f"[3/4] training stage {stage} ({cfg.steps} steps, {cfg.num_workers} workers, ZeRO-{cfg.zero_stage})", flush=True)
        train = TrainConfig(stage=stage, model="tiny", init_lora=lora, steps=cfg.steps, micro_batch_size=1, grad_accum=2,
                            num_workers=cfg.num_workers, zero_stage=cfg.zero_stage, checkpoint_every=cfg.steps,
                            log_every=1, seed=cfg.seed, output_dir=str(root / "train"), musar=cfg.musar)  # fmt: skip
        train.data.shards, train.data.target_size, train.data.max_prompt_tokens = str(root / "shards"), cfg.target_size, 160
        train.optim.lr, train.optim.warmup_steps = 1e-3, 1
        train.tracking.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        train.tracking.experiment, train.tracking.sample_count, train.tracking.sample_steps = "musar-quickstart", 1, 2
        result = run_stage(train)
        lora = str(result.lora_dir)
        runs.append(result.run_id)

    print("[4/4] two-subject generation with the stage-3 LoRA", flush=True)
    from musar.demo import DemoConfig, run_demo

    image = run_demo(DemoConfig(model="tiny", lora=lora, height=cfg.target_size, width=cfg.target_size, steps=4,
                                output_dir=str(root / "generation"), musar=cfg.musar))  # fmt: skip
    summary = {
        "synthetic data": str(raw),
        "shards": str(root / "shards"),
        "kept / input rows": f"{manifest['counts']['kept']} / {manifest['counts']['input_rows']}",
        "stage LoRAs": str(root / "train" / "stage{1,2,3}" / "lora"),
        "MLflow": f"sqlite:///{root / 'mlflow.db'} (runs {', '.join(r or '-' for r in runs)}); "
                  f"view: mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}",
        "generated image": str(image),
        "routing map": str(image.parent / "routing_map.png"),
    }
    print(f"\nquickstart finished in {time.perf_counter() - started:.0f}s")
    for key, value in summary.items():
        print(f"  {key:18s} {value}")
    return summary
