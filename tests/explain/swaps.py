"""Region swaps on aligned crops and the negative-mass lift, shared by the what-differs tests."""

from __future__ import annotations

import cv2
import numpy as np

from explain.regions import region_masks


def chance_lift(amap: np.ndarray, region: np.ndarray) -> float:
    """Share of the negative mass inside ``region`` / the region's share of the crop (chance 1)."""
    negative = np.clip(-amap, 0, None)
    return float(negative[region].sum() / negative.sum() / region.mean())


def swapped_crop(faces, name: str, donor: str, region: str) -> tuple[np.ndarray, np.ndarray]:
    """``name``'s aligned crop with ``region`` (grown by 2 px) taken from ``donor``'s crop."""
    face = faces[name]
    mask = region_masks(face.alignment.landmarks_crop)[region]
    mask = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    swapped = face.crop.copy()
    swapped[mask] = faces[donor].crop[mask]
    return swapped, mask
