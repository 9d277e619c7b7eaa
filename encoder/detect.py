"""Face detection with facenet-pytorch's MTCNN (weights ship inside its wheel).

Detection runs on a copy downscaled to a longest side of 640 pixels (as GM-Arc
does; MTCNN's cost grows with the pixel count) and the boxes and landmarks are
mapped back to the full-resolution photo, where the alignment warp samples.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from encoder._torchvision_compat import ensure_torchvision

__all__ = ["DEFAULT_DETECT_SIDE", "Detection", "DetectionResult", "FaceDetector"]

DEFAULT_DETECT_SIDE = 640


@dataclass(frozen=True, eq=False)
class Detection:
    """One face in photo coordinates.

    box: (4,) float64 x1, y1, x2, y2. landmarks: (5, 2) float64 (x, y): eye on
    the image's left, eye on the right, nose, mouth left, mouth right.
    score: MTCNN's final-stage face probability in [0, 1].
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """Every face found in one photo, most confident first.

    image_size: (H, W) of the photo. detect_scale: factor by which the photo
    was downscaled for detection (1.0 when it was not).
    """

    detections: tuple[Detection, ...]
    image_size: tuple[int, int]
    detect_scale: float

    @property
    def count(self) -> int:
        return len(self.detections)

    @property
    def best(self) -> Detection | None:
        return self.detections[0] if self.detections else None

    @property
    def boxes(self) -> np.ndarray:
        """(n, 4) float64 boxes in photo coordinates, most confident first."""
        if not self.detections:
            return np.zeros((0, 4))
        return np.stack([d.box for d in self.detections])


class FaceDetector:
    """MTCNN on the CPU (or ``device``), shared safely between threads.

    ``min_face_size`` is in pixels of the downscaled detection image;
    ``thresholds`` are MTCNN's three stage thresholds; ``min_score`` drops
    final detections below it (MTCNN scores real faces above 0.98 on the
    bundled photos; its 0.7 stage threshold alone lets small false faces in
    the background through); ``detect_side`` is the longest side the photo is
    downscaled to before detection (None: never).
    """

    def __init__(
        self,
        *,
        device: str | torch.device = "cpu",
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        min_score: float = 0.9,
        detect_side: int | None = DEFAULT_DETECT_SIDE,
    ) -> None:
        ensure_torchvision()
        from facenet_pytorch import MTCNN

        self.device = torch.device(device)
        self.detect_side = detect_side
        self.min_face_size = min_face_size
        self.min_score = min_score
        self._mtcnn = MTCNN(
            min_face_size=min_face_size,
            thresholds=list(thresholds),
            keep_all=True,
            select_largest=False,
            post_process=False,
            device=self.device,
        ).eval()
        # MTCNN's R/O-net stages max-pool hundreds of small crops at once; torch's CPU
        # max_pool2d is several times faster on channels-last tensors (same results to 1e-4 px).
        self._mtcnn.to(memory_format=torch.channels_last)
        # One lock: MTCNN already uses every intra-op thread for one image.
        self._lock = threading.Lock()

    def _downscale(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = rgb.shape[:2]
        if self.detect_side is None or max(h, w) <= self.detect_side:
            return rgb, 1.0
        scale = self.detect_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        # The realised scale per axis differs from `scale` by rounding; use the x one (<0.2%).
        return small, size[0] / w

    def detect(self, rgb: np.ndarray) -> DetectionResult:
        """(H, W, 3) uint8 RGB photo -> every face, most confident first (possibly none)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        h, w = rgb.shape[:2]
        small, scale = self._downscale(rgb)
        sy = small.shape[0] / h
        if min(small.shape[:2]) < self.min_face_size:
            # MTCNN's image pyramid would be empty (and facenet-pytorch fails on that)
            return DetectionResult((), (h, w), scale)
        with self._lock, torch.inference_mode():
            boxes, probs, points = self._mtcnn.detect(np.ascontiguousarray(small), landmarks=True)
        if boxes is None or len(boxes) == 0:
            return DetectionResult((), (h, w), scale)
        factors = np.array([scale, sy])
        detections = []
        for box, prob, pts in zip(boxes, probs, points, strict=True):
            if float(prob) < self.min_score:
                continue
            box = np.asarray(box, dtype=np.float64).reshape(2, 2)
            pts = np.asarray(pts, dtype=np.float64).reshape(5, 2)
            # Pixel centres: (x + 0.5) / s - 0.5 undoes cv2.resize's sampling grid.
            full_box = ((box + 0.5) / factors - 0.5).reshape(4)
            full_pts = (pts + 0.5) / factors - 0.5
            detections.append(Detection(full_box, full_pts, float(prob)))
        detections.sort(key=lambda d: -d.score)
        return DetectionResult(tuple(detections), (h, w), scale)
