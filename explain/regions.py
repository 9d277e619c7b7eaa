"""Facial region masks in aligned-face coordinates, built from the five landmarks.

The five points are those of the ArcFace template (``encoder.align``): the two
eye centres, the nose tip and the two mouth corners, in the order of
``ARCFACE_TEMPLATE_112``. Every region is drawn in a face frame whose x axis
runs along the eye line and whose unit is the inter-ocular distance ``d``, so
the masks follow the face when it is rolled, scaled or moved (the synthetic
phenotype generator transforms landmarks and asks for the masks again).

Proportions (in units of ``d``; SFace/ArcFace crops have ``d`` ~ 35 px):

- eye: ellipse around each eye centre, half-axes 0.32 (along the eye line) x 0.2;
- nose: polygon from the bridge (30 % of the way from the eye line to the tip)
  to the alae (tip +- 0.32 across, 0.12 below the tip);
- mouth: ellipse through both corners, half-axes 0.58 x corner distance and 0.3 x it;
- philtrum: the band between the alae and the upper lip, 0.3 wide;
- chin: ellipse centred 0.55 below the mouth, half-axes 0.6 x 0.35;
- face: ellipse from 0.95 above the eye line to 0.8 below the mouth, half-width 1.05;
- background: everything outside ``face``;
- brows: band 0.22-0.55 above the eye line, 0.65 either side of the eye midpoint
  outwards to 0.85, inside ``face``;
- nasal_bridge: the nasal root between the eyes, 0.25 either side of the midline,
  from the brows' lower edge (0.22 above the eye line) down to where ``nose`` starts,
  outside the eyes (a top match's "differs" mass often peaks here: the cells between
  the eyes see both);
- forehead: ``face`` above the brows (more than 0.55 above the eye line);
- cheeks: ``face`` between the eye line (0.25 below it) and the mouth line, outside
  the eyes, nose, philtrum and mouth, more than 0.3 from the face's midline.

A region summary (``region_summary``) counts each pixel once, in the first of its
regions in ``SUMMARY_REGIONS`` order (eyes, brows, nasal_bridge, nose, mouth, chin,
cheeks, forehead), so the shares of a map's mass add up to at most 1. Summaries
print names with spaces ("nasal bridge").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import cv2
import numpy as np

REGION_NAMES: tuple[str, ...] = (
    "left_eye",
    "right_eye",
    "eyes",
    "nose",
    "mouth",
    "philtrum",
    "chin",
    "face",
    "background",
    "brows",
    "nasal_bridge",
    "forehead",
    "cheeks",
)
# The regions the evaluation protocols report (the eyes, nose, mouth, background).
EVALUATION_REGIONS: tuple[str, ...] = ("eyes", "nose", "mouth", "background")
# The regions a match's summary names ("differs most: eyes 48 %, mouth 21 %"); disjoint.
SUMMARY_REGIONS: tuple[str, ...] = ("eyes", "brows", "nasal_bridge", "nose", "mouth", "chin",
                                    "cheeks", "forehead")
MIN_MASS_SHARE = 0.05  # a sign with less of the map's absolute mass "differs nowhere"


def _arcface_template() -> np.ndarray:
    from encoder.align import ARCFACE_TEMPLATE_112

    return np.asarray(ARCFACE_TEMPLATE_112, dtype=np.float64)


@dataclass(frozen=True)
class RegionMasks:
    """Boolean masks (H, W) of facial regions in aligned-face coordinates."""

    size: tuple[int, int]
    masks: dict[str, np.ndarray] = field(repr=False)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.masks[name]
        except KeyError:
            raise KeyError(f"unknown region {name!r}; known: {', '.join(self.masks)}") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.masks)

    def stack(self, names: tuple[str, ...] = EVALUATION_REGIONS) -> np.ndarray:
        """(R, H, W) bool, in the order of ``names``."""
        return np.stack([self[n] for n in names])


def ellipse_mask(
    size: tuple[int, int], centre: np.ndarray, half_axes: tuple[float, float], angle_rad: float
) -> np.ndarray:
    """(H, W) bool: pixel centres inside a rotated ellipse (pixel (x, y) sits at x, y)."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xs - centre[0], ys - centre[1]
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    a, b = half_axes
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def polygon_mask(size: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """(H, W) bool: the filled polygon through ``points`` (P, 2) in (x, y) pixels."""
    canvas = np.zeros(size, dtype=np.uint8)
    # Sub-pixel vertices: cv2 draws with 4 fractional bits when shift=4.
    pts = np.round(np.asarray(points, dtype=np.float64) * 16).astype(np.int32)
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def region_masks(
    landmarks: np.ndarray | None = None,
    size: tuple[int, int] = (112, 112),
    crop_size: tuple[int, int] | None = None,
) -> RegionMasks:
    """Masks of the facial regions for five aligned landmarks.

    Args:
        landmarks: (5, 2) (x, y) in the aligned crop (``Alignment.landmarks_crop``);
            default the ArcFace 112x112 template itself.
        size: (H, W) of the masks, e.g. (112, 112) or a feature grid (7, 7).
        crop_size: (H, W) of the crop the landmarks live in; default ``size``
            (or 112x112 for the template). Landmarks are rescaled to ``size``.
    Returns:
        RegionMasks with the names of ``REGION_NAMES``.
    """
    if landmarks is None:
        pts = _arcface_template()
        crop_size = crop_size or (112, 112)
    else:
        pts = np.asarray(landmarks, dtype=np.float64)
        crop_size = crop_size or size
    if pts.shape != (5, 2):
        raise ValueError(f"expected five (x, y) landmarks, got shape {pts.shape}")
    h, w = size
    scale = np.array([w / crop_size[1], h / crop_size[0]])
    # Pixel centres: cv2's warp puts pixel i at coordinate i; rescaling keeps centres aligned.
    pts = (pts + 0.5) * scale - 0.5

    left_eye, right_eye, nose_tip, mouth_l, mouth_r = pts
    eye_axis = right_eye - left_eye
    d = float(np.linalg.norm(eye_axis))
    if d <= 0:
        raise ValueError("the two eye landmarks coincide")
    ex = eye_axis / d
    ey = np.array([-ex[1], ex[0]])  # perpendicular, pointing down the face
    angle = float(np.arctan2(ex[1], ex[0]))
    eye_mid = (left_eye + right_eye) / 2
    mouth_mid = (mouth_l + mouth_r) / 2
    mouth_w = float(np.linalg.norm(mouth_r - mouth_l))

    def frame(origin: np.ndarray, u: float, v: float) -> np.ndarray:
        return origin + u * d * ex + v * d * ey

    masks: dict[str, np.ndarray] = {}
    masks["left_eye"] = ellipse_mask(size, left_eye, (0.32 * d, 0.2 * d), angle)
    masks["right_eye"] = ellipse_mask(size, right_eye, (0.32 * d, 0.2 * d), angle)
    masks["eyes"] = masks["left_eye"] | masks["right_eye"]

    nose_depth = float(np.dot(nose_tip - eye_mid, ey)) / d
    bridge = frame(eye_mid, 0.0, 0.3 * nose_depth)
    nose_poly = np.stack(
        [
            frame(bridge, -0.1, 0.0),
            frame(bridge, 0.1, 0.0),
            frame(nose_tip, 0.32, 0.0),
            frame(nose_tip, 0.25, 0.12),
            frame(nose_tip, -0.25, 0.12),
            frame(nose_tip, -0.32, 0.0),
        ]
    )
    masks["nose"] = polygon_mask(size, nose_poly)

    masks["mouth"] = ellipse_mask(
        size, mouth_mid, (0.58 * max(mouth_w, 1e-6), 0.3 * max(mouth_w, 1e-6)), angle
    )
    upper_lip = float(np.dot(mouth_mid - nose_tip, ey)) / d - 0.3 * mouth_w / d
    philtrum_poly = np.stack(
        [
            frame(nose_tip, -0.15, 0.12),
            frame(nose_tip, 0.15, 0.12),
            frame(nose_tip, 0.15, max(upper_lip, 0.13)),
            frame(nose_tip, -0.15, max(upper_lip, 0.13)),
        ]
    )
    masks["philtrum"] = polygon_mask(size, philtrum_poly) & ~masks["mouth"]
    masks["chin"] = ellipse_mask(size, frame(mouth_mid, 0.0, 0.55), (0.6 * d, 0.35 * d), angle)

    top = frame(eye_mid, 0.0, -0.95)
    bottom = frame(mouth_mid, 0.0, 0.8)
    face_centre = (top + bottom) / 2
    half_height = float(np.linalg.norm(bottom - top)) / 2
    masks["face"] = ellipse_mask(size, face_centre, (1.05 * d, half_height), angle)
    masks["background"] = ~masks["face"]

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    across = ((xs - eye_mid[0]) * ex[0] + (ys - eye_mid[1]) * ex[1]) / d  # along the eye line
    down = ((xs - eye_mid[0]) * ey[0] + (ys - eye_mid[1]) * ey[1]) / d  # below the eye line
    mouth_down = float(np.dot(mouth_mid - eye_mid, ey)) / d
    face = masks["face"]
    masks["brows"] = face & (down >= -0.55) & (down < -0.22) & (np.abs(across) <= 0.85) \
        & ~masks["eyes"]
    masks["nasal_bridge"] = face & (down >= -0.22) & (down < 0.3 * nose_depth) \
        & (np.abs(across) <= 0.25) & ~masks["eyes"]
    masks["forehead"] = face & (down < -0.55)
    masks["cheeks"] = face & (down >= 0.25) & (down <= mouth_down) & (np.abs(across) > 0.3) \
        & ~(masks["eyes"] | masks["nose"] | masks["philtrum"] | masks["mouth"])
    return RegionMasks(size=(h, w), masks=masks)


@dataclass(frozen=True)
class RegionSummary:
    """Where a signed map's mass lies: per region (``regions``), the share of the map's
    positive ("pulls together") and of its negative ("differs") mass, each in 0..1 of the
    whole map's; the rest falls outside the named regions."""

    regions: tuple[str, ...]
    positive: tuple[float, ...]
    negative: tuple[float, ...]
    positive_mass: float
    negative_mass: float

    def ranked(self, sign: str = "negative", *, top: int = 2, min_share: float = 0.05
               ) -> tuple[tuple[str, float], ...]:
        """The ``top`` regions by share of the ``sign`` mass, those of at least ``min_share``;
        none when that mass is under ``MIN_MASS_SHARE`` of the map's absolute mass (100 % of
        almost nothing is not worth a word)."""
        mass = self.negative_mass if sign == "negative" else self.positive_mass
        if mass < MIN_MASS_SHARE * (self.positive_mass + self.negative_mass):
            return ()
        shares = self.negative if sign == "negative" else self.positive
        order = sorted(zip(self.regions, shares, strict=True), key=lambda r: -r[1])
        return tuple((name, share) for name, share in order[:top] if share >= min_share)

    def to_json(self) -> dict[str, dict[str, float]]:
        """``{"eyes": {"positive": 0.1, "negative": 0.48}, ...}`` (the CLI's ``"regions"``)."""
        return {r: {"positive": p, "negative": n}
                for r, p, n in zip(self.regions, self.positive, self.negative, strict=True)}

    def describe(self, sign: str = "negative", *, top: int = 2) -> str:
        """``"differs most: eyes 48 %, mouth 21 %"`` (``"alike most: ..."`` for positive)."""
        head = "differs most" if sign == "negative" else "alike most"
        ranked = self.ranked(sign, top=top)
        if not ranked:
            return f"{head}: nowhere in particular"
        return f"{head}: " + ", ".join(f"{n.replace('_', ' ')} {round(100 * s)} %"
                                       for n, s in ranked)


def region_summary(aligned_map: np.ndarray, regions: RegionMasks | None = None,
                   names: tuple[str, ...] = SUMMARY_REGIONS) -> RegionSummary:
    """Shares of a signed map's positive and negative mass per region.

    Args:
        aligned_map: (H, W) signed map in the aligned-crop frame (any size: it is resized
            bilinearly to the masks' size when they differ).
        regions: masks in that frame; default the ArcFace template's at (H, W).
        names: which regions to report (default ``SUMMARY_REGIONS``).
    """
    m = np.asarray(aligned_map, dtype=np.float64)
    if regions is None:
        regions = template_regions(m.shape)
    if m.shape != regions.size:
        m = cv2.resize(m.astype(np.float32), (regions.size[1], regions.size[0]),
                       interpolation=cv2.INTER_LINEAR).astype(np.float64)
    pos, neg = np.maximum(m, 0.0), np.maximum(-m, 0.0)
    pos_total, neg_total = float(pos.sum()), float(neg.sum())
    stack = first_region_stack(regions, names)
    pos_share = tuple(float(pos[r].sum() / pos_total) if pos_total > 0 else 0.0 for r in stack)
    neg_share = tuple(float(neg[r].sum() / neg_total) if neg_total > 0 else 0.0 for r in stack)
    return RegionSummary(tuple(names), pos_share, neg_share, pos_total, neg_total)


def first_region_stack(regions: RegionMasks, names: tuple[str, ...]) -> np.ndarray:
    """(R, H, W) bool masks of ``names``, disjoint: a pixel counts in the first that holds it."""
    stack = regions.stack(names)
    stack &= ~(np.cumsum(stack, axis=0) - stack).astype(bool)
    return stack


@functools.lru_cache(maxsize=8)
def template_regions(size: tuple[int, int] = (112, 112)) -> RegionMasks:
    """Region masks of the ArcFace template at ``size`` (aligned crops are warped onto it)."""
    return region_masks(None, size=(int(size[0]), int(size[1])), crop_size=(112, 112))
