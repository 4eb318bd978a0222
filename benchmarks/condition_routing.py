"""Cost of c subjects vs plain FLUX: dense, routed, and routed with the condition cache.

FLUX.1-dev's shapes scaled down by one factor (hidden size and every token count), so attention and
linear layers keep FLUX's balance (see musar_core/flops.py): hidden 3072/s, prompt 512/s, target
1024/s, each condition 1024/s image + 64/s prompt tokens. Everything is measured side by side in
one process (median of --repeats), as ratios to plain FLUX without conditions, beside the FLOP
model's prediction for the same shapes. Compact conditions (``condition_compaction`` f) encode each
reference at 1/f of the side: its cost rows show what they save; their quality cost needs a trained
model and is not measured here.

    python benchmarks/condition_routing.py [--scale 4] [--repeats 3] [--layers 2 2] [--compaction 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel

import musar_core.routing as routing
from musar_core import ConditionTokens, MusarConfig, MusarTransformer, condition_image_ids, image_ids, text_ids
from musar_core.flops import Shape, relative


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs=2, default=(2, 2))
    parser.add_argument("--steps", type=int, default=28, help="steps of a generation, for per-generation ratios")
    parser.add_argument("--compaction", type=int, default=2, help="condition_compaction of the compact-condition rows")
    args = parser.parse_args()

    s = args.scale
    shape = Shape(hidden=3072 // s, prompt=512 // s, target=1024 // s, cond_image=1024 // s, cond_prompt=64 // s)
    head_dim = 64
    heads = shape.hidden // head_dim
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(in_channels=64, num_layers=args.layers[0], num_single_layers=args.layers[1],
                                  attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=256,
                                  pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 28, 28)).eval()  # fmt: skip
    side = int(shape.target**0.5)
    cside = int(shape.cond_image**0.5)
    base = dict(pooled_projections=torch.randn(1, 64), timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]))
    x, prompt = torch.randn(1, shape.target, 64), torch.randn(1, shape.prompt, 256)
    ids = dict(img_ids=image_ids(side, side), txt_ids=text_ids(shape.prompt))

    def conditions(c, f=1):  # f: condition_compaction (references encoded f times smaller per side)
        side = cside // f
        return ConditionTokens([torch.randn(1, side * side, 64) for _ in range(c)],
                               [condition_image_ids(k, side, side, compaction=f) for k in range(c)],
                               [torch.randn(1, shape.cond_prompt, 256) for _ in range(c)],
                               [torch.randn(1, 64) for _ in range(c)])  # fmt: skip

    def spans(c):
        return torch.tensor([[[2 * k, 2] for k in range(c)]]) if c >= 2 else None

    routed = MusarTransformer(flux, MusarConfig())
    isolated = MusarTransformer(flux, MusarConfig(isolate_conditions=True))
    rows = []
    with torch.inference_mode():
        plain = median_time(lambda: flux(hidden_states=x, encoder_hidden_states=prompt, **ids, **base), args.repeats)
        rows.append(("plain FLUX, no conditions", 0, plain, plain, 1.0))
        for c in (1, 3, 5):
            cond = conditions(c)

            def dense(cond=cond, c=c):
                flux(hidden_states=torch.cat([x, *cond.image_latents], 1),
                     encoder_hidden_states=torch.cat([prompt, *cond.prompt_embeds], 1),
                     img_ids=torch.cat([ids["img_ids"], *cond.image_ids]),
                     txt_ids=text_ids(shape.prompt + c * shape.cond_prompt), **base)  # fmt: skip

            t = median_time(dense, args.repeats)
            rows.append(("dense concatenation", c, t, plain, relative(shape, c, "dense")))
            t = median_time(lambda cond=cond, c=c: routed(hidden_states=x, encoder_hidden_states=prompt, conditions=cond,
                                                          phrase_spans=spans(c), **ids, **base), args.repeats)  # fmt: skip
            rows.append(("MUSAR routed, no cache", c, t, plain, relative(shape, c, "routed")))
            cache = isolated.build_condition_cache(cond, base["guidance"])
            once = median_time(lambda cond=cond: isolated.build_condition_cache(cond, base["guidance"]), args.repeats)
            t = median_time(lambda cache=cache, c=c: isolated(hidden_states=x, encoder_hidden_states=prompt,
                                                              condition_cache=cache, phrase_spans=spans(c), **ids, **base),
                            args.repeats)  # fmt: skip
            rows.append(("MUSAR + condition cache, per step", c, t, plain, relative(shape, c, "cached")))
            gen = args.steps * t + once
            rows.append((f"MUSAR + condition cache, per {args.steps}-step generation", c, gen, args.steps * plain,
                         relative(shape, c, "cached", per="generation", steps=args.steps)))  # fmt: skip

        # Compact conditions (condition_compaction=2): a quarter of the reference tokens.
        f = args.compaction
        compact = Shape(hidden=shape.hidden, prompt=shape.prompt, target=shape.target,
                        cond_image=shape.cond_image // (f * f), cond_prompt=shape.cond_prompt)  # fmt: skip
        for c in (1, 3, 5):
            cond = conditions(c, f)
            t = median_time(lambda cond=cond, c=c: routed(hidden_states=x, encoder_hidden_states=prompt, conditions=cond,
                                                          phrase_spans=spans(c), **ids, **base), args.repeats)  # fmt: skip
            rows.append((f"MUSAR routed, compact x{f}, no cache", c, t, plain, relative(compact, c, "routed")))
            cache = isolated.build_condition_cache(cond, base["guidance"])
            once = median_time(lambda cond=cond: isolated.build_condition_cache(cond, base["guidance"]), args.repeats)
            t = median_time(lambda cache=cache, c=c: isolated(hidden_states=x, encoder_hidden_states=prompt,
                                                              condition_cache=cache, phrase_spans=spans(c), **ids, **base),
                            args.repeats)  # fmt: skip
            rows.append((f"MUSAR + cache, compact x{f}, per {args.steps}-step gen.", c, args.steps * t + once,
                         args.steps * plain, relative(compact, c, "cached", per="generation", steps=args.steps)))  # fmt: skip

        # Dynamic routing overhead alone: time spent computing S* and routes inside a cached c = 3 step.
        spent = []
        original = routing.affinity_and_routes

        def timed(*a, **kw):
            start = time.perf_counter()
            out = original(*a, **kw)
            spent.append(time.perf_counter() - start)
            return out

        routing.affinity_and_routes = timed
        cache = isolated.build_condition_cache(conditions(3), base["guidance"])
        step = median_time(lambda: isolated(hidden_states=x, encoder_hidden_states=prompt, condition_cache=cache,
                                            phrase_spans=spans(3), **ids, **base), args.repeats)  # fmt: skip
        routing.affinity_and_routes = original
        per_step_routing = sum(spent) / (args.repeats + 1)

    print(f"shapes: FLUX.1-dev / {s}: hidden {shape.hidden} ({heads} heads x {head_dim}), prompt {shape.prompt}, target "
          f"{shape.target}, condition {shape.cond_image} + {shape.cond_prompt} tokens; {sum(args.layers)} blocks; "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")  # fmt: skip
    print(f"\n{'case':52s} {'c':>2s} {'seconds':>9s} {'x plain':>8s} {'FLOP model':>10s}")
    for name, c, seconds, reference, predicted in rows:
        print(f"{name:52s} {c:2d} {seconds:9.4f} {seconds / reference:8.2f} {predicted:10.2f}")
    cached = {c: sec for name, c, sec, _, _ in rows if name == f"MUSAR + condition cache, per {args.steps}-step generation"}
    print(f"\ncached generation c=5 vs c=1: {cached[5] / cached[1]:.3f}x")
    print(f"dynamic routing (S* and routes) inside a cached c=3 step: {per_step_routing * 1000:.2f} ms of "
          f"{step * 1000:.1f} ms = {100 * per_step_routing / step:.1f}%")


if __name__ == "__main__":
    main()
