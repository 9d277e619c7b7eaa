"""Overlays and pair figures of signed maps (matplotlib Agg, no display, no pyplot state).

Colormap: ``RdBu_r`` — red where a region pulls the two faces together,
blue where it pushes them apart, centred at 0 with symmetric limits ±max|map|
(one scale for both faces of a pair; the peak is the 99th percentile of |map| so
one extreme cell does not wash out the rest). ColorBrewer's RdBu is diverging and
colour-blind safe (red/blue stay apart for deuteranopia and protanopia, unlike
red/green or ``coolwarm``'s grey-ish midtones), and red/blue reads without a
legend. Opacity grows with sqrt(|value|), so cells near 0 leave the face
visible and cells at a fifth of the peak are still plainly coloured.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from encoder.align import Alignment, warp_to_photo  # noqa: E402
from gallery.png import encode_png  # noqa: E402

DIVERGING_CMAP = "RdBu_r"
MAX_ALPHA = 0.75
LEGENDS = {"contrast": "← differs from the other face      0      shared with it →"}
DEFAULT_LEGEND = "← pushes apart      0      pulls together →"


def symmetric_limit(*maps: np.ndarray) -> float:
    """The shared colour scale ±limit: the largest over all maps of the 99th percentile of
    their non-zero |values| (1.0 when they are all zero)."""
    peaks = []
    for m in maps:
        if m is None or not m.size:
            continue
        magnitude = np.abs(np.asarray(m, dtype=np.float64))
        nonzero = magnitude[magnitude > 0]
        if nonzero.size:
            peaks.append(float(np.percentile(nonzero, 99)))
    peak = max(peaks, default=0.0)
    return peak if peak > 0 else 1.0


def colorize(signed_map: np.ndarray, limit: float | None = None) -> np.ndarray:
    """(H, W) signed map -> (H, W, 4) float RGBA in 0..1, opacity ∝ |value| / limit."""
    limit = symmetric_limit(signed_map) if limit is None else float(limit)
    scaled = np.clip(np.asarray(signed_map, dtype=np.float64) / limit, -1.0, 1.0)
    rgba = colormaps[DIVERGING_CMAP]((scaled + 1.0) / 2.0)
    rgba[..., 3] = MAX_ALPHA * np.sqrt(np.abs(scaled))
    return rgba


def _resize_map(signed_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    m = np.asarray(signed_map, dtype=np.float32)
    if m.shape == size:
        return m
    import cv2

    return cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def overlay(rgb: np.ndarray, signed_map: np.ndarray, *, limit: float | None = None) -> np.ndarray:
    """(H, W, 3) uint8 image + signed map (any size; resized bilinearly) -> (H, W, 3) uint8."""
    image = np.asarray(rgb)
    rgba = colorize(_resize_map(signed_map, image.shape[:2]), limit)
    alpha = rgba[..., 3:4]
    blended = image.astype(np.float64) / 255.0 * (1 - alpha) + rgba[..., :3] * alpha
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def figure_png(fig: Figure, path: str | Path | None = None) -> bytes:
    """PNG bytes of a matplotlib figure, also written to ``path`` when one is given."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def overlay_png(
    rgb: np.ndarray,
    signed_map: np.ndarray,
    path: str | Path | None = None,
    *,
    limit: float | None = None,
) -> bytes:
    """PNG bytes of :func:`overlay` (also written to ``path`` when given)."""
    data = encode_png(overlay(rgb, signed_map, limit=limit))
    if path is not None:
        Path(path).write_bytes(data)
    return data


def photo_map(aligned_map: np.ndarray, alignment: Alignment) -> np.ndarray:
    """(h, w) map on the aligned crop -> (H, W) float32 map on the original photo (0 outside)."""
    return warp_to_photo(aligned_map, alignment)


def photo_overlay_png(
    photo_rgb: np.ndarray,
    aligned_map: np.ndarray,
    alignment: Alignment,
    path: str | Path | None = None,
    *,
    limit: float | None = None,
) -> bytes:
    """The aligned-crop map drawn on the original photo through the inverse alignment."""
    limit = symmetric_limit(aligned_map) if limit is None else limit
    return overlay_png(photo_rgb, photo_map(aligned_map, alignment), path, limit=limit)


def pair_figure(
    query_rgb: np.ndarray,
    gallery_rgb: np.ndarray,
    query_map: np.ndarray,
    gallery_map: np.ndarray,
    *,
    cosine: float,
    label: str = "",
    method: str = "similarity",
    path: str | Path | None = None,
    dpi: int = 110,
) -> bytes:
    """PNG of a pair: both aligned faces (top), both overlays on one ±max|map| scale
    (bottom), a colorbar, the cosine and the gallery label in the title."""
    limit = symmetric_limit(query_map, gallery_map)
    fig = Figure(figsize=(5.2, 5.9), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = (
        (query_rgb, None, "query"),
        (gallery_rgb, None, label or "gallery"),
        (query_rgb, query_map, f"query · {method}"),
        (gallery_rgb, gallery_map, f"gallery · {method}"),
    )
    for ax, (rgb, signed, name) in zip(axes.ravel(), panels, strict=True):
        ax.imshow(rgb if signed is None else overlay(rgb, signed, limit=limit))
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    mappable = matplotlib.cm.ScalarMappable(Normalize(-limit, limit), colormaps[DIVERGING_CMAP])
    bar = fig.colorbar(
        mappable, ax=axes.ravel().tolist(), orientation="horizontal", fraction=0.05, pad=0.04
    )
    bar.set_label(LEGENDS.get(method, DEFAULT_LEGEND), fontsize=8)
    bar.ax.tick_params(labelsize=7)
    title = f"cosine {cosine:.3f}"
    fig.suptitle(f"{label} · {title}" if label else title, fontsize=11)
    from explain.regions import region_summary

    fig.text(0.5, 0.008, f"query {region_summary(query_map).describe()} · gallery "
             f"{region_summary(gallery_map).describe()}", ha="center", va="bottom", fontsize=7)
    return figure_png(fig, path)
