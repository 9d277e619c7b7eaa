"""How far two detectors agree on the same photo, in the frame that matters: the aligned crop.

Used by ``bench/bench_pipeline.py`` (to choose the default detector) and by
the tests (to bound the disagreement).
"""

from __future__ import annotations

import numpy as np

from encoder.align import apply_affine, get_template, similarity_transform
from encoder.detect import Detection, DetectionResult

__all__ = ["box_iou", "landmark_disagreement_px", "match_detections"]


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (4,) x1, y1, x2, y2 boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_detections(
    a: DetectionResult, b: DetectionResult, min_iou: float = 0.3
) -> list[tuple[Detection, Detection]]:
    """Pairs (face of ``a``, the same face in ``b``) by best box overlap, greedily, IoU >= min_iou.

    Faces that one detector found and the other did not are left out.
    """
    pairs = []
    free = list(b.detections)
    for det in a.detections:
        if not free:
            break
        overlaps = [box_iou(det.box, other.box) for other in free]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= min_iou:
            pairs.append((det, free.pop(best)))
    return pairs


def landmark_disagreement_px(
    reference: Detection, other: Detection, template: str = "arcface112"
) -> float:
    """Mean distance (pixels of the aligned crop) between the two detections' 5 landmarks,
    both mapped by the warp that aligns ``reference`` onto ``template``."""
    warp = similarity_transform(reference.landmarks, get_template(template).points)
    diff = apply_affine(warp, other.landmarks) - apply_affine(warp, reference.landmarks)
    return float(np.linalg.norm(diff, axis=1).mean())
