"""Does a base's dynamic routing find a diptych's panels? Decides ``diptych_routes=attention`` vs ``panels``.

In stages 2-3 every diptych target token is routed by eqs. 2-4 (the paper) to one of the two
references. That only teaches customisation if the routes follow the panels: left-panel tokens to
the left subject's reference, right-panel tokens to the right one's. This benchmark takes encoded
diptych samples of a toy study (``<study>/shards/encoded/<dataset>``), noises them to t, runs one
routed forward of the base (or a trained LoRA on it) and reports, per t and routed block, the
share of target tokens routed to their own panel's reference (``training.batches.panel_routes``).
Chance is 0.5. Near chance, ``diptych_routes=attention`` sends each token to a random reference,
and ``panels`` is the honest choice for that base (README, toy study).

    python benchmarks/diptych_routing.py --base outputs/toy/base --shards outputs/toy/study/shards \\
        [--lora outputs/toy/study/train/full-seed0/stage3/lora] [--samples 32] [--routes-from-layer 0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a `musar toy base` folder")
    parser.add_argument("--shards", required=True, help="a toy study's shards folder (with encoded/)")
    parser.add_argument("--dataset", default="diptych_random", choices=["diptych_random", "diptych_same_category"])
    parser.add_argument("--lora", default=None, help="a trained LoRA folder (default: the untrained base)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--t", type=float, nargs="+", default=[0.3, 0.6, 0.9], help="noise levels in (0, 1)")
    parser.add_argument("--rope-scheme", default="left_panels_v1", help="MusarConfig.rope_scheme the LoRA used")
    parser.add_argument("--routes-from-layer", type=int, default=None, help="MusarConfig.routes_from_layer")
    args = parser.parse_args()
    if args.samples < 1 or args.batch < 1 or not all(0 < t < 1 for t in args.t):
        parser.error("--samples and --batch must be >= 1, every --t in (0, 1)")
    folder = Path(args.shards) / "encoded" / args.dataset
    files = sorted(folder.glob("*.parquet"))
    if not files:
        parser.error(f"no encoded shards in {folder}: run a toy study (it pre-encodes its shards) first")

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from musar_core import MusarTransformer
    from toystudy.study import CONDITION_PROMPT_TOKENS, PROMPT_TOKENS, StudyConfig, musar_config
    from training.batches import panel_routes
    from training.encoded import encoded_batch, pixels_per_token

    cfg = StudyConfig(base=args.base, output="unused", rope_scheme=args.rope_scheme,
                      routes_from_layer=args.routes_from_layer)  # fmt: skip
    model = MusarTransformer.from_pretrained(args.base, config=musar_config(cfg, "full"))
    if args.lora:
        model.load_lora(args.lora)
    model.eval()
    rows = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
        if len(rows) >= args.samples:
            break
    rows = rows[: args.samples]
    hits: dict[tuple[float, int], list[int]] = {}
    start = time.perf_counter()
    for i in range(0, len(rows), args.batch):
        chunk = rows[i : i + args.batch]
        columns = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
        batch = encoded_batch(columns, target_size=64, condition_size=64, rope_scheme=args.rope_scheme,
                              max_prompt_tokens=PROMPT_TOKENS, max_condition_prompt_tokens=CONDITION_PROMPT_TOKENS,
                              device=torch.device("cpu"), pixels_per_token=pixels_per_token(args.base))  # fmt: skip
        truth = panel_routes(batch)
        guidance = torch.ones(batch.size) if model.transformer.config.guidance_embeds else None  # as in training
        for t in args.t:
            noise = torch.randn(batch.target_latents.shape, generator=torch.Generator().manual_seed(i))
            noisy = (1 - t) * batch.target_latents + t * noise
            with torch.no_grad():
                out = model(hidden_states=noisy, encoder_hidden_states=batch.prompt_embeds,
                            pooled_projections=batch.pooled, timestep=torch.full((batch.size,), t),
                            img_ids=batch.img_ids, txt_ids=batch.txt_ids, guidance=guidance, conditions=batch.conditions,
                            phrase_spans=batch.phrase_spans, prompt_mask=batch.prompt_mask, return_routing=True)  # fmt: skip
            for layer, routes in out.routing.routes.items():
                h = hits.setdefault((t, layer), [0, 0])
                h[0] += int((routes == truth).sum())
                h[1] += routes.numel()
    layers = sorted({layer for _, layer in hits})
    print(f"{len(rows)} {args.dataset} samples, {'LoRA ' + args.lora if args.lora else 'untrained base'}, "
          f"routes_from_layer={args.routes_from_layer}, {time.perf_counter() - start:.0f} s")  # fmt: skip
    print("share of target tokens routed to their own panel's reference (chance 0.50)")
    print("| t | " + " | ".join(f"block {b}" for b in layers) + " | mean |")
    print("|---:|" + "---:|" * (len(layers) + 1))
    for t in args.t:
        shares = [hits[(t, b)][0] / hits[(t, b)][1] for b in layers]
        print(f"| {t:g} | " + " | ".join(f"{s:.2f}" for s in shares) + f" | {float(np.mean(shares)):.2f} |")


if __name__ == "__main__":
    main()
