"""Metrics for attribution maps, on plain numpy arrays.

Nothing here knows a model: perturbation curves take a ``score_fn`` that maps a
batch of images to scores, and localisation takes maps and boolean masks
(GestaltMatcher matching accuracy lives in ``gallery.accuracy``). The protocol runners
that bind these to the encoder and the explain family live in
``explain.evaluation.common``.

Conventions: attribution maps are (h, w) float, signed (positive = pulls the
pair together). Images are (H, W, 3) uint8 or float RGB in aligned-face
coordinates. Fractions of perturbed pixels run from 0 to 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np


class EvaluationError(ValueError):
    """An evaluation protocol cannot run on the data given."""


# --------------------------------------------------------------------------- maps


def upsample_map(attribution: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W) float32 by bilinear interpolation (identity when sizes match)."""
    a = np.asarray(attribution, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"attribution map must be (h, w), got shape {a.shape}")
    if a.shape == tuple(size):
        return a
    return cv2.resize(a, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def threshold_map(attribution: np.ndarray, k: float = 1.0) -> np.ndarray:
    """(h, w) bool: cells above ``mean + k * std`` of the signed map that are also positive
    (a cell that pushes the other way is never "attributed", whatever the threshold)."""
    a = np.asarray(attribution, dtype=np.float64)
    return a > max(a.mean() + k * a.std(), 0.0)


# ---------------------------------------------------------------- localisation


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of one shape (0.0 when both are empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def iou_star(attribution: np.ndarray, mask: np.ndarray, k: float = 1.0) -> float:
    """Intensity-weighted IOU of the thresholded map against a region mask.

    The map is thresholded at ``mean + k * std`` as for IOU, and the cells that
    survive keep their intensity ``w = a / max(a)`` in [0, 1] (others 0). Then
    ``IOU* = sum(min(w, M)) / sum(max(w, M))`` (the weighted Jaccard index), so
    strongly attributed cells inside the region count more than faint ones, and
    a map equal to the binary mask scores 1 (IOU* reduces to IOU on binary maps).

    Args:
        attribution: (h, w) signed map, already at the mask's resolution.
        mask: (h, w) bool region.
    """
    a = np.asarray(attribution, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if a.shape != m.shape:
        raise ValueError(f"map {a.shape} and mask {m.shape} differ; upsample the map first")
    kept = threshold_map(a, k)
    peak = a[kept].max() if kept.any() else 0.0
    if peak <= 0:
        return 0.0
    w = np.where(kept, np.clip(a / peak, 0.0, 1.0), 0.0)
    mf = m.astype(np.float64)
    union = np.maximum(w, mf).sum()
    return float(np.minimum(w, mf).sum() / union) if union else 0.0


def energy_share(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the positive attribution mass that falls inside ``mask``."""
    pos = np.clip(np.asarray(attribution, dtype=np.float64), 0, None)
    total = pos.sum()
    return float(pos[np.asarray(mask, dtype=bool)].sum() / total) if total > 0 else 0.0


def pointing_game(attribution: np.ndarray, mask: np.ndarray, tolerance_px: int = 0) -> bool:
    """True when the map's maximum lies in ``mask`` (dilated by ``tolerance_px``)."""
    a = np.asarray(attribution, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if tolerance_px > 0:
        kernel = np.ones((2 * tolerance_px + 1, 2 * tolerance_px + 1), np.uint8)
        m = cv2.dilate(m.astype(np.uint8), kernel).astype(bool)
    y, x = np.unravel_index(int(np.argmax(a)), a.shape)
    return bool(m[y, x])


@dataclass(frozen=True)
class RegionScore:
    """Localisation of one map against one region."""

    region: str
    iou: float
    iou_star: float
    energy: float
    pointing: bool


def localisation_scores(
    attribution: np.ndarray, masks: dict[str, np.ndarray], k: float = 1.0
) -> list[RegionScore]:
    """IOU, IOU*, positive-energy share and pointing game of one map for each region.

    The map is upsampled bilinearly to the masks' resolution first.
    """
    scores = []
    for name, mask in masks.items():
        a = upsample_map(attribution, mask.shape)
        scores.append(
            RegionScore(
                region=name,
                iou=iou(threshold_map(a, k), mask),
                iou_star=iou_star(a, mask, k),
                energy=energy_share(a, mask),
                pointing=pointing_game(a, mask),
            )
        )
    return scores


# ------------------------------------------------------------ perturbation curves


def blur_baseline(image: np.ndarray, sigma: float = 8.0) -> np.ndarray:
    """(H, W, 3) Gaussian-blurred copy: removes detail but keeps colour and layout."""
    img = np.asarray(image, dtype=np.float32)
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def mean_baseline(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) image filled with its per-channel mean colour."""
    img = np.asarray(image, dtype=np.float32)
    return np.broadcast_to(img.mean(axis=(0, 1), keepdims=True), img.shape).copy()


BASELINES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "blur": blur_baseline,
    "mean": mean_baseline,
}


def pixel_order(
    attribution: np.ndarray,
    size: tuple[int, int],
    side: str = "positive",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(H*W,) flat pixel indices, most attributed first.

    ``side="positive"`` orders by the signed value, largest first (the pixels
    that make the faces similar); ``"negative"`` orders by the signed value,
    smallest first (the pixels that make them differ); ``"random"`` is a
    random permutation (``rng`` required, or a fixed seed 0). The map is
    upsampled to ``size`` first; ties are broken at random so that coarse maps
    are not ordered by raster position.
    """
    h, w = size
    if side == "random":
        rng = rng or np.random.default_rng(0)
        return rng.permutation(h * w)
    a = upsample_map(attribution, size).reshape(-1).astype(np.float64)
    if side == "negative":
        a = -a
    elif side != "positive":
        raise ValueError(f"side must be positive, negative or random, not {side!r}")
    tie_break = (rng or np.random.default_rng(0)).random(a.size)
    return np.lexsort((tie_break, -a))


@dataclass(frozen=True)
class Curve:
    """One perturbation curve: score after perturbing a fraction of the pixels."""

    kind: str  # "deletion" or "insertion"
    fractions: np.ndarray  # (S+1,) from 0 to 1
    scores: np.ndarray  # (S+1,)

    @property
    def auc(self) -> float:
        return auc(self.fractions, self.scores)

    @property
    def mean_score(self) -> float:
        """AUC divided by the fraction range: comparable between truncated curves."""
        span = float(self.fractions[-1] - self.fractions[0])
        return self.auc / span if span > 0 else float(self.scores[0])


def auc(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under y(x)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def perturbation_images(
    image: np.ndarray,
    baseline: np.ndarray,
    order: np.ndarray,
    steps: int = 16,
    kind: str = "deletion",
    max_fraction: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The images of one curve: (S+1, H, W, 3) float32 and their fractions (S+1,),
    from 0 to ``max_fraction`` of the pixels.

    Deletion replaces the first ``n`` pixels of ``order`` by the baseline;
    insertion starts from the baseline and restores them from the image.
    """
    img = np.asarray(image, dtype=np.float32)
    base = np.asarray(baseline, dtype=np.float32)
    if img.shape != base.shape or img.ndim != 3:
        raise ValueError(f"image {img.shape} and baseline {base.shape} must both be (H, W, 3)")
    h, w = img.shape[:2]
    n_pixels = h * w
    if order.shape != (n_pixels,):
        raise ValueError(f"order must list all {n_pixels} pixels")
    if not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    counts = np.round(np.linspace(0, max_fraction * n_pixels, steps + 1)).astype(int)
    rank = np.empty(n_pixels, dtype=np.int64)
    rank[order] = np.arange(n_pixels)
    rank = rank.reshape(h, w)
    src, dst = (img, base) if kind == "deletion" else (base, img)
    if kind not in ("deletion", "insertion"):
        raise ValueError(f"kind must be deletion or insertion, not {kind!r}")
    out = np.empty((steps + 1, h, w, 3), dtype=np.float32)
    for i, n in enumerate(counts):
        changed = (rank < n)[..., None]
        out[i] = np.where(changed, dst, src)
    return out, counts / n_pixels


def perturbation_curve(
    score_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    baseline: np.ndarray,
    order: np.ndarray,
    steps: int = 16,
    kind: str = "deletion",
    max_fraction: float = 1.0,
) -> Curve:
    """Score the images of one deletion or insertion curve.

    Args:
        score_fn: (N, H, W, 3) float32 pixels in 0..255 -> (N,) scores.
    """
    images, fractions = perturbation_images(image, baseline, order, steps, kind, max_fraction)
    scores = np.asarray(score_fn(images), dtype=np.float64).reshape(-1)
    if scores.shape != fractions.shape:
        raise ValueError(f"score_fn returned {scores.shape}, expected {fractions.shape}")
    return Curve(kind=kind, fractions=fractions, scores=scores)


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """Pointwise mean of curves that share fractions (e.g. several random orders)."""
    if not curves:
        raise ValueError("no curves to average")
    return Curve(
        kind=curves[0].kind,
        fractions=curves[0].fractions,
        scores=np.mean([c.scores for c in curves], axis=0),
    )


# ------------------------------------------------------------------ map agreement


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps of one shape (0.0 when one is constant)."""
    from scipy.stats import spearmanr

    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"map shapes differ: {np.shape(a)} vs {np.shape(b)}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 1.0 if np.array_equal(x, y) else 0.0
    return float(spearmanr(x, y).statistic)


def map_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two signed maps, each scaled to [-1, 1] by its largest magnitude.

    Small maps (e.g. 7x7) use the largest odd window that fits.
    """
    from skimage.metrics import structural_similarity

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"map shapes differ: {x.shape} vs {y.shape}")
    x = x / (np.abs(x).max() or 1.0)
    y = y / (np.abs(y).max() or 1.0)
    win = min(7, min(x.shape) - (1 - min(x.shape) % 2))
    return float(structural_similarity(x, y, data_range=2.0, win_size=max(win, 3)))
