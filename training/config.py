"""Typed configuration of a training stage; validated on the driver before any worker starts.

Stages (paper 4.1): 1 = single-subject samples only (20k iterations); 2 = 80% random-pair diptychs
and 20% singles, mixed over micro-batches (10k); 3 = same-category diptychs (10k). Stage n + 1
starts from stage n's LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from musar_core import MusarConfig

STAGE_STEPS = {1: 20_000, 2: 10_000, 3: 10_000}
DATA_SOURCES = ("auto", "encoded", "images")
DIPTYCH_ROUTES = ("attention", "panels")
# stage -> (dataset folder, share of micro-batches) ; shares of a stage add up to 1
STAGE_DATA = {
    1: (("single", 1.0),),
    2: (("diptych_random", 0.8), ("single", 0.2)),
    3: (("diptych_same_category", 1.0),),
}


@dataclass
class DataConfig:
    shards: str = "outputs/shards"  # output folder of `musar data build`
    target_size: int = 512  # single-subject target side; diptych targets are 2x as wide
    diptych_fraction: float | None = None  # stage 2's diptych share of micro-batches (None: 0.8)
    max_prompt_tokens: int = 512  # T5 tokens of the target prompt (FLUX.1-dev: 512)
    # "auto": the shards' pre-encoded tensors (encoded/) when the build wrote them for this model and
    # sizes, else images; "encoded": require them; "images": always encode images on the workers.
    source: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    schedule: str = "constant"  # "constant" or "cosine", after warm-up
    grad_clip: float = 1.0


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///outputs/mlflow.db"
    experiment: str = "musar"
    run_name: str | None = None
    sample_grid: bool = True  # generate a few samples with the stage's LoRA at the end (a Ray task)
    sample_count: int = 2
    sample_steps: int = 28


@dataclass
class FaultConfig:
    max_failures: int = 2
    # Test hook: SIGKILL this worker rank once, when it reaches this optimizer step.
    kill_rank_at_step: tuple[int, int] | None = None


@dataclass
class TrainConfig:
    stage: int = 1
    model: str = "tiny"  # local FLUX.1 diffusers folder, or "tiny"
    init_lora: str | None = None  # previous stage's LoRA folder, or "mlflow:<run_id>"
    allow_missing_init: bool = False  # start stage 2/3 from fresh adapters (ablations only)
    steps: int | None = None  # optimizer steps; None: the paper's count for the stage
    micro_batch_size: int = 1
    grad_accum: int = 1
    num_workers: int = 2
    global_batch_size: int | None = None  # when set: must equal micro x accum x workers
    use_gpu: bool = False
    mixed_precision: str = "no"  # "bf16" on GPUs; "no" = fp32 (CPU)
    zero_stage: int = 2
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    log_every: int = 10  # MLflow metrics and Ray Train reports (reporting every fast step stalls: loop.py)
    seed: int = 0
    timestep_shift: float = 1.0  # > 1: more training at high noise (SD3 shift of the logit-normal draw)
    # How diptych target tokens pick their condition in training: "attention" (the paper: dynamic
    # routing, eqs. 2-4, from the base's attention to each condition's words) or "panels" (each token
    # the condition of its own panel: what a base that grounds the words would route). The toy base's
    # attention to its shape words carries no location, so "attention" routes at chance (README).
    diptych_routes: str = "attention"
    output_dir: str = "outputs/train"
    storage_path: str | None = None  # Ray Train storage (local path or s3://); None: <output_dir>/ray
    cpus_per_worker: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    musar: MusarConfig = field(default_factory=MusarConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGE_STEPS:
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        for name in ("micro_batch_size", "grad_accum", "num_workers", "checkpoint_every", "log_every", "cpus_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        if self.diptych_routes not in DIPTYCH_ROUTES:
            raise ValueError(f"diptych_routes must be one of {DIPTYCH_ROUTES}, got {self.diptych_routes!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.mixed_precision != "no" and not self.use_gpu:
            raise ValueError("mixed_precision needs use_gpu=true: CPU training runs in fp32")
        if self.global_batch_size is not None and self.global_batch_size != self.effective_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} but micro_batch_size x grad_accum x num_workers = "
                f"{self.micro_batch_size} x {self.grad_accum} x {self.num_workers} = {self.effective_batch_size}"
            )
        if self.optim.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {self.optim.schedule!r}")
        frac = self.data.diptych_fraction
        if frac is not None and not 0.0 <= frac <= 1.0:
            raise ValueError(f"data.diptych_fraction must lie in [0, 1], got {frac}")
        if self.data.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {DATA_SOURCES}, got {self.data.source!r}")
        if self.data.target_size % 16:
            raise ValueError(f"data.target_size must be a multiple of 16, got {self.data.target_size}")

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.num_workers

    @property
    def total_steps(self) -> int:
        return self.steps or STAGE_STEPS[self.stage]

    def data_mix(self) -> tuple[tuple[str, float], ...]:
        mix = STAGE_DATA[self.stage]
        if self.stage == 2 and self.data.diptych_fraction is not None:
            f = self.data.diptych_fraction
            mix = tuple((name, f if name.startswith("diptych") else 1 - f) for name, _ in mix)
        return tuple((name, share) for name, share in mix if share > 0)

    def resolved_storage(self) -> str:
        return self.storage_path or str(Path(self.output_dir).resolve() / "ray")
