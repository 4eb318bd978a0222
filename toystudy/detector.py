"""A deterministic classical detector for the toy world: segment objects, read shape, colour and pattern.

How it reads an image (no learning; constants were set once on rendered scenes):

1. **Background.** The median colour of the image border is the background; a pixel belongs to an
   object when its colour distance to it exceeds a threshold set from the border's own spread (so
   speckled / mottled backgrounds and generator noise do not light up). 8-connected components
   smaller than ``min_area`` (a fraction of the image) or of low contrast (a bright patch of
   background) are ignored; each is re-cut at half its own contrast to drop blur halos.
2. **Shape.** Every world shape has the same area per ``size``, so the blob's pixel count gives
   its size whatever its shape. Each shape's template is drawn at that size on the blob's centroid
   (and at a few nearby sizes); the shape whose template best overlaps the blob (soft IoU) wins.
3. **Colour.** Every object pixel is a mixture of its colour, the fixed dark pattern tone and the
   background (anti-aliasing and blur mix them). The palette colour whose mixing triangle the
   pixels lie closest to wins, which keeps a blurred yellow from reading as orange.
4. **Pattern.** The same fit gives each interior pixel's darkness ``t`` (0 = object colour, 1 =
   pattern tone). Its mean separates solid (0), dotted (~0.23) and striped / checkered (~0.5);
   stripes are told from checks by correlating ``t`` with itself half a pattern pitch away (the
   pitch follows from the size): stripes agree horizontally and disagree vertically.

Every blob above ``min_area`` gets a best guess (with the shape's IoU as a confidence), so blurry
or noisy generated images still give an answer per object.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from .world import COLOURS, PATTERN_PITCH, PATTERN_TONE, SHAPE_AREA, SHAPES, Subject, draw_shape, draw_shape_mask

MIN_AREA = 0.004  # smallest blob kept, as a fraction of the image (16 px at 64x64)
MIN_THRESHOLD, MAX_THRESHOLD = 40.0, 90.0  # object / background colour distance bounds
MIN_CONTRAST = 75.0  # a blob's median distance from the background (world objects: >= 146 when sharp)
SOLID_MAX_DARK = 0.12  # mean pattern-tone share inside an object: solid 0, dots ~0.23, stripes / checks ~0.5
STRIPED_MIN_DARK = 0.3
CHECKERED_MIN_DARK = 0.41
SIZE_STEPS = (0.9, 0.95, 1.0, 1.05, 1.1)  # template sizes tried around the area estimate
_TONE = np.array(PATTERN_TONE, np.float32)
_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], np.float32)


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    pattern: str
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, exclusive end
    area: int  # pixels in the blob
    shape_score: float  # soft IoU of the best shape template: ~0.9 on clean renders, lower on poor images

    @property
    def subject(self) -> Subject:
        return Subject(self.shape, self.colour, self.pattern)


def _pixels(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got shape {arr.shape}")
    return arr


def background(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """The border's median colour and the colour distance above which a pixel is foreground."""
    h, w, _ = pixels.shape
    b = max(1, min(h, w) // 32)
    border = np.concatenate([pixels[:b].reshape(-1, 3), pixels[-b:].reshape(-1, 3),
                             pixels[:, :b].reshape(-1, 3), pixels[:, -b:].reshape(-1, 3)])  # fmt: skip
    bg = np.median(border, axis=0)
    spread = float(np.quantile(np.linalg.norm(border - bg, axis=1), 0.95))
    return bg, float(np.clip(2.0 * spread, MIN_THRESHOLD, MAX_THRESHOLD))


@lru_cache(maxsize=None)
def _centroid(shape: str) -> tuple[float, float]:
    """The shape's area centroid relative to its bounding-box centre, in units of size."""
    mask = draw_shape_mask(shape, 200.0, 200.0, 200.0, (400, 400))
    ys, xs = np.nonzero(mask)
    return float((xs + 0.5).mean() - 200.0) / 200.0, float((ys + 0.5).mean() - 200.0) / 200.0


def _template(shape: str, cx: float, cy: float, size: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Soft (anti-aliased) mask of ``shape`` with area centroid at (cx, cy), cropped to ``box``."""
    x0, y0, x1, y1 = box
    k = 4
    ox, oy = _centroid(shape)
    im = draw_shape(shape, (cx - ox * size - x0) * k, (cy - oy * size - y0) * k, size * k,
                    ((x1 - x0) * k, (y1 - y0) * k))  # fmt: skip
    return np.asarray(im.reduce(k), np.float32) / 255.0


def _shape(blob: np.ndarray, size: float) -> tuple[str, float]:
    """Best-overlapping shape template (soft IoU) on the blob's centroid, around the area-derived size."""
    pad = int(np.ceil(0.5 * size)) + 2
    target = np.pad(blob.astype(np.float32), pad)
    ys, xs = np.nonzero(target)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    box = (0, 0, target.shape[1], target.shape[0])
    best, best_score = SHAPES[0], -1.0
    for shape in SHAPES:
        for step in SIZE_STEPS:
            t = _template(shape, cx, cy, size * step, box)
            score = float(np.minimum(t, target).sum() / max(1e-6, np.maximum(t, target).sum()))
            if score > best_score:
                best, best_score = shape, score
    return best, best_score


def _mixing(px: np.ndarray, colour: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Explain pixels as ``a * colour + b * tone + (1 - a - b) * bg``: (distance to that triangle, a, b).

    Every rendered or blurred object pixel is such a mixture (anti-aliasing mixes the background in,
    blur mixes the pattern tone in), so the right colour is the one whose triangle the pixels lie on.
    """
    e1, e2, q = colour - bg, _TONE - bg, px - bg
    gram = np.array([[e1 @ e1, e1 @ e2], [e1 @ e2, e2 @ e2]]) + 1e-3 * np.eye(2)  # never singular
    a, b = np.linalg.solve(gram, np.stack([q @ e1, q @ e2]))
    inside = (a >= 0) & (b >= 0) & (a + b <= 1)
    dist = np.linalg.norm(q - np.outer(a, e1) - np.outer(b, e2), axis=1)
    edges = [_segment(px, colour, _TONE), _segment(px, _TONE, bg), _segment(px, bg, colour)]
    dist = np.where(inside, dist, np.min(edges, axis=0))
    return dist, np.clip(a, 0, 1), np.clip(b, 0, 1)


def _segment(px: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    lam = np.clip((px - p0) @ d / max(float(d @ d), 1e-6), 0, 1)
    return np.linalg.norm(px - p0 - np.outer(lam, d), axis=1)


def _colour(px: np.ndarray, bg: np.ndarray) -> tuple[str, np.ndarray]:
    """The palette colour whose mixing triangle fits the pixels best, and each pixel's darkness in [0, 1]."""
    fits = [_mixing(px, c, bg) for c in _PALETTE]
    best = int(np.argmin([float(np.mean(d)) for d, _, _ in fits]))
    _, a, b = fits[best]
    return _PALETTE_NAMES[best], b / np.maximum(a + b, 1e-3)


def _correlation(t: np.ndarray, inside: np.ndarray, dx: float, dy: float) -> float:
    """Correlation of ``t`` with itself shifted by (dx, dy) px, over pixels whose both ends are inside."""
    shifted = ndimage.shift(t, (dy, dx), order=1, mode="constant", cval=0.0)
    both = inside & (ndimage.shift(inside.astype(np.float32), (dy, dx), order=1, mode="constant") > 0.99)
    if both.sum() < 6:
        return 0.0
    a, b = t[both], shifted[both]
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 1e-6 else 0.0


def _pattern(t: np.ndarray, inside: np.ndarray, size: float) -> str:
    dark = float(t[inside].mean())
    if dark < SOLID_MAX_DARK:
        return "solid"
    half = PATTERN_PITCH * size / 2
    across, down = _correlation(t, inside, half, 0.0), _correlation(t, inside, 0.0, half)
    if across - down > 0.5 and dark > STRIPED_MIN_DARK and float(t[inside].std()) > 0.12:
        return "striped"
    # Dots cover ~23% of an object, checks ~50%: the dark share separates them even when blur has
    # smeared the pattern into an even tint.
    return "checkered" if dark > CHECKERED_MIN_DARK else "dotted"


def _blobs(pixels: np.ndarray, bg: np.ndarray, threshold: float, min_pixels: int):
    """(slice, boolean blob) per object: components of the foreground, each re-cut at half its own contrast.

    The second cut removes background that a low global threshold let through (blur halos, bright
    patches of a mottled background) and can split two objects that blur joined.
    """
    distance = np.linalg.norm(pixels - bg, axis=2)
    eight = np.ones((3, 3), int)
    labels, _ = ndimage.label(distance > threshold, structure=eight)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        blob = labels[sl] == i
        if blob.sum() < min_pixels:
            continue
        local = distance[sl]
        contrast = float(np.median(local[blob]))
        if contrast < MIN_CONTRAST:  # a bright patch of background, not an object
            continue
        cut = max(threshold, 0.45 * contrast)
        parts, _ = ndimage.label(blob & (local > cut), structure=eight)
        for j, sub in enumerate(ndimage.find_objects(parts), start=1):
            part = parts[sub] == j
            if part.sum() >= min_pixels:
                y0, x0 = sl[0].start + sub[0].start, sl[1].start + sub[1].start
                yield (slice(y0, y0 + part.shape[0]), slice(x0, x0 + part.shape[1])), part


def detect(image, min_area: float = MIN_AREA) -> list[Detection]:
    """Every object in ``image`` (PIL image or HxWx3 array), largest first."""
    pixels = _pixels(image)
    h, w, _ = pixels.shape
    bg, threshold = background(pixels)
    found = []
    for sl, blob in _blobs(pixels, bg, threshold, max(4, int(min_area * h * w))):
        area = int(blob.sum())
        size = float(np.sqrt(area / SHAPE_AREA))
        shape, score = _shape(blob, size)
        inside = ndimage.binary_erosion(blob) if size >= 12 else blob
        if inside.sum() < 4:
            inside = blob
        colour, darkness = _colour(pixels[sl][inside], bg)
        t = np.zeros(blob.shape, np.float32)
        t[inside] = darkness
        box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        found.append(Detection(shape, colour, _pattern(t, inside, size), box, area, round(score, 4)))
    return sorted(found, key=lambda d: (-d.area, d.bbox))
