"""5-point similarity alignment onto a canonical template, and its inverse.

The aligned crop is the common coordinate frame of PhenoLens: embeddings,
explanation maps and syndrome averages live there, and are warped back to the
original photo only for display (:func:`warp_to_photo`).

Landmark order everywhere (MTCNN's and insightface's): the eye on the image's
left, the eye on the image's right, the nose tip, the mouth corner on the
image's left, the mouth corner on the image's right; (x, y) pixel coordinates
with the origin at the centre of the top-left pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "TEMPLATES",
    "Alignment",
    "AlignmentTemplate",
    "align_face",
    "apply_affine",
    "get_template",
    "identity_alignment",
    "similarity_transform",
    "warp_to_crop",
    "warp_to_photo",
]

# insightface's arcface_dst: the 5-point template of ArcFace / GM-Arc 112x112 crops.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE_112.setflags(write=False)


@dataclass(frozen=True, eq=False)
class AlignmentTemplate:
    """Where the 5 landmarks go in a crop of ``size`` (H, W); ``points`` is (5, 2) (x, y)."""

    name: str
    size: tuple[int, int]
    points: np.ndarray


def _scaled_arcface(name: str, side: int) -> AlignmentTemplate:
    points = ARCFACE_TEMPLATE_112 * (side / 112.0)
    points.setflags(write=False)
    return AlignmentTemplate(name, (side, side), points)


# gm100gray: GestaltMatcher v1 crops (the encoder converts them to gray);
# facenet160: InceptionResnetV1 input size. Both are the ArcFace geometry, scaled.
TEMPLATES: dict[str, AlignmentTemplate] = {
    "arcface112": AlignmentTemplate("arcface112", (112, 112), ARCFACE_TEMPLATE_112),
    "gm100gray": _scaled_arcface("gm100gray", 100),
    "facenet160": _scaled_arcface("facenet160", 160),
}


def get_template(name: str) -> AlignmentTemplate:
    """The template called ``name``; ValueError listing the known names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown alignment template {name!r}; known: {', '.join(sorted(TEMPLATES))}"
        ) from None


@dataclass(frozen=True, eq=False)
class Alignment:
    """One face warped onto a template, with both directions of the warp.

    crop: (H, W, 3) uint8 RGB aligned face. photo_to_crop, crop_to_photo: (2, 3)
    float64 affine matrices (x' = M @ [x, y, 1]). landmarks_photo,
    landmarks_crop: (5, 2) float64. photo_size: (H, W) of the original photo.
    template: the name of the template in ``TEMPLATES``. Treat the arrays as
    read-only.
    """

    crop: np.ndarray
    photo_to_crop: np.ndarray
    crop_to_photo: np.ndarray
    landmarks_photo: np.ndarray
    landmarks_crop: np.ndarray
    photo_size: tuple[int, int]
    template: str

    @property
    def crop_size(self) -> tuple[int, int]:
        """(H, W) of the aligned crop."""
        return (int(self.crop.shape[0]), int(self.crop.shape[1]))

    @property
    def face_box_photo(self) -> np.ndarray:
        """(4,) x1, y1, x2, y2 bounding box of the crop's outline in photo coordinates (unclipped)."""
        corners = _crop_corners(self.crop_size)
        pts = apply_affine(self.crop_to_photo, corners)
        return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])

    def template_error_px(self) -> float:
        """Mean distance (pixels) between the aligned landmarks and the template points."""
        target = get_template(self.template).points
        return float(np.linalg.norm(self.landmarks_crop - target, axis=1).mean())


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(2, 3) affine matrix applied to (N, 2) points -> (N, 2) float64."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    Umeyama (1991), without reflection (``skimage.transform.SimilarityTransform``).
    src, dst: (N, 2) with N >= 2. Returns the (2, 3) float64 matrix M with
    dst ~ M @ [src, 1]. Raises ValueError for degenerate input (all source points equal).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"src and dst must both be (N>=2, 2), got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks must be finite")
    if src.var(axis=0).sum() <= 1e-12:
        raise ValueError("landmarks are degenerate (all points coincide)")
    fitted = SimilarityTransform.from_estimate(src, dst)
    if not fitted:
        raise ValueError(f"landmarks are degenerate ({fitted})")
    return np.array(fitted.params[:2], dtype=np.float64)


_BORDERS = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE}


