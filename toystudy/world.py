"""The procedural subject world: subjects, scenes, their pictures and their text.

A subject is (shape, colour, pattern): 6 shapes in 3 categories x 6 colours x 4 patterns = 144
subjects, each an identity a classical detector can read back (:mod:`toystudy.detector`). Every
shape has the same area for a given ``size``, so an object's size can be read from its pixel count
whatever its shape, and its pattern pitch scales with its size (a subject keeps its look at every
scale, as a real object's texture does). Patterns are drawn in one fixed dark tone, so the colour
stays readable on every patterned subject.

Coordinates are panel-relative (fractions of width / height; sizes are fractions of the shorter
side), so one scene renders the same at 32, 64 or 128 px. Images are drawn at 4x and box-reduced,
which anti-aliases edges the way a photo or a VAE would. Everything random takes a numpy
``Generator``: the same seed gives the same bytes.

Text: ``Subject.item`` / ``.category`` / ``.phrase`` as Subject200K writes its fields,
:func:`scene_prompt` for base-model pretraining scenes of 1-3 objects, :func:`describe_panel` for
Subject200K-style single-subject descriptions ("On a pale grey background, this item sits ...").
:data:`VOCABULARY` holds every token (:func:`tokenize`) any of them, or MUSAR's diptych template
(:mod:`pipelines.samples`), can contain, for a word-level tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from pipelines.samples import ANOTHER, LEFT_INTRO, RIGHT_INTRO

CATEGORIES: dict[str, tuple[str, ...]] = {
    "Polygons": ("triangle", "square"),
    "Round shapes": ("circle", "ring"),
    "Symbols": ("cross", "heart"),
}
# World v2 (the one change the study allows): v1 had 10 shapes (also diamond, rectangle, semicircle,
# star) at sizes 0.26-0.5. After 10k pretraining steps its base drew the right colours, patterns and
# counts but blobs for shapes (2-3 tokens wide on the 8x8 token grid), so detector fidelity stayed
# ~0.1 even with every subject described in words. v2 keeps six silhouettes a blob can still be told
# apart by (corners, hole, arms) and draws objects larger.
SHAPES: tuple[str, ...] = tuple(s for shapes in CATEGORIES.values() for s in shapes)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (250, 140, 20),
    "yellow": (240, 210, 40),
    "green": (44, 160, 44),
    "blue": (31, 96, 220),
    "purple": (150, 70, 190),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
PATTERN_TONE = (34, 34, 40)  # every pattern's second tone: dark, far from every colour and background

SHAPE_AREA = 0.6  # area of every shape in units of size**2
PATTERN_PITCH = 0.36  # stripe / check / dot period as a fraction of the object's size
DOT_RADIUS = 0.27  # dot radius as a fraction of the pitch (dark fraction ~0.23)
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Background:
    name: str  # "pale grey": the words used in text
    rgb: tuple[int, int, int]
    texture: str = "plain"  # plain | speckled (per-pixel grey noise) | mottled (smooth noise)
    amplitude: float = 0.0  # noise standard deviation (0-255 scale)

    @property
    def phrase(self) -> str:
        return f"a {self.name} background"


BACKGROUNDS: dict[str, Background] = {
    b.name: b
    for b in (
        Background("pale grey", (214, 214, 214)),
        Background("white", (248, 248, 246)),
        Background("cream", (243, 234, 208)),
        Background("light blue", (208, 224, 242)),
        Background("speckled grey", (205, 205, 205), "speckled", 8.0),
        Background("mottled green", (212, 232, 208), "mottled", 7.0),
    )
}

# Panel thirds -> location phrase, indexed [row][column] of the object's centre.
LOCATIONS = (
    ("in the upper left", "at the top", "in the upper right"),
    ("on the left", "in the center", "on the right"),
    ("in the lower left", "at the bottom", "in the lower right"),
)
SIZE_WORDS = ((0.37, "small in the frame"), (0.47, "at a medium size"), (np.inf, "large in the frame"))

# Subject200K-style description pieces: "{setting}, this item {pose} {location}, {size}."
SETTINGS = ("On {bg}", "Against {bg}", "Set on {bg}", "Shown on {bg}")
POSES = ("sits", "rests", "stands", "is placed", "appears")

# Object size (fraction of the panel's shorter side) by number of objects in the scene: the maximum,
# and the floor below which patterns stop being readable at 64 px (~17 px). Singles vary 0.5x-1x.
MAX_SIZE = {1: 0.56, 2: 0.46, 3: 0.38}
MIN_SIZE = 0.3
EDGE_MARGIN = 0.04  # object bounding boxes keep this far from the panel border
GAP = 0.07  # and this far from each other (~4.5 px at 64 px: blur never joins two objects)


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    pattern: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS or self.pattern not in PATTERNS:
            raise ValueError(f"unknown subject {self.shape!r}, {self.colour!r}, {self.pattern!r}")

    @property
    def category(self) -> str:
        return next(c for c, shapes in CATEGORIES.items() if self.shape in shapes)

    @property
    def words(self) -> str:
        return f"{self.colour} {self.pattern} {self.shape}"

    @property
    def phrase(self) -> str:
        """'a red striped triangle' / 'an orange solid ring'."""
        return with_article(self.words)

    @property
    def item(self) -> str:
        """Subject200K's ``description.item``: 'Red striped triangle'."""
        return self.words.capitalize()

    @classmethod
    def from_text(cls, text: str) -> Subject:
        """Inverse of ``item`` / ``phrase`` / ``words``."""
        words = [w for w in tokenize(text) if w not in ("a", "an")]
        if len(words) != 3:
            raise ValueError(f"not a subject: {text!r}")
        return cls(shape=words[2], colour=words[0], pattern=words[1])


