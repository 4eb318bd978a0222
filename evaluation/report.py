"""The evaluation report: this run beside the paper's Table 1 and the experiment's previous runs.

One document model (headings, paragraphs, tables, images) rendered to Markdown and to a
self-contained-enough HTML page (images are the run's ``samples/*.png`` artifacts, linked
relatively, so both files read correctly from the MLflow artifact folder). Sample grids put each
case's reference (condition) images beside its generations, one row per case.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# The paper's Table 1 (DESIGN.md section 4): (single DINO, CLIP-T, CLIP-I), (multi DINO, CLIP-T, CLIP-I).
PAPER_TABLE_1: list[tuple[str, tuple[float, float, float], tuple[float, float, float] | None]] = [
    ("OminiControl", (0.720, 31.07, 0.804), None),
    ("DSD", (0.752, 31.06, 0.811), None),
    ("OmniGen*", (0.765, 31.01, 0.820), (0.691, 33.17, 0.716)),
    ("MS-Diffusion*", (0.735, 31.91, 0.819), (0.678, 34.20, 0.711)),
    ("MUSAR (paper)", (0.774, 30.29, 0.833), (0.704, 33.90, 0.720)),
]
TABLE_METRICS = ("dino", "clip_t", "clip_i")  # the paper's column order
TABLE_HEADERS = ["single DINO", "single CLIP-T", "single CLIP-I", "multi DINO", "multi CLIP-T", "multi CLIP-I"]


def fmt(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if metric == "clip_t" else f"{value:.3f}"


def table_row(metrics: dict) -> list[str]:
    return [fmt(m, metrics.get(f"{split}/{m}")) for split in ("single", "multi") for m in TABLE_METRICS]


HTML_STYLE = ("<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
              "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
              "img{max-width:100%}</style>")


# ---- documents -------------------------------------------------------------------------------------
class Doc:
    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", headers, rows))

    def img(self, alt: str, src: str) -> None:
        self.blocks.append(("img", alt, src))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "img":
                out.append(f"![{b[1]}]({b[2]})")
            else:
                cell = lambda v: str(v).replace("|", "\\|")
                out.append("\n".join(["| " + " | ".join(map(cell, b[1])) + " |", "|" + "---|" * len(b[1])]
                                     + ["| " + " | ".join(map(cell, r)) + " |" for r in b[2]]))  # fmt: skip
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>{HTML_STYLE}</head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "img":
                out.append(f"<p><img alt='{e(b[1])}' src='{e(b[2])}'></p>")
            else:
                head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
                body = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in r) + "</tr>" for r in b[2])
                out.append(f"<table><tr>{head}</tr>{body}</table>")
        return "\n".join(out + ["</body></html>"]) + "\n"


# ---- previous runs ---------------------------------------------------------------------------------
def previous_runs(experiment_id: str, exclude: str, max_results: int) -> list:
    """Finished evaluation runs of the experiment, newest first (MLflow ``Run`` objects)."""
    import mlflow

    if max_results <= 0:
        return []
    runs = mlflow.search_runs(experiment_ids=[experiment_id], filter_string="tags.`musar.kind` = 'eval'",
                              order_by=["attributes.start_time DESC"], max_results=max_results + 1,
                              output_format="list")  # fmt: skip
    return [r for r in runs if r.info.run_id != exclude and r.info.status == "FINISHED"][:max_results]


# ---- the report ------------------------------------------------------------------------------------
def build_report(*, run_id: str, run_name: str, experiment: str, params: dict, metrics: dict, breakdown: dict,
                 previous: list, samples: list[str], notes: list[str]) -> Doc:  # fmt: skip
    doc = Doc()
    doc.h(1, f"DreamBench evaluation: {run_name}")
    doc.p(f"MLflow run `{run_id}` in experiment `{experiment}`, "
          f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.")  # fmt: skip
    doc.table(["setting", "value"], [[k, params[k]] for k in (
        "model", "lora", "generation_fingerprint", "seeds", "steps", "guidance_scale", "height", "width", "dtype",
        "dino_model", "clip_model") if k in params] + [[k, v] for k, v in params.items() if k.startswith("split.")])  # fmt: skip
    for note in notes:
        doc.p(f"Note: {note}")

    doc.h(2, "Beside the paper's Table 1")
    rows = [[name + " (paper)" if "paper" not in name else name,
             *[fmt(m, x) for triple in (single, multi or (None,) * 3) for m, x in zip(TABLE_METRICS, triple)]]
            for name, single, multi in PAPER_TABLE_1]  # fmt: skip
    rows.append([f"this run ({run_name})", *table_row(metrics)])
    doc.table(["method", *TABLE_HEADERS], rows)
    doc.p("Methods marked * train on multi-subject data (the paper's mark). DINO / CLIP-I: mean cosine with all real images "
          "of the case's subject(s); CLIP-T: 100 x image-prompt cosine; 4 seeds per case in the paper.")

    doc.h(2, f"Previous runs of experiment `{experiment}`")
    if previous:
        mine = {k: v for k, v in params.items() if k.startswith("split.") and k.endswith(".fingerprint")}
        prev_rows = []
        for r in previous:
            theirs = {k: v for k, v in r.data.params.items() if k.startswith("split.") and k.endswith(".fingerprint")}
            started = datetime.fromtimestamp(r.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
            prev_rows.append([r.info.run_name or r.info.run_id[:8], started, r.data.params.get("lora", ""),
                              "yes" if theirs == mine else "no", *table_row(r.data.metrics)])  # fmt: skip
        doc.table(["run", "started (UTC)", "LoRA", "same cases+seeds", *TABLE_HEADERS], prev_rows)
    else:
        doc.p("No earlier finished evaluation runs in this experiment.")

    others = sorted({k.rsplit("/", 1)[0] for k in metrics if k.endswith("/dino")} - {"single", "multi"})
    if others:
        doc.h(2, "Other splits")
        doc.table(["split", "cases", "DINO", "CLIP-T", "CLIP-I"],
                  [[s, str(int(metrics[f"{s}/cases"])), *[fmt(m, metrics.get(f"{s}/{m}")) for m in TABLE_METRICS]]
                   for s in others])  # fmt: skip

    doc.h(2, "Per subject")
    for split, subjects in breakdown.items():
        doc.h(3, split)
        doc.table(["subject", "DINO", "CLIP-T", "CLIP-I"],
                  [[name, *[fmt(m, v[m]) for m in TABLE_METRICS]] for name, v in subjects.items()])  # fmt: skip

    if samples:
        doc.h(2, "Samples (references | generations, one row per case)")
        for src in samples:
            doc.img(Path(src).stem, src)
    return doc


# ---- sample grids ----------------------------------------------------------------------------------
def sample_grid(rows: list[tuple[str, list[str], list[str]]], tile: int = 128) -> Image.Image:
    """``rows``: (caption, reference image paths, generated image paths) -> one sheet, a row per case."""
    font = ImageFont.load_default()
    caption_h, gap = 16, tile // 8
    width = max(len(refs) * tile + gap + len(gens) * tile for _, refs, gens in rows)
    sheet = Image.new("RGB", (width, len(rows) * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (caption, refs, gens) in enumerate(rows):
        y = r * (tile + caption_h)
        draw.text((2, y + 2), caption[: width // 6], fill="black", font=font)
        x = 0
        for i, p in enumerate(refs + gens):
            if i == len(refs):
                x += gap
            with Image.open(p) as im:
                sheet.paste(_square(im.convert("RGB"), tile), (x, y + caption_h))
            x += tile
    return sheet


def _square(im: Image.Image, size: int) -> Image.Image:
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
