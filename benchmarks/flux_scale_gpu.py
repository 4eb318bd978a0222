"""FLUX.1-dev at full size on one GPU, random weights: MUSAR's routed forward against stock FLUX.

What the CPU benchmarks cannot show: whether the routed model keeps its guarantees and its cost
balance with real FLUX shapes, bf16 and the GPU's fused attention kernels. No weights are
downloaded: the 11.9B-parameter transformer is built from FLUX.1-dev's config straight on the device
with random values, so the figures are about the shapes, not the images. Ray-free on purpose (it
runs where only torch, diffusers and peft are installed). Sections, each reported even if another
fails:

1. parity: MUSAR without conditions or LoRA against the stock forward (relative max difference);
2. fast routed attention against the reference path (dense boolean mask), c = 2, and routes agreement;
3. isolation: with ``isolate_conditions``, perturbing condition 1 leaves conditions 0 and 2 bit-identical;
4. per-step forward time at 512 px (target 1024 tokens, prompt 512, references 1024 + 64 tokens),
   c = 1..3: plain, dense concatenation, routed (static only; static + dynamic), the reference
   path, the condition cache, and the dual-branch LoRA; ratios to plain FLUX and achieved TFLOP/s
   from :mod:`musar_core.flops`;
5. one training step (forward + backward with gradient checkpointing + AdamW on the LoRA) at stage
   2's shape (a two-panel diptych target, c = 2, panel routes), with peak memory, beside
   ``musar plan``'s figures for the same shape.

    python benchmarks/flux_scale_gpu.py [--repeats 5] [--json results.json]
    python benchmarks/flux_scale_gpu.py --device cpu --dtype float32 --layers 1 1 --heads 2 --side 4 \
        --cond-side 4 --prompt 8 --cond-prompt 4 --repeats 1          # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import torch
from diffusers import FluxTransformer2DModel

from musar_core import (
    ConditionTokens,
    MusarConfig,
    MusarTransformer,
    cond_group,
    condition_image_ids,
    image_ids,
    text_ids,
)
from musar_core.flops import Shape, step_flops
from musar_core.flux_dev import FLUX_DEV_TRANSFORMER_CONFIG
from musar_core.objective import EncodedBatch, flow_matching_loss

GB = 1e9
SECTIONS = ("parity", "fast_vs_reference", "isolation", "timing", "training_step")


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.results: dict = {"args": vars(args)}

    # ---- helpers -------------------------------------------------------------------------------
    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats=None, warmup=2):
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(repeats or self.args.repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return torch.cuda.max_memory_allocated() / GB if self.device.type == "cuda" else float("nan")

    def rand(self, *shape, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=g).to(self.device, self.dtype)

    def conditions(self, c, seed=100):
        a, s = self.args, self.args.cond_side
        return ConditionTokens([self.rand(1, s * s, 64, seed=seed + 3 * k) for k in range(c)],
                               [condition_image_ids(k, s, s, device=self.device) for k in range(c)],
                               [self.rand(1, a.cond_prompt, self.joint_dim, seed=seed + 3 * k + 1) for k in range(c)],
                               [self.rand(1, self.pooled_dim, seed=seed + 3 * k + 2) for k in range(c)])  # fmt: skip

    def spans(self, c):
        return torch.tensor([[[1 + 2 * k, 2] for k in range(c)]], device=self.device) if c >= 2 else None

    def profile(self, name, fn):
        """One profiled forward: GPU busy time against wall time, kernel launches and host syncs
        (a forward that launches faster than the GPU runs keeps it busy; each sync drains the queue)."""
        if not self.args.profile_dir:
            return
        from pathlib import Path

        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        self.sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            fn()
            self.sync()
            wall = time.perf_counter() - start
        events = prof.key_averages()
        busy = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1000
        count = lambda *words: sum(e.count for e in events if any(w in e.key for w in words))  # noqa: E731
        record = {"case": name, "wall_ms": 1000 * wall, "gpu_busy_ms": busy, "launches": count("LaunchKernel"),
                  "syncs": count("Synchronize"), "memcpys": count("Memcpy")}  # fmt: skip
        self.results.setdefault("profile", []).append(record)
        folder = Path(self.args.profile_dir)
        folder.mkdir(parents=True, exist_ok=True)
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (folder / f"{name}.txt").write_text(events.table(sort_by=sort, row_limit=25, max_name_column_width=60))
        print(f"profile {name}: wall {record['wall_ms']:.1f} ms (profiled), GPU kernels busy {busy:.1f} ms, "
              f"{record['launches']} kernel launches, {record['syncs']} syncs, {record['memcpys']} memcpys")  # fmt: skip

    # ---- sections ------------------------------------------------------------------------------
    def build(self):
        a = self.args
        cfg = dict(FLUX_DEV_TRANSFORMER_CONFIG, num_layers=a.layers[0], num_single_layers=a.layers[1],
                   num_attention_heads=a.heads)  # fmt: skip
        torch.manual_seed(0)
        start = time.perf_counter()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with self.device:
                self.flux = FluxTransformer2DModel(**cfg).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(previous)
        self.sync()
        self.joint_dim, self.pooled_dim = cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
        self.hidden = a.heads * cfg["attention_head_dim"]
        params = sum(p.numel() for p in self.flux.parameters())
        self.results["build"] = {"params_billions": params / 1e9, "seconds": time.perf_counter() - start,
                                 "allocated_gb": torch.cuda.memory_allocated() / GB if self.device.type == "cuda" else None}  # fmt: skip
        print(f"FLUX transformer: {params / 1e9:.2f}B parameters ({a.layers[0]} double + {a.layers[1]} single blocks, "
              f"hidden {self.hidden}), {self.dtype}, built on {self.device} in {self.results['build']['seconds']:.1f} s")  # fmt: skip
        side, m = a.side, a.prompt
        self.x = self.rand(1, side * side, 64, seed=1)
        self.prompt = self.rand(1, m, self.joint_dim, seed=2)
        self.base = dict(pooled_projections=self.rand(1, self.pooled_dim, seed=3),
                         timestep=torch.tensor([0.7], device=self.device, dtype=self.dtype),
                         guidance=torch.tensor([3.5], device=self.device, dtype=self.dtype),
                         img_ids=image_ids(side, side, device=self.device), txt_ids=text_ids(m, device=self.device))  # fmt: skip
        self.shape = Shape(hidden=self.hidden, layers=sum(a.layers), prompt=m, target=side * side,
                           cond_image=a.cond_side**2, cond_prompt=a.cond_prompt)  # fmt: skip

    def parity(self):
        musar = MusarTransformer(self.flux, MusarConfig())
        with torch.inference_mode():
            stock = self.flux(hidden_states=self.x, encoder_hidden_states=self.prompt, **self.base).sample.float()
            ours = musar(hidden_states=self.x, encoder_hidden_states=self.prompt, **self.base).sample.float()
        rel = ((ours - stock).abs().max() / stock.abs().max()).item()
        self.results["parity"] = {"relative_max_diff": rel, "finite": bool(torch.isfinite(stock).all()),
                                  "bitwise_equal": bool(torch.equal(ours, stock))}  # fmt: skip
        print(f"parity, no conditions, no LoRA: max|MUSAR - stock| / max|stock| = {rel:.2e} "
              f"(bit-identical: {self.results['parity']['bitwise_equal']})")  # fmt: skip

    def fast_vs_reference(self):
        cond, spans = self.conditions(2), self.spans(2)
        fast = MusarTransformer(self.flux, MusarConfig())
        ref = MusarTransformer(self.flux, MusarConfig(attention_impl="reference"))
        kw = dict(hidden_states=self.x, encoder_hidden_states=self.prompt, conditions=cond, phrase_spans=spans,
                  return_routing=True, **self.base)  # fmt: skip
        with torch.inference_mode():
            a, b = fast(**kw), ref(**kw)
        rel = ((a.sample.float() - b.sample.float()).abs().max() / b.sample.float().abs().max()).item()
        agree = [(a.routing.routes[k] == b.routing.routes[k]).float().mean().item() for k in a.routing.routes]
        self.results["fast_vs_reference"] = {"relative_max_diff": rel, "routes_agreement_min": min(agree, default=1.0),
                                             "routes_agreement_mean": sum(agree) / max(len(agree), 1)}  # fmt: skip
        print(f"fast routed vs reference (dense mask), c = 2: relative max diff {rel:.2e}; routes agree "
              f"{100 * self.results['fast_vs_reference']['routes_agreement_mean']:.2f}% of target tokens on average over "
              f"{len(agree)} layers (min {100 * min(agree, default=1.0):.2f}%)")  # fmt: skip

    def isolation(self):
        model = MusarTransformer(self.flux, MusarConfig(isolate_conditions=True))

        def cond_rows(cond):
            with torch.inference_mode():
                out = model(hidden_states=self.x, encoder_hidden_states=self.prompt, conditions=cond,
                            phrase_spans=self.spans(3), output_hidden_states=True, **self.base)  # fmt: skip
            ranges = out.layout.group_ranges()
            return [out.hidden_states[:, slice(*ranges[cond_group(k)])].clone() for k in range(3)]

        cond = self.conditions(3)
        before = cond_rows(cond)
        cond.image_latents[1] = cond.image_latents[1] + 1.0
        cond.prompt_embeds[1] = cond.prompt_embeds[1] - 1.0
        after = cond_rows(cond)
        same = [bool(torch.equal(before[k], after[k])) for k in range(3)]
        self.results["isolation"] = {"condition_unchanged": same}
        print(f"isolation, c = 3, condition 1 perturbed: conditions 0/1/2 bit-identical = {same} (want True/False/True)")

    def timing(self):
        a, rows = self.args, []
        routed = MusarTransformer(self.flux, MusarConfig())
        static = MusarTransformer(self.flux, MusarConfig(dynamic_routing=False))
        reference = MusarTransformer(self.flux, MusarConfig(attention_impl="reference"))
        isolated = MusarTransformer(self.flux, MusarConfig(isolate_conditions=True))
        x, prompt, base = self.x, self.prompt, self.base

        def row(name, c, fn, flops):
            self.reset_peak()
            seconds = self.timed(fn)
            rows.append({"case": name, "c": c, "ms": 1000 * seconds, "tflops": flops / seconds / 1e12,
                         "peak_gb": self.peak_gb()})  # fmt: skip

        with torch.inference_mode():
            row("plain FLUX, no conditions", 0,
                lambda: self.flux(hidden_states=x, encoder_hidden_states=prompt, **base), step_flops(self.shape, 0, "plain"))  # fmt: skip
            for c in a.conditions:
                cond, spans = self.conditions(c), self.spans(c)
                dense_kw = dict(hidden_states=torch.cat([x, *cond.image_latents], 1),
                                encoder_hidden_states=torch.cat([prompt, *cond.prompt_embeds], 1),
                                img_ids=torch.cat([base["img_ids"], *cond.image_ids]),
                                txt_ids=text_ids(a.prompt + c * a.cond_prompt, device=self.device),
                                **{k: base[k] for k in ("pooled_projections", "timestep", "guidance")})  # fmt: skip
                row("dense concatenation (stock FLUX)", c, lambda kw=dense_kw: self.flux(**kw), step_flops(self.shape, c, "dense"))
                kw = dict(hidden_states=x, encoder_hidden_states=prompt, conditions=cond, phrase_spans=spans, **base)
                row("MUSAR routed, static only", c, lambda kw=kw: static(**kw), step_flops(self.shape, c, "routed", dynamic=False))
                row("MUSAR routed, static + dynamic", c, lambda kw=kw: routed(**kw), step_flops(self.shape, c, "routed"))
                row("MUSAR reference path (dense mask)", c, lambda kw=kw: reference(**kw), step_flops(self.shape, c, "routed"))
                self.reset_peak()
                before = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
                cache = isolated.build_condition_cache(cond, base["guidance"])
                cache_gb = ((torch.cuda.memory_allocated() - before) / GB) if self.device.type == "cuda" else float("nan")
                build_s = self.timed(lambda cond=cond: isolated.build_condition_cache(cond, base["guidance"]))
                ckw = dict(hidden_states=x, encoder_hidden_states=prompt, condition_cache=cache, phrase_spans=spans, **base)
                row("MUSAR + condition cache, per step", c, lambda kw=ckw: isolated(**kw), step_flops(self.shape, c, "cached"))
                rows[-1].update(cache_build_ms=1000 * build_s, cache_gb=cache_gb)
                if c == max(a.conditions):
                    self.profile(f"dense_c{c}", lambda kw=dense_kw: self.flux(**kw))
                    self.profile(f"routed_static_c{c}", lambda kw=kw: static(**kw))
                    self.profile(f"routed_dynamic_c{c}", lambda kw=kw: routed(**kw))
                    self.profile(f"cached_c{c}", lambda kw=ckw: isolated(**kw))
                del cache
        # The dual-branch LoRA (subject r=128 on condition tokens, noise r=4 on target tokens), routed per
        # token. Injected last (peft wraps the shared transformer's linears in place), and outside
        # inference mode so that the training step can train it afterwards.
        lora_model = MusarTransformer(self.flux, MusarConfig()).add_lora()
        with torch.no_grad():
            for p in lora_model.lora_parameters():
                p.normal_(0, 0.01)
        with torch.inference_mode():
            for c in a.conditions:
                kw = dict(hidden_states=x, encoder_hidden_states=prompt, conditions=self.conditions(c),
                          phrase_spans=self.spans(c), **base)  # fmt: skip
                row("MUSAR routed + dual-branch LoRA", c, lambda kw=kw: lora_model(**kw), step_flops(self.shape, c, "routed"))
                if c == max(a.conditions):
                    self.profile(f"routed_lora_c{c}", lambda kw=kw: lora_model(**kw))
        self.lora_model = lora_model
        plain = rows[0]["ms"]
        for r in rows:
            r["x_plain"] = r["ms"] / plain
        self.results["timing"] = rows
        print(f"\nper-step forward, {self.dtype}, target {self.shape.target} + prompt {self.shape.prompt} tokens, references "
              f"{self.shape.cond_image} + {self.shape.cond_prompt}; median of {a.repeats}; TFLOP/s from musar_core.flops")  # fmt: skip
        print(f"{'case':40s} {'c':>2s} {'ms':>9s} {'x plain':>8s} {'TFLOP/s':>8s} {'peak GB':>8s}  extra")
        for r in rows:
            extra = f"cache build {r['cache_build_ms']:.1f} ms, cache {r['cache_gb']:.2f} GB" if "cache_gb" in r else ""
            print(f"{r['case']:40s} {r['c']:2d} {r['ms']:9.2f} {r['x_plain']:8.2f} {r['tflops']:8.1f} {r['peak_gb']:8.2f}  {extra}")

    def training_step(self):
        a = self.args
        model = getattr(self, "lora_model", None) or MusarTransformer(self.flux, MusarConfig()).add_lora()
        model.enable_gradient_checkpointing(True)
        params = model.lora_parameters()
        for p in params:
            p.requires_grad_(True)
        lora_count = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        c, side, m = 2, a.side, a.prompt
        width = side * c  # a diptych target: c panels side by side
        cond = self.conditions(c, seed=300)
        batch = EncodedBatch(target_latents=self.rand(1, side * width, 64, seed=4), img_ids=image_ids(side, width, device=self.device),
                             prompt_embeds=self.prompt, pooled=self.base["pooled_projections"],
                             txt_ids=text_ids(m, device=self.device), conditions=cond, phrase_spans=self.spans(c),
                             routes=(torch.arange(width, device=self.device) // side).repeat(side)[None])  # fmt: skip
        losses = []

        def step():
            loss = flow_matching_loss(model, batch, generator=torch.Generator().manual_seed(len(losses)))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())

        self.reset_peak()
        seconds = self.timed(step, repeats=a.train_repeats, warmup=1)
        shape = Shape(hidden=self.hidden, layers=sum(a.layers), prompt=m, target=side * width,
                      cond_image=a.cond_side**2, cond_prompt=a.cond_prompt)  # fmt: skip
        flops = 4 * step_flops(shape, c, "routed")  # forward + backward + checkpointing's recompute (musar plan's count)
        tokens = m + side * width + c * shape.cond
        result = {"seconds": seconds, "tflops": flops / seconds / 1e12, "peak_gb": self.peak_gb(), "tokens": tokens,
                  "lora_params_millions": lora_count / 1e6, "lora_dtype": str(params[0].dtype),
                  "losses_finite": all(map(lambda v: v == v and abs(v) < float("inf"), losses))}  # fmt: skip
        try:
            from musar.plan import ParamCounts, activation_gb, training_memory_gb

            frozen = sum(p.numel() for n, p in self.flux.named_parameters() if ".lora_" not in n)
            state = training_memory_gb(ParamCounts(frozen=frozen, lora=lora_count), workers=1, zero_stage=2)
            result["plan_state_gb"] = sum(state.values())
            result["plan_activation_gb"] = activation_gb(tokens, self.hidden, sum(a.layers), 1, checkpointing=True)
        except ImportError as error:  # the musar package's own deps are optional on a bare GPU image
            result["plan_error"] = repr(error)
        self.results["training_step"] = result
        print(f"\ntraining step, stage-2 shape (diptych target {side}x{width} tokens, c = 2, panel routes, prompt {m}): "
              f"{tokens} tokens, gradient checkpointing, AdamW on {lora_count / 1e6:.1f}M LoRA parameters ({params[0].dtype})")  # fmt: skip
        print(f"  {seconds:.3f} s per step (median of {a.train_repeats}), {result['tflops']:.1f} TFLOP/s by musar plan's "
              f"count, peak memory {result['peak_gb']:.2f} GB, losses finite: {result['losses_finite']}")  # fmt: skip
        if "plan_state_gb" in result:
            print(f"  musar plan for one GPU: model + LoRA training state {result['plan_state_gb']:.2f} GB + activations "
                  f"{result['plan_activation_gb']:.2f} GB = {result['plan_state_gb'] + result['plan_activation_gb']:.2f} GB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, nargs=2, default=(19, 38), metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--heads", type=int, default=24, help="attention heads of 128 dims (24: FLUX.1-dev's 3072)")
    parser.add_argument("--side", type=int, default=32, help="target grid side in tokens (32: 512 px)")
    parser.add_argument("--cond-side", type=int, default=32, help="reference grid side in tokens (32: 512 px)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--cond-prompt", type=int, default=64)
    parser.add_argument("--conditions", type=int, nargs="+", default=(1, 2, 3))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--json", default=None, help="also write every figure here")
    parser.add_argument("--profile-dir", default=None, help="profile one forward of each case at the largest c, tables here")
    args = parser.parse_args()

    bench = Bench(args)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu"}
    bench.results["env"] = env
    import musar_core

    env["musar_core"] = musar_core.__file__
    print(f"torch {env['torch']} on {env['device']}; musar_core from {env['musar_core']}")
    bench.build()
    failed = []
    for name in args.sections:
        try:
            getattr(bench, name)()
        except Exception:  # report every section: one failure must not hide the others' figures
            failed.append(name)
            print(f"\nsection {name} FAILED:\n{traceback.format_exc()}")
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    bench.results["failed"] = failed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(bench.results, f, indent=1, default=str)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
