"""Routing maps (paper Figure 5): which subject each region of the image drew from.

For each chosen denoising step, one row: the generated image overlaid with the per-token
assignment (argmax of S* averaged over the routing blocks, one colour per subject), then one
heatmap of S* per subject. A legend names each subject's colour.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from .pipeline import RoutingTrace

SUBJECT_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                   (70, 240, 240), (240, 50, 230), (210, 245, 60)]  # fmt: skip


def colour(k: int) -> tuple[int, int, int]:
    return SUBJECT_COLOURS[k % len(SUBJECT_COLOURS)]


def default_steps(trace: RoutingTrace, count: int = 4) -> list[int]:
    total = len(trace.affinity)
    if total == 0:
        raise ValueError("the routing trace is empty: generate with two or more subjects and return_routing=True")
    count = min(count, total)
    return sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})


def assignment_image(trace: RoutingTrace, step: int, sample: int = 0) -> Image.Image:
    """(cols x rows) image, each pixel = one target token coloured by its routed subject."""
    rows, cols = trace.grid
    routes = trace.mean_affinity(step)[sample].argmax(-1).reshape(rows, cols)
    palette = torch.tensor([colour(k) for k in range(len(trace.subjects))], dtype=torch.uint8)
    return Image.fromarray(palette[routes].numpy(), "RGB")


def heatmap_image(trace: RoutingTrace, step: int, subject: int, sample: int = 0) -> Image.Image:
    """S* of one subject over the target grid, black (low) to the subject's colour (high)."""
    rows, cols = trace.grid
    s = trace.mean_affinity(step)[sample, :, subject].reshape(rows, cols)
    s = (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12)
    rgb = (s[..., None] * torch.tensor(colour(subject), dtype=torch.float32)).round().to(torch.uint8)
    return Image.fromarray(rgb.numpy(), "RGB")


def render_routing_map(
    image: Image.Image, trace: RoutingTrace, *, steps: list[int] | None = None, sample: int = 0, cell: int = 256
) -> Image.Image:
    steps = default_steps(trace) if steps is None else steps
    c = len(trace.subjects)
    header, label = 28, 16
    sheet = Image.new("RGB", (cell * (1 + c), header + len(steps) * (cell + label)), "white")
    draw = ImageDraw.Draw(sheet)
    x = 6
    for k, name in enumerate(trace.subjects):  # legend
        draw.rectangle((x, 8, x + 12, 20), fill=colour(k))
        draw.text((x + 16, 8), name, fill="black")
        x += 24 + 7 * len(name)
    base = image.convert("RGB").resize((cell, cell))
    for row, step in enumerate(steps):
        top = header + row * (cell + label)
        t = trace.timesteps[step] if step < len(trace.timesteps) else float("nan")
        draw.text((4, top + 2), f"step {step} (t={t:.0f}): assignment, then S* per subject", fill="black")
        overlay = assignment_image(trace, step, sample).resize((cell, cell), Image.Resampling.NEAREST)
        sheet.paste(Image.blend(base, overlay, 0.45), (0, top + label))
        for k in range(c):
            heat = heatmap_image(trace, step, k, sample).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(heat, ((1 + k) * cell, top + label))
    return sheet
