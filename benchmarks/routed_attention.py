"""Per-step cost of MUSAR's routed forward vs stock FLUX, measured side by side in one run.

CPU configuration where attention matters (8 heads x 64 dims, 1024 target tokens, FLUX.1-dev's
token proportions: 512 prompt tokens, 3 conditions of 1024 image + 64 prompt tokens):

  (a) stock FLUX, no conditions          - diffusers FluxTransformer2DModel.forward
  (b) dense concatenation, c conditions  - stock FLUX on the concatenated sequence, no masks
  (c) MUSAR routed, static routing only
  (d) MUSAR routed, static + dynamic routing
  (e) MUSAR reference path (dense boolean mask + SDPA), static + dynamic - what the fast path avoids

Each is timed as the median of ``--repeats`` forwards after a warm-up, in the same process, and
reported as a ratio to (a). Usage: python benchmarks/routed_attention.py [--repeats 3] [--layers 2 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel

from musar_core import ConditionTokens, MusarConfig, MusarTransformer, condition_image_ids, image_ids, text_ids


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs=2, default=(2, 2), metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--conditions", type=int, default=3)
    parser.add_argument("--target-grid", type=int, default=32, help="target is GRID x GRID tokens (32 -> 1024)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    heads, head_dim = 8, 64
    flux = FluxTransformer2DModel(
        in_channels=64, num_layers=args.layers[0], num_single_layers=args.layers[1], attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    ).eval()  # fmt: skip
    c, grid, m = args.conditions, args.target_grid, args.prompt_tokens
    n = grid * grid
    x = torch.randn(1, n, 64)
    prompt = torch.randn(1, m, 256)
    pooled = torch.randn(1, 64)
    t, g = torch.tensor([0.7]), torch.tensor([3.5])
    conds = ConditionTokens(
        image_latents=[torch.randn(1, n, 64) for _ in range(c)],
        image_ids=[condition_image_ids(k, grid, grid) for k in range(c)],
        prompt_embeds=[torch.randn(1, 64, 256) for _ in range(c)],
        pooled=[torch.randn(1, 64) for _ in range(c)],
    )
    spans = torch.tensor([[[4 * k, 3] for k in range(c)]])
    base = dict(pooled_projections=pooled, timestep=t, guidance=g)

    def stock():
        flux(hidden_states=x, encoder_hidden_states=prompt, img_ids=image_ids(grid, grid), txt_ids=text_ids(m), **base)

    def dense():
        flux(
            hidden_states=torch.cat([x, *conds.image_latents], 1),
            encoder_hidden_states=torch.cat([prompt, *conds.prompt_embeds], 1),
            img_ids=torch.cat([image_ids(grid, grid), *conds.image_ids]),
            txt_ids=text_ids(m + 64 * c), **base,
        )  # fmt: skip

    def musar(config):
        model = MusarTransformer(flux, config)

        def run():
            model(hidden_states=x, encoder_hidden_states=prompt, img_ids=image_ids(grid, grid), txt_ids=text_ids(m),
                  conditions=conds, phrase_spans=spans, **base)  # fmt: skip

        return run

    cases = [
        ("(a) stock FLUX, no conditions", stock),
        (f"(b) dense concatenation, c={c}", dense),
        (f"(c) MUSAR routed static, c={c}", musar(MusarConfig(dynamic_routing=False))),
        (f"(d) MUSAR routed static+dynamic, c={c}", musar(MusarConfig())),
        (f"(e) MUSAR reference mask path, c={c}", musar(MusarConfig(attention_impl="reference"))),
    ]
    L = m + n + c * (n + 64)
    print(f"config: {heads} heads x {head_dim}, {args.layers[0]} double + {args.layers[1]} single blocks, "
          f"target {n} tokens, prompt {m}, {c} conditions x ({n} image + 64 prompt) = {L} joint tokens, "
          f"{torch.get_num_threads()} threads, repeats={args.repeats}")  # fmt: skip
    results = []
    with torch.inference_mode():
        for name, fn in cases:
            results.append((name, timed(fn, args.repeats)))
            print(f"  measured {name}: {results[-1][1]:.3f} s", flush=True)
    reference = results[0][1]
    print(f"\n{'case':45s} {'s/step':>8s} {'x (a)':>7s}")
    for name, seconds in results:
        print(f"{name:45s} {seconds:8.3f} {seconds / reference:7.2f}")


if __name__ == "__main__":
    main()
