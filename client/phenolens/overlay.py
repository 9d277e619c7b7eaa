"""Signed explanation maps drawn over faces, with Pillow and a built-in colormap.

The colormap is diverging and colour-blind safe (ColorBrewer RdBu, reversed):
blue cells push two faces apart, red cells pull them together, and cells near
zero leave the face visible. Maps are scaled by a robust peak (the 99th
percentile of |map|, so one extreme cell does not wash out the rest), zero stays
transparent, and opacity grows with the square root of |value| so that cells at
a fifth of the peak are still plainly visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .arrays import require_pillow

# ColorBrewer RdBu, 11 classes, from negative (blue) to positive (red).
_DIVERGING = np.array(
    [
        (5, 48, 97), (33, 102, 172), (67, 147, 195), (146, 197, 222), (209, 229, 240),
        (247, 247, 247),
        (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43), (103, 0, 31),
    ],
    dtype=np.float32,
)


FADE_FLOOR = 0.05  # |value| under this share of the peak is drawn transparent


def diverging_colors(values: np.ndarray) -> np.ndarray:
    """(...,) values in [-1, 1] -> (..., 3) float32 RGB in 0..255, by linear interpolation."""
    t = (np.clip(values, -1.0, 1.0) + 1.0) / 2.0 * (len(_DIVERGING) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_DIVERGING) - 2)
    frac = (t - lo)[..., None]
    return _DIVERGING[lo] * (1.0 - frac) + _DIVERGING[lo + 1] * frac


def resize_map(signed_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float map -> (H, W) float32 by bilinear interpolation; ``size`` is (H, W)."""
    Image = require_pillow()

    arr = np.asarray(signed_map, dtype=np.float32)
    if arr.shape == tuple(size):
        return arr
    im = Image.fromarray(np.ascontiguousarray(arr)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32)


def render_overlay(base_rgb: np.ndarray, signed_map: np.ndarray, *, alpha: float = 0.6) -> np.ndarray:
    """(H, W, 3) uint8 face and (h, w) signed map -> (H, W, 3) uint8 overlay.

    Opacity grows with |map| up to ``alpha``; the map is resized to the face.
    """
    base = np.asarray(base_rgb, dtype=np.float32)[..., :3]
    m = resize_map(signed_map, base.shape[:2])
    scale = robust_peak(m)
    v = np.clip(m / scale, -1.0, 1.0)
    # exactly transparent under FADE_FLOOR of the peak: no tinted rectangle around a crop
    magnitude = np.clip((np.abs(v) - FADE_FLOOR) / (1.0 - FADE_FLOOR), 0.0, 1.0)
    weight = (alpha * np.sqrt(magnitude))[..., None]
    out = base * (1.0 - weight) + diverging_colors(v) * weight
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def robust_peak(signed_map: np.ndarray) -> float:
    """The colour scale ±peak of a map: the 99th percentile of its non-zero |values| (1.0 if none)."""
    magnitude = np.abs(np.asarray(signed_map, dtype=np.float64))
    nonzero = magnitude[magnitude > 0]
    return float(np.percentile(nonzero, 99)) if nonzero.size else 1.0


# The colours each method's map can show, in words (contrast keeps what differs: blue only).
LEGENDS = {
    "contrast": ("blue: differs from the other face",),
}
DEFAULT_LEGEND = ("blue: pushes the faces apart", "red: pulls them together")
LEGEND_HEIGHT = 46


def legend_strip(width: int, method: str | None, *,
                 faces: str = "left: query face · right: gallery match",
                 weighted: bool = False) -> np.ndarray:
    """(46, width, 3) uint8 under a figure: a colour bar, which face is which, what the
    colours mean for ``method`` and how strong they are (``weighted``: the map drawn is
    weighted by the region effects, ``ExplanationMap.drawn``)."""
    Image = require_pillow()
    from PIL import ImageDraw

    strip = np.full((LEGEND_HEIGHT, width, 3), 255, dtype=np.uint8)
    words = LEGENDS.get(method or "", DEFAULT_LEGEND)
    lo = -1.0
    hi = 0.0 if len(words) == 1 else 1.0
    bar = diverging_colors(np.linspace(lo, hi, min(96, max(8, width // 3))))
    strip[4:11, 4 : 4 + bar.shape[0]] = bar[None].astype(np.uint8)
    image = Image.fromarray(strip)
    draw = ImageDraw.Draw(image)
    draw.text((bar.shape[0] + 10, 1), f"{method or 'map'} · {faces}", fill=(40, 40, 40))
    draw.text((4, 14), " · ".join((*words, "pale: weak")), fill=(40, 40, 40))
    scale = "strength relative to the strongest spot on each face"
    if weighted:
        scale = "weighted by the region effects · relative to the strongest spot"
    draw.text((4, 28), scale, fill=(90, 90, 90))
    return np.asarray(image)


def side_by_side(images: list[np.ndarray], *, gap: int = 8) -> np.ndarray:
    """Images of any size in a row on a white background, scaled to the tallest height."""
    Image = require_pillow()

    height = max(im.shape[0] for im in images)
    scaled = []
    for im in images:
        pil = Image.fromarray(im)
        if im.shape[0] != height:
            pil = pil.resize((round(im.shape[1] * height / im.shape[0]), height))
        scaled.append(np.asarray(pil))
    width = sum(im.shape[1] for im in scaled) + gap * (len(scaled) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for im in scaled:
        canvas[:, x : x + im.shape[1]] = im[..., :3]
        x += im.shape[1] + gap
    return canvas


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    Image = require_pillow()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path)
    return path
