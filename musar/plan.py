"""``musar plan``: the capacity plan of a training config, on paper.

Every figure is a documented formula over the config (and FLUX.1-dev's architecture, counted
exactly on the meta device), so it can be checked by hand and re-derived when a value changes:

- parameters: frozen FLUX transformer and trained LoRA (both counted on a meta-device instance);
- memory per GPU: bf16 weights; LoRA bf16 weights + fp32 master + Adam m and v + fp32 grads,
  partitioned over N workers by ZeRO-2 (optimizer states and grads) or ZeRO-3 (also weights);
  activations ~ ``ACT_BYTES_PER_TOKEN_LAYER`` x tokens x layers without checkpointing, one block's
  worth plus a hidden-state copy per layer with it;
- tokens per sample for c conditions; FLOPs per step (forward from musar_core.flops, x3 for
  forward + backward, x4 with gradient checkpointing's recompute); time per stage on N GPUs at a
  stated MFU of a stated peak;
- serving: memory per replica and images per hour per GPU at c = 1..5 with and without the
  condition cache (28 steps);
- storage of shards and pre-encoded tensors for the real set (111,761 subjects).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from musar_core.flops import Shape, generation_flops, step_flops

# bf16 activation bytes kept per token per block for backward, without checkpointing (approximation:
# about 17 hidden-sized tensors per token in a FLUX block - norms, q/k/v, attention output, the 4x
# MLP input and its activation - at 2 bytes each).
ACT_TENSORS_PER_TOKEN_LAYER = 17
SUBJECTS = 111_761  # kept Subject200K rows (paper)
GB = 1e9


@dataclass
class PlanConfig:
    # `musar plan --config X.yaml` names the *training* config to plan for (see musar.cli.job_main).
    __config_flag__ = "train_config"

    train_config: str = "configs/a100_flux_dev.yaml"
    gpus: int | None = None  # None: the config's num_workers
    peak_tflops: float = 312.0  # A100 bf16 dense
    mfu: float = 0.40
    conditions: int = 2  # training samples are diptychs with 2 conditions (stage 2/3)
    shard_bytes_per_panel: int = 90_000  # encoded 512x512 panel as stored in the shards (JPEG q95 ~ 60-120 kB)
    prompt_tokens_real: int = 120  # mean real T5 length of a target prompt (padding dropped when pre-encoding)
    serve_steps: int = 28
    overrides: list[str] = field(default_factory=list)


@dataclass
class ParamCounts:
    frozen: int
    lora: int


def count_parameters(musar_config=None, flux_config: dict | None = None) -> ParamCounts:
    """Exact counts on the meta device: no memory, no weights needed."""
    import torch
    from diffusers import FluxTransformer2DModel

    from musar_core import MusarConfig, MusarTransformer
    from musar_core.flux_dev import FLUX_DEV_TRANSFORMER_CONFIG

    with torch.device("meta"):
        flux = FluxTransformer2DModel(**(flux_config or FLUX_DEV_TRANSFORMER_CONFIG))
        frozen = sum(p.numel() for p in flux.parameters())
        model = MusarTransformer(flux, musar_config or MusarConfig()).add_lora()
    return ParamCounts(frozen=frozen, lora=sum(p.numel() for p in model.lora_parameters()))


def training_memory_gb(params: ParamCounts, workers: int, zero_stage: int) -> dict[str, float]:
    """Per-GPU bytes of model state (bf16 weights, LoRA training state) under a ZeRO stage."""
    weights = 2 * params.frozen / (workers if zero_stage == 3 else 1)
    lora_weights = 2 * params.lora / (workers if zero_stage == 3 else 1)
    optimizer = (4 + 8) * params.lora / (workers if zero_stage >= 1 else 1)  # fp32 master + Adam m, v
    grads = 4 * params.lora / (workers if zero_stage >= 2 else 1)
    return {"frozen weights": weights / GB, "LoRA weights": lora_weights / GB, "optimizer states": optimizer / GB,
            "gradients": grads / GB}  # fmt: skip


def activation_gb(tokens: int, hidden: int, layers: int, micro_batch: int, checkpointing: bool) -> float:
    per_layer = ACT_TENSORS_PER_TOKEN_LAYER * hidden * 2 * tokens * micro_batch
    if checkpointing:  # block inputs kept for every layer + one block recomputed at a time
        return (layers * hidden * 2 * tokens * micro_batch + per_layer) / GB
    return layers * per_layer / GB


def sample_tokens(target_size: int, conditions: int, condition_size: int, prompt: int = 512, cond_prompt: int = 64) -> dict:
    side = target_size // 16
    target = side * side * (conditions if conditions > 1 else 1)  # diptych targets are c panels wide
    cond = conditions * ((condition_size // 16) ** 2 + cond_prompt)
    return {"prompt": prompt, "target": target, "conditions": cond, "total": prompt + target + cond}


def training_step_tflops(shape: Shape, conditions: int, samples: int, checkpointing: bool, isolate: bool) -> float:
    forward = step_flops(shape, conditions, "routed", isolate=isolate)
    return forward * (4 if checkpointing else 3) * samples / 1e12


def render(cfg: PlanConfig) -> str:
    from musar.config import load_config
    from training.config import TrainConfig

    tc = load_config(TrainConfig, cfg.train_config, cfg.overrides)
    n = cfg.gpus or tc.num_workers
    params = count_parameters(tc.musar)
    c = cfg.conditions
    tok = sample_tokens(tc.data.target_size, c, tc.musar.encoded_condition_size, tc.data.max_prompt_tokens,
                        tc.musar.condition_prompt_max_tokens)  # fmt: skip
    shape = Shape(prompt=tok["prompt"], target=tok["target"], cond_image=(tc.musar.encoded_condition_size // 16) ** 2,
                  cond_prompt=tc.musar.condition_prompt_max_tokens)  # fmt: skip
    lines = [f"# Capacity plan for {cfg.train_config} ({n} GPUs at {cfg.peak_tflops:.0f} TFLOP/s peak, MFU {cfg.mfu:.0%})", ""]
    lines += ["## Parameters", f"- frozen FLUX transformer: {params.frozen:,} ({params.frozen / 1e9:.2f}B)",
              f"- trained LoRA (subject r={tc.musar.subject_rank}, noise r={tc.musar.noise_rank}): {params.lora:,} "
              f"({params.lora / 1e6:.1f}M, {100 * params.lora / params.frozen:.2f}% of the base)", ""]  # fmt: skip
    lines += [f"## Tokens per training sample (c = {c}, target {tc.data.target_size}px per panel, conditions "
              f"{tc.musar.encoded_condition_size}px)", f"- prompt {tok['prompt']}, target {tok['target']}, conditions "
              f"{tok['conditions']}, total {tok['total']}", ""]  # fmt: skip
    lines += ["## Memory per GPU (GB)", "| | ZeRO-2 | ZeRO-3 |", "|---|---:|---:|"]
    z2, z3 = training_memory_gb(params, n, 2), training_memory_gb(params, n, 3)
    for key in z2:
        lines.append(f"| {key} | {z2[key]:.2f} | {z3[key]:.2f} |")
    act_on = activation_gb(tok["total"], shape.hidden, shape.layers, tc.micro_batch_size, True)
    act_off = activation_gb(tok["total"], shape.hidden, shape.layers, tc.micro_batch_size, False)
    lines += [f"| activations, gradient checkpointing | {act_on:.2f} | {act_on:.2f} |",
              f"| activations, no checkpointing | {act_off:.2f} | {act_off:.2f} |",
              f"| total with checkpointing | {sum(z2.values()) + act_on:.2f} | {sum(z3.values()) + act_on:.2f} |", ""]  # fmt: skip
    samples = tc.effective_batch_size
    step_tf = training_step_tflops(shape, c, samples, tc.gradient_checkpointing, tc.musar.isolate_conditions)
    step_s = step_tf / (n * cfg.peak_tflops * cfg.mfu)
    lines += ["## Compute", f"- FLOPs per optimizer step (global batch {samples}, c = {c}, "
              f"{'with' if tc.gradient_checkpointing else 'without'} checkpointing): {step_tf:,.0f} TFLOP",
              f"- time per step on {n} GPUs: {step_s:.2f} s"]  # fmt: skip
    for stage, steps in ((1, tc.steps or 20_000), (2, tc.steps or 10_000), (3, tc.steps or 10_000)):
        cs = 1 if stage == 1 else c
        st = Shape(prompt=tok["prompt"], target=(tc.data.target_size // 16) ** 2 * (cs if cs > 1 else 1),
                   cond_image=shape.cond_image, cond_prompt=shape.cond_prompt)  # fmt: skip
        t = training_step_tflops(st, cs, samples, tc.gradient_checkpointing, tc.musar.isolate_conditions)
        hours = steps * t / (n * cfg.peak_tflops * cfg.mfu) / 3600
        lines.append(f"- stage {stage}: {steps:,} steps x {t:,.0f} TFLOP = {hours:.1f} h on {n} GPUs ({hours * n:.0f} GPU-hours)")
    lines += ["", f"## Serving (bf16, {cfg.serve_steps} steps, 512 px target, {tc.musar.condition_size}px references)",
              "| c | images/hour/GPU, no cache | with condition cache | cache memory (GB) |", "|---:|---:|---:|---:|"]  # fmt: skip
    serve_shape = Shape(cond_image=shape.cond_image, cond_prompt=shape.cond_prompt)
    for cc in range(1, 6):
        per_gpu = cfg.peak_tflops * 1e12 * cfg.mfu * 3600
        plain = per_gpu / generation_flops(serve_shape, cc, "routed", cfg.serve_steps)
        cached = per_gpu / generation_flops(serve_shape, cc, "cached", cfg.serve_steps)
        cache_gb = 2 * serve_shape.layers * cc * serve_shape.cond * serve_shape.hidden * 2 / GB
        lines.append(f"| {cc} | {plain:,.0f} | {cached:,.0f} | {cache_gb:.2f} |")
    weights_gb = (2 * params.frozen + 2 * 4.76e9 + 2 * 0.123e9 + 2 * 0.084e9 + 2 * params.lora) / GB
    lines += [f"- memory per replica: ~{weights_gb:.1f} GB of bf16 weights (transformer, T5-XXL 4.76B, CLIP-L 0.12B, "
              "VAE 0.08B, LoRA) + activations + the condition cache above", ""]  # fmt: skip
    lines += _storage(cfg, tc)
    return "\n".join(lines)


def _storage(cfg: PlanConfig, tc) -> list[str]:
    single = 2 * SUBJECTS  # both directions
    pairs = SUBJECTS  # default: as many random pairs as subjects; same-category about as many
    panel = cfg.shard_bytes_per_panel
    shards = single * 2 * panel + 2 * pairs * 4 * panel  # single: cond + target; diptych: 2 conds + 2-panel target
    latent = 16 * (tc.data.target_size // 8) ** 2 * 2  # bf16 VAE latent of one panel
    t5 = cfg.prompt_tokens_real * 4096 * 2
    cond_t5 = 16 * 4096 * 2  # a condition prompt (the item) is ~5-16 T5 tokens at real length
    per_single = 2 * latent + t5 + cond_t5 + 2 * 768 * 2
    return ["## Storage (the real set)",
            f"- shards: {single:,} single + {2 * pairs:,} diptych samples x ~{panel / 1e3:.0f} kB per panel: "
            f"{shards / GB:,.0f} GB",
            f"- pre-encoded, per single sample: VAE latents 2 x {latent / 1e3:.0f} kB + T5 at real length "
            f"({cfg.prompt_tokens_real} tokens) {t5 / 1e6:.2f} MB + condition prompt T5 {cond_t5 / 1e6:.2f} MB + pooled CLIP: "
            f"{per_single / 1e6:.2f} MB; all samples "
            f"~{(single + 2 * pairs) * per_single / GB:,.0f} GB (padded 512-token T5 would be "
            f"{(single + 2 * pairs) * 512 * 4096 * 2 / 1e12:.1f} TB)"]  # fmt: skip


def run_plan(cfg: PlanConfig) -> str:
    text = render(cfg)
    print(text)
    return text
