"""Face detectors by name, in the manner of ``encoder.registry``.

Each detector module under ``encoder/detectors/`` registers a builder with
:func:`register_detector`; the builder takes keyword options and returns a
:class:`FaceDetector`. A detector declares its :class:`DetectorSpec`: the
input size policy (the photo is downscaled to a longest side of
``detect_side`` and, for fixed-stride networks, padded to a multiple of
``stride``) and the order in which the network emits the 5 landmarks. The
base class does the shared work once: input checks, downscaling, mapping boxes
and landmarks back to full resolution (where the alignment warp samples),
reordering landmarks into :data:`LANDMARK_ORDER`, the score threshold and
the sort.

    detector = create_detector("yunet")        # a fresh instance
    detector = shared_detector("mtcnn")        # one per process, for serving
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from encoder.errors import UnknownDetector
from encoder.named import Registry

__all__ = [
    "DEFAULT_DETECTOR",
    "DEFAULT_DETECT_SIDE",
    "LANDMARK_ORDER",
    "Detection",
    "DetectionResult",
    "DetectorSpec",
    "FaceDetector",
    "RawDetections",
    "create_detector",
    "detector_spec",
    "list_detectors",
    "register_detector",
    "shared_detector",
]

DEFAULT_DETECTOR = "yunet"
DEFAULT_DETECT_SIDE = 640

# The order of ``Detection.landmarks`` everywhere (``encoder.align``'s templates):
# image-left / image-right as seen in the photo, not the subject's left / right.
LANDMARK_ORDER: tuple[str, ...] = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True, eq=False)
class Detection:
    """One face in photo coordinates.

    box: (4,) float64 x1, y1, x2, y2. landmarks: (5, 2) float64 (x, y) in
    :data:`LANDMARK_ORDER`. score: the detector's face confidence in [0, 1]
    (scales differ between detectors: compare scores of one detector only).
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """Every face found in one photo, most confident first.

    image_size: (H, W) of the photo. detect_scale: factor by which the photo
    was downscaled for detection (1.0 when it was not). detector: its name.
    """

    detections: tuple[Detection, ...]
    image_size: tuple[int, int]
    detect_scale: float
    detector: str = ""

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


@dataclass(frozen=True)
class DetectorSpec:
    """What a detector needs and gives, declared once by its module.

    detect_side: longest side the photo is downscaled to (None: never upscale
    or downscale). stride: the network input is padded (bottom, right) to a
    multiple of it (1: no padding). landmark_order: the network's 5 points,
    named from :data:`LANDMARK_ORDER`, in the order it emits them.
    min_face_size: smallest face (pixels of the detection image) it finds.
    """

    name: str
    detect_side: int | None
    stride: int
    landmark_order: tuple[str, ...]
    min_face_size: int
    description: str = ""

    def __post_init__(self) -> None:
        if sorted(self.landmark_order) != sorted(LANDMARK_ORDER):
            raise ValueError(
                f"detector {self.name}: landmark_order must name each of {LANDMARK_ORDER} once, "
                f"got {self.landmark_order}"
            )

    @property
    def to_canonical(self) -> list[int]:
        """Indices that reorder the network's (5, 2) landmarks into LANDMARK_ORDER."""
        return [self.landmark_order.index(name) for name in LANDMARK_ORDER]


@dataclass(frozen=True, eq=False)
class RawDetections:
    """A network's output in detection-image pixels: boxes (n, 4) x1, y1, x2, y2;
    landmarks (n, 5, 2) in the spec's landmark order; scores (n,)."""

    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> RawDetections:
        return cls(np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros(0))


class FaceDetector(ABC):
    """Base of every detector: subclasses implement :meth:`_detect` on the downscaled image.

    ``detect_side`` overrides the spec's (None: detect at full resolution);
    ``min_score`` drops final detections below it. Subclasses must be safe to
    call from several threads at once.
    """

    spec: DetectorSpec

    def __init__(self, *, detect_side: int | None | str = "spec", min_score: float = 0.5) -> None:
        self.detect_side = self.spec.detect_side if detect_side == "spec" else detect_side
        self.min_score = float(min_score)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def min_face_size(self) -> int:
        """Smallest face, in pixels of the detection image, that this detector finds."""
        return self.spec.min_face_size

    @abstractmethod
    def _detect(self, rgb: np.ndarray) -> RawDetections:
        """(h, w, 3) uint8 RGB detection image (already downscaled) -> raw detections."""

    def _downscale(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = rgb.shape[:2]
        if self.detect_side is None or max(h, w) <= self.detect_side:
            return rgb, 1.0
        scale = self.detect_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        # The realised scale per axis differs from `scale` by rounding; report the x one (<0.2%).
        return small, size[0] / w

    def detect(self, rgb: np.ndarray) -> DetectionResult:
        """(H, W, 3) uint8 RGB photo -> every face, most confident first (possibly none)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        h, w = rgb.shape[:2]
        small, scale = self._downscale(rgb)
        if min(small.shape[:2]) < self.min_face_size:
            return DetectionResult((), (h, w), scale, self.name)
        raw = self._detect(np.ascontiguousarray(small))
        factors = np.array([small.shape[1] / w, small.shape[0] / h])
        order = self.spec.to_canonical
        detections = []
        for box, pts, score in zip(raw.boxes, raw.landmarks, raw.scores, strict=True):
            if float(score) < self.min_score:
                continue
            box = np.asarray(box, dtype=np.float64).reshape(2, 2)
            pts = np.asarray(pts, dtype=np.float64).reshape(5, 2)[order]
            # Pixel centres: (x + 0.5) / s - 0.5 undoes cv2.resize's sampling grid.
            full_box = ((box + 0.5) / factors - 0.5).reshape(4)
            full_pts = (pts + 0.5) / factors - 0.5
            detections.append(Detection(full_box, full_pts, float(score)))
        detections.sort(key=lambda d: -d.score)
        return DetectionResult(tuple(detections), (h, w), scale, self.name)


# ---------------------------------------------------------------- the registry

Builder = Callable[..., FaceDetector]


@dataclass(frozen=True)
class DetectorEntry:
    name: str
    spec: DetectorSpec
    build: Builder


_REGISTRY: Registry[DetectorEntry] = Registry(
    "detector", ("encoder.detectors.mtcnn", "encoder.detectors.yunet"), UnknownDetector,
    label="face detector",
)


def register_detector(spec: DetectorSpec) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_detector(YUNET_SPEC)`` over ``def build(**options) -> FaceDetector``."""

    def decorate(build: Builder) -> Builder:
        _REGISTRY.add(spec.name, DetectorEntry(spec.name, spec, build))
        return build

    return decorate


def list_detectors() -> list[str]:
    """Names of every registered detector, sorted."""
    return _REGISTRY.names()


def detector_spec(name: str) -> DetectorSpec:
    """The static spec of ``name`` without building the detector."""
    return _REGISTRY.get(name).spec


def create_detector(name: str = DEFAULT_DETECTOR, **options: Any) -> FaceDetector:
    """A fresh detector; ``options`` go to its constructor (``detect_side``, ``min_score``, ...)."""
    return _REGISTRY.get(name).build(**options)


_shared: dict[str, FaceDetector] = {}
_shared_lock = threading.Lock()


def shared_detector(name: str = DEFAULT_DETECTOR) -> FaceDetector:
    """The process-wide detector ``name`` with its default options; built once, thread-safe."""
    entry = _REGISTRY.get(name)
    with _shared_lock:
        detector = _shared.get(entry.name)
        if detector is None:
            detector = entry.build()
            _shared[entry.name] = detector
        return detector
