"""``ServeAppConfig``: everything the serving application reads, as one typed dataclass.

The same object drives ``musar serve`` (CLI flags and ``dotted.key=value`` overrides through
:func:`musar.cli.job_main`) and ``serve deploy serve/serve_config.yaml`` (the application's ``args``
are parsed with :func:`musar.config.from_dict`, so a wrong type names the field before any replica
starts). Defaults serve the embedded tiny model on loopback; a real model is a ``model`` folder plus
``musar.condition_size=512`` and larger size bounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from musar_core import MusarConfig

# A LoRA id is a name chosen by the operator, never a path: it cannot contain "/" or start with ".".
LORA_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class LimitsConfig:
    """What one request may ask for; every violation is a 4xx naming the field."""

    max_subjects: int = 5
    max_upload_bytes: int = 8 * 2**20  # one subject image, encoded (before base64)
    max_pixels: int = 4096 * 4096  # one subject image, decoded: larger is refused before decoding
    max_prompt_chars: int = 1000
    min_steps: int = 1
    max_steps: int = 50
    min_size: int = 64  # output height and width, pixels (multiples of 16)
    max_size: int = 512
    min_guidance: float = 0.0
    max_guidance: float = 20.0
    request_timeout_s: float = 120.0  # from the ingress receiving the request to the model's answer

    def max_request_bytes(self) -> int:
        """The body of a request with the most subjects, base64-encoded, plus room for the fields."""
        return self.max_subjects * (self.max_upload_bytes * 4 // 3 + 4096) + 64 * 1024

    def __post_init__(self) -> None:
        for name in ("max_subjects", "max_upload_bytes", "max_pixels", "max_prompt_chars", "min_steps", "min_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < self.min_steps:
            raise ValueError(f"limits.max_steps ({self.max_steps}) is below limits.min_steps ({self.min_steps})")
        if self.max_size < self.min_size or self.min_size % 16 or self.max_size % 16:
            raise ValueError(f"limits.min_size/max_size must be multiples of 16 with min <= max, "
                             f"got {self.min_size}/{self.max_size}")  # fmt: skip
        if self.max_guidance < self.min_guidance:
            raise ValueError("limits.max_guidance is below limits.min_guidance")
        if self.request_timeout_s <= 0:
            raise ValueError("limits.request_timeout_s must be > 0")


@dataclass
class DefaultsConfig:
    """Values a request may leave out."""

    steps: int = 8
    height: int = 128
    width: int = 128
    guidance: float = 3.5
    seed: int = 0


@dataclass
class BatchingConfig:
    """``@serve.batch`` of compatible requests (same size, steps, guidance, subject count and LoRA)."""

    max_batch_size: int = 4  # 1 turns batching off: every request is its own pipeline call
    batch_wait_timeout_s: float = 0.05

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"batching.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError("batching.batch_wait_timeout_s must be >= 0")


@dataclass
class AutoscalingConfig:
    """Ray Serve's ``autoscaling_config`` of the model deployment."""

    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None
    target_ongoing_requests: float = 4.0  # per replica; about one full batch
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    metrics_interval_s: float = 5.0
    look_back_period_s: float = 20.0

    def to_serve(self) -> dict:
        out = {k: getattr(self, k) for k in ("min_replicas", "max_replicas", "target_ongoing_requests",
                                              "upscale_delay_s", "downscale_delay_s", "metrics_interval_s",
                                              "look_back_period_s")}  # fmt: skip
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        return out


@dataclass
class ModelDeploymentConfig:
    """Replica options of the deployment that holds the pipeline."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 8  # >= batching.max_batch_size, or batches never fill
    max_queued_requests: int = 32  # per caller; beyond it the API answers 503 with Retry-After
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 60.0
    max_loras_per_replica: int = 3  # LRU of @serve.multiplexed LoRA weights held in memory
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)


@dataclass
class IngressDeploymentConfig:
    num_replicas: int = 1
    num_cpus: float = 0.25
    max_ongoing_requests: int = 64


@dataclass
class ServeAppConfig:
    """The MUSAR serving application (``musar serve`` and ``serve/serve_config.yaml``)."""

    model: str = "tiny"  # "tiny" = the embedded random model; else a local FLUX.1 diffusers folder
    lora: str | None = None  # LoRA of requests that name none: a folder or mlflow:<run_id>
    loras: dict[str, str] = field(default_factory=dict)  # id -> folder or mlflow:<run_id>, chosen per request
    mlflow_tracking_uri: str = "sqlite:///outputs/mlflow.db"
    device: str = "cpu"
    dtype: str = "float32"
    offload: bool = False
    max_sequence_length: int = 512
    # Tiny-model default; FLUX.1-dev LoRAs are trained with condition_size=512.
    musar: MusarConfig = field(default_factory=lambda: MusarConfig(condition_size=64))

    app_name: str = "musar"
    route_prefix: str = "/"
    host: str = "127.0.0.1"  # `musar serve` binds here; 0.0.0.0 exposes it beyond this machine
    port: int = 8000
    auth_token_env: str | None = None  # name of an environment variable holding the bearer token
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    model_deployment: ModelDeploymentConfig = field(default_factory=ModelDeploymentConfig)
    ingress: IngressDeploymentConfig = field(default_factory=IngressDeploymentConfig)

    def __post_init__(self) -> None:
        for lora_id, source in self.loras.items():
            if not isinstance(lora_id, str) or not LORA_ID_PATTERN.match(lora_id):
                raise ValueError(f"loras: id {lora_id!r} must match {LORA_ID_PATTERN.pattern} (a name, not a path)")
            if not isinstance(source, str) or not source:
                raise ValueError(f"loras.{lora_id}: expected a LoRA folder or mlflow:<run_id>, got {source!r}")
        d, lim = self.defaults, self.limits
        if not lim.min_steps <= d.steps <= lim.max_steps:
            raise ValueError(f"defaults.steps={d.steps} lies outside limits [{lim.min_steps}, {lim.max_steps}]")
        for name in ("height", "width"):
            value = getattr(d, name)
            if not lim.min_size <= value <= lim.max_size or value % 16:
                raise ValueError(f"defaults.{name}={value} must be a multiple of 16 "
                                 f"in [{lim.min_size}, {lim.max_size}]")  # fmt: skip
        if self.model_deployment.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"model_deployment.max_ongoing_requests ({self.model_deployment.max_ongoing_requests}) must be >= "
                f"batching.max_batch_size ({self.batching.max_batch_size}), or a replica never holds a full batch"
            )
