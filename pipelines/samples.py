"""Single and diptych samples (paper 3.2.1, Figure 2; DESIGN.md section 2).

Single: condition = one panel, target = the other panel, condition prompt = the item, target prompt
= the target panel's description; both directions, ids ``<row id>/0>1`` and ``<row id>/1>0``.

Diptych of single samples A and B: conditions = A's and B's condition panels; target = A's target
panel left, B's right, each resized to half the diptych size; target prompt =

    "Two images concatenated side by side, the left part is: {cond 0}. {desc A}, the right part is: {cond 1}. {desc B}"

where desc A loses its final period (Figure 2 reads "... lighting above, the right part is: ..."),
and cond 1 = "another " + B's item when A and B share an item or a category (compared
case-insensitively, whitespace collapsed). Each condition prompt's character span [start, end) in
the target prompt is recorded: Python string indices, so ``target_prompt[start:end] == cond``.
"""

from __future__ import annotations

from PIL import Image

from .images import ImageCodec, decode_rgb
from .schema import content_hash

LEFT_INTRO = "Two images concatenated side by side, the left part is: "
RIGHT_INTRO = ", the right part is: "
ANOTHER = "another "


def normalise(text: str) -> str:
    """Comparison key for items and categories."""
    return " ".join(text.split()).casefold()


def shares_kind(item_a: str, category_a: str, item_b: str, category_b: str) -> bool:
    return normalise(item_a) == normalise(item_b) or normalise(category_a) == normalise(category_b)


def condition_prompts(item_a: str, category_a: str, item_b: str, category_b: str) -> tuple[str, str]:
    """The "another" rule: the second subject is "another X" when both are the same kind of thing."""
    second = ANOTHER + item_b if shares_kind(item_a, category_a, item_b, category_b) else item_b
    return item_a, second


def diptych_prompt(cond_0: str, desc_a: str, cond_1: str, desc_b: str) -> tuple[str, list[list[int]]]:
    """The Figure 2 template and the span of each condition prompt inside it."""
    desc_a = desc_a.strip()
    if desc_a.endswith("."):
        desc_a = desc_a[:-1].rstrip()
    start_0 = len(LEFT_INTRO)
    left = f"{LEFT_INTRO}{cond_0}. {desc_a}{RIGHT_INTRO}"
    start_1 = len(left)
    prompt = f"{left}{cond_1}. {desc_b.strip()}"
    return prompt, [[start_0, start_0 + len(cond_0)], [start_1, start_1 + len(cond_1)]]


DIRECTIONS = ((0, 1), (1, 0))  # (condition panel, target panel)


def single_id(row_id: str, direction: int) -> str:
    cond, target = DIRECTIONS[direction]
    return f"{row_id}/{cond}>{target}"


def single_samples(row_id: str, item: str, category: str, descriptions: tuple[str, str],
                   panels: tuple[bytes, bytes], panel_sizes: tuple[tuple[int, int], tuple[int, int]]) -> list[dict]:  # fmt: skip
    """The two single samples of one subject (rows of SAMPLE_SCHEMA), "0>1" first."""
    rows = []
    for direction, (cond, target) in enumerate(DIRECTIONS):
        images, prompts = [panels[cond]], [item]
        rows.append(
            dict(
                sample_id=single_id(row_id, direction), dataset="single", subjects=[row_id],
                sources=[single_id(row_id, direction)], items=[item], categories=[category],
                condition_images=images, condition_prompts=prompts, condition_spans=None,
                target_image=panels[target], target_width=panel_sizes[target][0],
                target_height=panel_sizes[target][1], target_prompt=descriptions[target],
                content_hash=content_hash(images, prompts, None, panels[target], descriptions[target]),
            )
        )  # fmt: skip
    return rows


def diptych_sample(sample_id: str, dataset: str, a: dict, b: dict, size: tuple[int, int], codec: ImageCodec) -> dict:
    """A diptych row from two single rows ``a`` (left) and ``b`` (right) given as dicts with keys
    subject, source, item, category, condition_image, target_image, description."""
    cond_0, cond_1 = condition_prompts(a["item"], a["category"], b["item"], b["category"])
    prompt, spans = diptych_prompt(cond_0, a["description"], cond_1, b["description"])
    width, height = size
    half = (width // 2, height)
    canvas = Image.new("RGB", (width, height))
    for x, side in ((0, a), (width // 2, b)):
        panel = decode_rgb(side["target_image"])
        if panel.size != half:
            panel = panel.resize(half, Image.Resampling.LANCZOS)
        canvas.paste(panel, (x, 0))
    target = codec.encode(canvas)
    images = [a["condition_image"], b["condition_image"]]
    return dict(
        sample_id=sample_id, dataset=dataset, subjects=[a["subject"], b["subject"]],
        sources=[a["source"], b["source"]], items=[a["item"], b["item"]], categories=[a["category"], b["category"]],
        condition_images=images, condition_prompts=[cond_0, cond_1], condition_spans=spans,
        target_image=target, target_width=width, target_height=height, target_prompt=prompt,
        content_hash=content_hash(images, [cond_0, cond_1], spans, target, prompt),
    )  # fmt: skip
