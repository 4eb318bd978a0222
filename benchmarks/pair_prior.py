"""How strongly does a toy base copy a subject from one panel to the other? (``toystudy.copy_prior``)

Each base generates the same pair prompts (left panel described in full, right panel named by its
shape alone) with true classifier-free guidance, and the detector reads both halves. Bases are
measured side by side in one run, on the same prompts and seeds, so their rates compare directly.
Customisation at toy scale has tracked the ``copied`` rate, loosely (README, toy study).

    python benchmarks/pair_prior.py --base outputs/toy/base-w8 --base outputs/toy/base-w9 [--pairs 32]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", action="append", required=True, help="a `musar toy base` folder (repeatable)")
    parser.add_argument("--pairs", type=int, default=32, help="pair prompts (seeded)")
    parser.add_argument("--cfg", type=float, default=3.0, help="true CFG scale (1: no guidance)")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rates to this file")
    args = parser.parse_args()
    if args.pairs < 1 or args.steps < 1 or args.cfg < 1:
        parser.error("--pairs and --steps must be >= 1, --cfg >= 1")
    if len(set(args.base)) != len(args.base):
        parser.error("each --base once")

    from musar_core import MusarConfig, MUSARPipeline
    from toystudy.copy_prior import RATES, copy_prior, pair_cases

    cases = pair_cases(args.pairs, seed=args.seed)
    columns = [*RATES, "copied_given_left"]
    print(f"{args.pairs} pair prompts, true CFG {args.cfg}, {args.steps} steps, seed {args.seed}")
    print("| base | " + " | ".join(columns) + " | seconds |")
    print("|---|" + "---:|" * (len(columns) + 1))
    results = {}
    for base in args.base:
        tick = time.perf_counter()
        pipe = MUSARPipeline.from_pretrained(base, config=MusarConfig(condition_size=64))
        rates = copy_prior(pipe, cases, steps=args.steps, true_cfg_scale=args.cfg, seed=args.seed)
        results[base] = rates
        del pipe
        cells = ["-" if rates[k] is None else f"{rates[k]:.2f}" for k in columns]
        print(f"| {base} | " + " | ".join(cells) + f" | {time.perf_counter() - tick:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rates": results}, f, indent=1)


if __name__ == "__main__":
    main()
