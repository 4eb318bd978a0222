"""Subject200K's composite geometry and cutting a composite into its two panels.

The composite is 1056x528 with two 512x512 panels; the dataset authors' loader crops
left = (8, 8, 520, 520) and right = (528, 8, 1040, 520). ``scale`` multiplies every number, so tests
and quick starts can use small composites (0.125 gives 132x66 with 64x64 panels) through the same
code; it must keep every coordinate an integer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from .schema import UNDECODABLE_IMAGE, WRONG_IMAGE_SIZE

Box = tuple[int, int, int, int]


@dataclass
class PanelGeometry:
    composite: tuple[int, int] = (1056, 528)  # (width, height)
    left: Box = (8, 8, 520, 520)  # (left, top, right, bottom), PIL crop convention
    right: Box = (528, 8, 1040, 520)
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"geometry.scale must be positive, got {self.scale}")
        for name, values in (("composite", self.composite), ("left", self.left), ("right", self.right)):
            for v in values:
                if abs(v * self.scale - round(v * self.scale)) > 1e-9:
                    raise ValueError(f"geometry.scale={self.scale} makes geometry.{name}={values} non-integer")
        w, h = self.composite_size
        for name, (x0, y0, x1, y1) in (("left", self.left_box), ("right", self.right_box)):
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise ValueError(f"geometry.{name} box {(x0, y0, x1, y1)} does not fit the {w}x{h} composite")

    def _scaled(self, values) -> tuple[int, ...]:
        return tuple(round(v * self.scale) for v in values)

    @property
    def composite_size(self) -> tuple[int, int]:
        return self._scaled(self.composite)

    @property
    def left_box(self) -> Box:
        return self._scaled(self.left)

    @property
    def right_box(self) -> Box:
        return self._scaled(self.right)

    @property
    def boxes(self) -> tuple[Box, Box]:
        return self.left_box, self.right_box


def cut_panels(data: bytes, geometry: PanelGeometry) -> tuple[list[Image.Image] | None, str | None, str | None]:
    """``([left, right], None, None)`` or ``(None, reason, detail)``; never raises on bad data.

    The size is checked from the header before decoding, so a wrong-size image costs no decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != geometry.composite_size:
                w, h = geometry.composite_size
                return None, WRONG_IMAGE_SIZE, f"{im.width}x{im.height}, expected {w}x{h}"
            rgb = im.convert("RGB")  # full decode: truncated data fails here
    except Exception as err:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
        return None, UNDECODABLE_IMAGE, f"{type(err).__name__}: {err}"[:200]
    return [rgb.crop(box) for box in geometry.boxes], None, None
