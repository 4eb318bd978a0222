"""What compact conditions keep of a reference, read back by the toy world's detector.

``musar.condition_compaction=f`` encodes a reference at 1/f of ``condition_size``: f*f times fewer
condition tokens (the cost side, ``condition_routing.py --compaction``). The quality side, without a
trained model: every one of the toy world's subjects is rendered as the study's reference, resized
to the compact size as the encoder does (``reference_tensor``), sent through a toy base's VAE and
back, and the detector reads shape, colour and pattern from the result. What the detector cannot
read there, no condition tokens can carry. ``--study`` adds the toy study's measured rows (the full
model against ``full_compact_x2``) from its ``results.json``.

    python benchmarks/compact_condition_quality.py --base outputs/toy/base [--study outputs/toy/study]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a `musar toy base` folder (its VAE is used)")
    parser.add_argument("--condition-size", type=int, default=64)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--study", help="a `musar toy study` output folder with results.json")
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKL

    from musar_core.encoding import reference_tensor
    from toystudy.study import reference
    from toystudy.world import ALL_SUBJECTS

    vae = AutoencoderKL.from_pretrained(Path(args.base) / "vae").eval()
    refs = [reference(s, args.condition_size) for s in ALL_SUBJECTS]
    print(f"{len(ALL_SUBJECTS)} subjects, references at {args.condition_size} px, read back after the VAE:")
    print("| compaction | reference px | condition tokens | shape | colour | pattern | all three | all three, resized only |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for f in args.factors:
        size = args.condition_size // f
        pixels = torch.stack([reference_tensor(im, size) for im in refs])
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels).latent_dist.mode(), return_dict=False)[0]
        hits = {"shape": [], "colour": [], "pattern": [], "all": [], "resized": []}
        for subject, array, resized in zip(ALL_SUBJECTS, _uint8(decoded), _uint8(pixels)):
            got = _read(array, subject)
            for key, ok in zip(("shape", "colour", "pattern", "all"), [*got, all(got)]):
                hits[key].append(ok)
            hits["resized"].append(all(_read(resized, subject)))
        tokens = (size // (2 * (2 ** (len(vae.config.block_out_channels) - 1)))) ** 2
        cells = " | ".join(f"{statistics.mean(v):.3f}" for v in hits.values())
        print(f"| x{f} | {size} | {tokens} | {cells} |")

    if args.study:
        results = json.loads((Path(args.study) / "results.json").read_text())["results"]
        print("\ntoy study (mean over training seeds):")
        for name in ("full", "full_compact_x2"):
            runs = results.get(name)
            if not runs:
                print(f"  {name}: not in this study")
                continue
            row = ", ".join(f"fidelity {n} {statistics.mean(r[n]['fidelity'] for r in runs):.3f}" for n in ("1", "2", "3"))
            print(f"  {name} ({len(runs)} seeds): {row}")


def _uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 arrays."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _read(array, subject) -> list[bool]:
    """Shape, colour and pattern of the largest detection: right or wrong."""
    from toystudy.detector import detect

    found = max(detect(array), key=lambda d: d.area, default=None)
    return [found is not None and getattr(found, k) == getattr(subject, k) for k in ("shape", "colour", "pattern")]


if __name__ == "__main__":
    main()
