"""MTCNN from facenet-pytorch (weights ship inside its wheel), on torch.

Detection runs on a copy downscaled to a longest side of 640 pixels (as GM-Arc
does; MTCNN's cost grows with the pixel count). Its image pyramid needs no
padding. Scores are the final stage's face probability.
"""

from __future__ import annotations

import threading

import numpy as np

from encoder.detect import (
    DEFAULT_DETECT_SIDE,
    LANDMARK_ORDER,
    DetectorSpec,
    FaceDetector,
    RawDetections,
    register_detector,
)

MTCNN_SPEC = DetectorSpec(
    name="mtcnn",
    detect_side=DEFAULT_DETECT_SIDE,
    stride=1,
    landmark_order=LANDMARK_ORDER,
    min_face_size=20,
    description="facenet-pytorch MTCNN (P/R/O-net cascade on an image pyramid), torch",
)


class MTCNNDetector(FaceDetector):
    """MTCNN on the CPU (or ``device``), shared safely between threads.

    ``min_face_size`` is in pixels of the downscaled detection image;
    ``thresholds`` are MTCNN's three stage thresholds; ``min_score`` drops
    final detections below it (MTCNN scores real faces above 0.98 on the
    bundled photos; its 0.7 stage threshold alone lets small false faces in
    the background through).
    """

    spec = MTCNN_SPEC

    def __init__(
        self,
        *,
        device: str = "cpu",
        min_face_size: int = MTCNN_SPEC.min_face_size,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        min_score: float = 0.9,
        detect_side: int | None | str = "spec",
    ) -> None:
        super().__init__(detect_side=detect_side, min_score=min_score)
        import torch

        from encoder._torchvision_compat import ensure_torchvision

        ensure_torchvision()  # before facenet_pytorch imports torchvision
        from facenet_pytorch import MTCNN

        self._torch = torch
        self.device = torch.device(device)
        self._min_face_size = min_face_size
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

    @property
    def min_face_size(self) -> int:
        return self._min_face_size

    def _detect(self, rgb: np.ndarray) -> RawDetections:
        with self._lock, self._torch.inference_mode():
            boxes, probs, points = self._mtcnn.detect(rgb, landmarks=True)
        if boxes is None or len(boxes) == 0:
            return RawDetections.empty()
        return RawDetections(
            np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(points, dtype=np.float64).reshape(-1, 5, 2),
            np.asarray(probs, dtype=np.float64).reshape(-1),
        )


@register_detector(MTCNN_SPEC)
def build_mtcnn(**options: object) -> MTCNNDetector:
    return MTCNNDetector(**options)  # type: ignore[arg-type]