def align_face(
    rgb: np.ndarray,
    landmarks: np.ndarray,
    template: str = "arcface112",
    *,
    border: str = "constant",
) -> Alignment:
    """Warp the face with these landmarks onto ``template``.

    rgb: (H, W, 3) uint8 photo. landmarks: (5, 2) (x, y) in photo pixels.
    ``border`` is "constant" (black outside the photo, as insightface's
    ``norm_crop`` that GM-Arc trains on) or "replicate". Returns an
    :class:`Alignment` whose crop is (h, w, 3) uint8 with the template's size.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if border not in _BORDERS:
        raise ValueError(f"border must be one of {sorted(_BORDERS)}, got {border!r}")
    spec = get_template(template)
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (5, 2):
        raise ValueError(f"landmarks must be (5, 2), got {lm.shape}")
    photo_to_crop = similarity_transform(lm, spec.points)
    crop_to_photo = cv2.invertAffineTransform(photo_to_crop).astype(np.float64)
    h, w = spec.size
    crop = cv2.warpAffine(
        np.ascontiguousarray(rgb),
        photo_to_crop,
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=_BORDERS[border],
        borderValue=(0, 0, 0),
    )
    return Alignment(
        crop=crop,
        photo_to_crop=photo_to_crop,
        crop_to_photo=crop_to_photo,
        landmarks_photo=lm.copy(),
        landmarks_crop=apply_affine(photo_to_crop, lm),
        photo_size=(int(rgb.shape[0]), int(rgb.shape[1])),
        template=template,
    )


def identity_alignment(crop: np.ndarray, template: str = "arcface112") -> Alignment:
    """An already-aligned (h, w, 3) uint8 crop as an Alignment: the photo is the crop.

    The landmarks are taken to be the template points. The caller checks the size.
    """
    spec = get_template(template)
    eye = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return Alignment(
        crop=crop,
        photo_to_crop=eye,
        crop_to_photo=eye.copy(),
        landmarks_photo=spec.points.copy(),
        landmarks_crop=spec.points.copy(),
        photo_size=(int(crop.shape[0]), int(crop.shape[1])),
        template=template,
    )


def _crop_corners(size: tuple[int, int]) -> np.ndarray:
    h, w = size
    return np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])


def _resize_to_crop(aligned_map: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    amap = np.asarray(aligned_map, dtype=np.float32)
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"aligned_map must be a non-empty (h, w) array, got {amap.shape}")
    if not np.isfinite(amap).all():
        raise ValueError("aligned_map contains NaN or infinite values")
    h, w = crop_size
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    return amap


def warp_to_photo(
    aligned_map: np.ndarray,
    alignment: Alignment,
    *,
    return_mask: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Draw a map defined on the aligned crop back onto the original photo.

    aligned_map: (h, w) float, any resolution (7x7 feature cells, the 112x112
    crop, ...); it is resized bilinearly to the crop size and warped with
    ``alignment.crop_to_photo``. Returns the (H, W) float32 photo map, 0 outside
    the face region (never NaN); with ``return_mask=True`` also the (H, W) bool
    mask of photo pixels that the crop covers.
    """
    amap = _resize_to_crop(aligned_map, alignment.crop_size)
    ph, pw = alignment.photo_size
    photo_map = np.zeros((ph, pw), dtype=np.float32)
    mask = np.zeros((ph, pw), dtype=bool)
    # Warp only the crop's bounding box: photos can be tens of megapixels.
    x1, y1, x2, y2 = alignment.face_box_photo
    bx1, by1 = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
    bx2, by2 = min(int(np.ceil(x2)) + 1, pw), min(int(np.ceil(y2)) + 1, ph)
    if bx2 > bx1 and by2 > by1:
        shift = np.array([[1.0, 0.0, -bx1], [0.0, 1.0, -by1]])
        m = shift @ np.vstack([alignment.crop_to_photo, [0.0, 0.0, 1.0]])
        size = (bx2 - bx1, by2 - by1)
        values = cv2.warpAffine(
            amap, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0
        )
        photo_map[by1:by2, bx1:bx2] = values
        if return_mask:
            ones = np.ones(alignment.crop_size, dtype=np.uint8)
            covered = cv2.warpAffine(
                ones,
                m,
                size,
                flags=cv2.INTER_NEAREST,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
            mask[by1:by2, bx1:bx2] = covered.astype(bool)
    if return_mask:
        return photo_map, mask
    return photo_map


def warp_to_crop(photo_map: np.ndarray, alignment: Alignment) -> np.ndarray:
    """The opposite of :func:`warp_to_photo`: (H, W) photo map -> (h, w) float32 crop map."""
    pmap = np.asarray(photo_map, dtype=np.float32)
    if pmap.shape != alignment.photo_size:
        raise ValueError(f"photo_map must be {alignment.photo_size}, got {pmap.shape}")
    h, w = alignment.crop_size
    return cv2.warpAffine(
        pmap,
        alignment.photo_to_crop,
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
