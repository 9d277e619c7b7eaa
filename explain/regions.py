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
- background: everything outside ``face``.
"""

from __future__ import annotations

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
)
# The regions the evaluation protocols report (the eyes, nose, mouth, background).
EVALUATION_REGIONS: tuple[str, ...] = ("eyes", "nose", "mouth", "background")


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
    return RegionMasks(size=(h, w), masks=masks)