ALL_SUBJECTS: tuple[Subject, ...] = tuple(Subject(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS)


@dataclass(frozen=True)
class Placement:
    """Object centre (x, y) as fractions of the panel's width and height; size as a fraction of its shorter side."""

    x: float
    y: float
    size: float

    @property
    def location(self) -> str:
        row, col = (min(2, int(v * 3)) for v in (self.y, self.x))
        return LOCATIONS[row][col]

    @property
    def size_words(self) -> str:
        return next(words for limit, words in SIZE_WORDS if self.size < limit)


@dataclass(frozen=True)
class Scene:
    subjects: tuple[Subject, ...]
    placements: tuple[Placement, ...]
    background: str

    @property
    def prompt(self) -> str:
        return scene_prompt(self.subjects, self.placements, self.background)

    def render(self, size: int | tuple[int, int], rng: np.random.Generator) -> Image.Image:
        return render_scene(self.subjects, self.placements, self.background, size, rng)


# ---------------------------------------------------------------------------------------------- shapes


def _curve(fx, fy, n: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([fx(t), fy(t)], axis=1)


def _regular(k: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(k) * 2 * np.pi / k
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _raw_shape(shape: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer polygon and optional hole, image coordinates (y down), any scale."""
    if shape == "triangle":
        return _regular(3, phase=-np.pi / 2), None
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), None
    if shape == "circle":
        return _curve(np.cos, np.sin), None
    if shape == "ring":
        return _curve(np.cos, np.sin), _curve(lambda t: 0.5 * np.cos(t), lambda t: 0.5 * np.sin(t))
    if shape == "cross":
        a, b = 1 / 3, 1.0
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                         [-b, -a], [-a, -a]], float), None  # fmt: skip
    if shape == "heart":
        return _curve(lambda t: 16 * np.sin(t) ** 3,
                      lambda t: -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))), None  # fmt: skip
    raise ValueError(shape)


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


@lru_cache(maxsize=None)
def shape_geometry(shape: str) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float]]:
    """(outer, hole, (width, height)) in units of ``size``: area SHAPE_AREA, bounding box centred on 0."""
    outer, hole = _raw_shape(shape)
    lo, hi = outer.min(0), outer.max(0)
    centre = (lo + hi) / 2
    k = np.sqrt(SHAPE_AREA / (_area(outer) - (_area(hole) if hole is not None else 0.0)))
    outer = (outer - centre) * k
    hole = None if hole is None else (hole - centre) * k
    w, h = (hi - lo) * k
    return outer, hole, (float(w), float(h))


def draw_shape(shape: str, cx: float, cy: float, size_px: float, canvas: tuple[int, int]) -> Image.Image:
    """An "L" image of ``canvas`` (w, h) size: 255 inside one shape centred at pixel (cx, cy), 0 outside."""
    outer, hole, _ = shape_geometry(shape)
    im = Image.new("L", canvas, 0)
    draw = ImageDraw.Draw(im)
    draw.polygon([tuple(p) for p in (outer * size_px + (cx, cy)).tolist()], fill=255)
    if hole is not None:
        draw.polygon([tuple(p) for p in (hole * size_px + (cx, cy)).tolist()], fill=0)
    return im


def draw_shape_mask(shape: str, cx: float, cy: float, size_px: float, canvas: tuple[int, int]) -> np.ndarray:
    """Boolean mask (h, w) of one shape centred at pixel (cx, cy) with ``size_px`` (no anti-aliasing)."""
    return np.asarray(draw_shape(shape, cx, cy, size_px, canvas)) > 127


def pattern_mask(pattern: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, size_px: float) -> np.ndarray:
    """Where the dark pattern tone goes, on pixel-centre grids ``xx``, ``yy``; phase fixed to the object's centre."""
    p = PATTERN_PITCH * size_px
    u, v = (xx - cx) / p, (yy - cy) / p
    if pattern == "solid":
        return np.zeros(np.broadcast(u, v).shape, bool)
    if pattern == "striped":  # horizontal stripes, a colour band through the centre
        return np.broadcast_to(((v % 1.0) >= 0.25) & ((v % 1.0) < 0.75), np.broadcast(u, v).shape)
    if pattern == "checkered":
        return (np.floor(2 * u + 0.5) + np.floor(2 * v + 0.5)) % 2 == 1
    if pattern == "dotted":  # a dot on the centre and on every lattice point `p` apart
        du, dv = (u + 0.5) % 1.0 - 0.5, (v + 0.5) % 1.0 - 0.5
        return du * du + dv * dv < DOT_RADIUS**2
    raise ValueError(pattern)


# -------------------------------------------------------------------------------------------- rendering


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    w, h = (size, size) if isinstance(size, int) else size
    if w < 8 or h < 8:
        raise ValueError(f"image size must be at least 8x8, got {w}x{h}")
    return int(w), int(h)


def _background(bg: Background, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    pixels = np.broadcast_to(np.array(bg.rgb, np.float32), (h, w, 3)).copy()
    if bg.texture == "speckled":
        pixels += rng.normal(0, bg.amplitude, size=(h, w, 1)).astype(np.float32)
    elif bg.texture == "mottled":  # smooth noise: a coarse grid, bilinearly enlarged
        cells = max(2, min(w, h) // 8)
        coarse = rng.normal(0, 1, size=(h // cells + 2, w // cells + 2)).astype(np.float32)
        smooth = Image.fromarray(coarse, mode="F").resize((w + 2 * cells, h + 2 * cells), Image.BILINEAR)
        noise = np.asarray(smooth)[cells : cells + h, cells : cells + w]
        pixels += (bg.amplitude * noise / max(float(noise.std()), 1e-6))[..., None]
    return np.clip(np.round(pixels), 0, 255)


def render_scene(
    subjects, placements, background: str, size: int | tuple[int, int], rng: np.random.Generator
) -> Image.Image:
    """An RGB image of ``subjects`` at ``placements`` on the named background; ``rng`` draws its texture."""
    if len(subjects) != len(placements):
        raise ValueError(f"{len(subjects)} subjects but {len(placements)} placements")
    w, h = _size(size)
    bg = BACKGROUNDS[background]
    base = _background(bg, w, h, rng)
    ss = SUPERSAMPLE
    canvas = np.repeat(np.repeat(base, ss, axis=0), ss, axis=1)
    side = min(w, h) * ss
    for subject, pl in zip(subjects, placements):
        cx, cy, s = pl.x * w * ss, pl.y * h * ss, pl.size * side
        mask = draw_shape_mask(subject.shape, cx, cy, s, (w * ss, h * ss))
        ys, xs = np.nonzero(mask)
        dark = pattern_mask(subject.pattern, xs + 0.5, ys + 0.5, cx, cy, s)
        canvas[ys, xs] = np.where(dark[:, None], PATTERN_TONE, COLOURS[subject.colour])
    pixels = canvas.reshape(h, ss, w, ss, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")


def object_box(subject: Subject, placement: Placement, size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """The pixel bounding box (x0, y0, x1, y1), exclusive end, that ``render_scene`` fills for one object."""
    w, h = _size(size)
    _, _, (bw, bh) = shape_geometry(subject.shape)
    s = placement.size * min(w, h)
    cx, cy = placement.x * w, placement.y * h
    return (int(np.floor(cx - bw * s / 2)), int(np.floor(cy - bh * s / 2)),
            int(np.ceil(cx + bw * s / 2)), int(np.ceil(cy + bh * s / 2)))  # fmt: skip


# -------------------------------------------------------------------------------------------- sampling


def _fits(boxes: list[tuple[float, float, float, float]]) -> bool:
    for i, (a0, b0, a1, b1) in enumerate(boxes):
        if a0 < EDGE_MARGIN or b0 < EDGE_MARGIN or a1 > 1 - EDGE_MARGIN or b1 > 1 - EDGE_MARGIN:
            return False
        for c0, d0, c1, d1 in boxes[:i]:
            if not (a1 + GAP <= c0 or c1 + GAP <= a0 or b1 + GAP <= d0 or d1 + GAP <= b0):
                return False
    return True


def sample_placements(subjects, rng: np.random.Generator, aspect: float = 1.0) -> tuple[Placement, ...]:
    """Random non-overlapping placements, one per subject (1-3), each in its own third-of-panel cell.

    Sizes are uniform in [max(MIN_SIZE, MAX_SIZE[n] / 2), MAX_SIZE[n]]; centres are uniform where the
    object fits inside the margins. Distinct cells give every object its own location phrase.
    ``aspect`` = panel width / height (placements are panel-relative).
    """
    n = len(subjects)
    if n not in MAX_SIZE:
        raise ValueError(f"1 to {max(MAX_SIZE)} subjects per scene, got {n}")
    top = MAX_SIZE[n]
    low = max(MIN_SIZE, top / 2)
    sx, sy = (1 / aspect, 1.0) if aspect >= 1 else (1.0, aspect)  # size unit in panel fractions per axis
    extents = [shape_geometry(s.shape)[2] for s in subjects]
    for attempt in range(2000):
        shrink = 0.97 ** (attempt // 200)  # crowded draws: shrink slowly rather than loop forever
        sizes = rng.uniform(low, top, size=n) * shrink
        places, boxes = [], []
        for (bw, bh), s in zip(extents, sizes):
            hw, hh = bw * s * sx / 2, bh * s * sy / 2
            x = rng.uniform(EDGE_MARGIN + hw, 1 - EDGE_MARGIN - hw)
            y = rng.uniform(EDGE_MARGIN + hh, 1 - EDGE_MARGIN - hh)
            places.append(Placement(float(x), float(y), float(s)))
            boxes.append((x - hw, y - hh, x + hw, y + hh))
        if len({p.location for p in places}) == n and _fits(boxes):
            return tuple(places)
    raise RuntimeError(f"could not place {n} objects")  # unreachable with the sizes above


def sample_scene(rng: np.random.Generator, n_subjects: int, pool=ALL_SUBJECTS, background: str | None = None) -> Scene:
    """Distinct subjects from ``pool``, their placements and a background (random unless named)."""
    chosen = rng.choice(len(pool), size=n_subjects, replace=False)
    subjects = tuple(pool[int(i)] for i in chosen)
    if background is None:
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(subjects, sample_placements(subjects, rng), background)


# ------------------------------------------------------------------------------------------------- text


def with_article(words: str) -> str:
    """'a triangle', 'an orange ring': the indefinite article the words take."""
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def objects_prompt(parts: list[str], background: str) -> str:
    """'A on the left, B in the center and C on the right, on <background>': the one prompt sentence."""
    objects = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    return f"{objects}, on {BACKGROUNDS[background].phrase}"


def scene_prompt(subjects, placements, background: str) -> str:
    """'a red striped triangle on the left and a blue dotted circle on the right, on a pale grey background'."""
    return objects_prompt([f"{s.phrase} {p.location}" for s, p in zip(subjects, placements)], background)


def describe_panel(placement: Placement, background: str, rng: np.random.Generator) -> str:
    """Subject200K-style ``description_0/1`` of a single-subject panel, naming it 'this item'."""
    setting = SETTINGS[int(rng.integers(len(SETTINGS)))].format(bg=BACKGROUNDS[background].phrase)
    pose = POSES[int(rng.integers(len(POSES)))]
    return f"{setting}, this item {pose} {placement.location}, {placement.size_words}."


_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """The word-level split VOCABULARY is built with: lowercase words and digits; each punctuation mark alone."""
    return _TOKEN.findall(text.lower())


def _vocabulary() -> tuple[str, ...]:
    pieces = [*CATEGORIES, *SHAPES, *COLOURS, *PATTERNS, "a", "an", "and", ",", ".", "this item", "on"]
    pieces += [b.phrase for b in BACKGROUNDS.values()]
    pieces += [loc for row in LOCATIONS for loc in row] + [words for _, words in SIZE_WORDS]
    pieces += [s.format(bg="") for s in SETTINGS] + list(POSES)
    pieces += [LEFT_INTRO, RIGHT_INTRO, ANOTHER]  # MUSAR's diptych prompt (pipelines.samples)
    return tuple(sorted({t for p in pieces for t in tokenize(p)}))


VOCABULARY: tuple[str, ...] = _vocabulary()
