"""The face pipeline: image -> decoded RGB -> MTCNN landmarks -> aligned crop.

``FacePipeline().face(image)`` is what the CLI, the service and the tests call.
Several faces: the most confident is taken and the count and boxes reported.
Already-aligned crops (``aligned=True``) skip detection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from encoder.align import Alignment, align_face, get_template, identity_alignment
from encoder.detect import DetectionResult, FaceDetector
from encoder.errors import NoFaceFound, WrongImageSize
from encoder.image import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageSource, load_rgb

__all__ = ["Face", "FacePipeline"]


@dataclass(frozen=True, eq=False)
class Face:
    """One aligned face of a photo.

    alignment: the crop and both warps. score: the detector's confidence (1.0
    for a crop given as already aligned). face_count: faces found in the photo.
    boxes: (face_count, 4) float64 x1, y1, x2, y2 photo boxes, most confident
    first; the first is this face's.
    """

    alignment: Alignment
    score: float
    face_count: int
    boxes: np.ndarray

    @property
    def crop(self) -> np.ndarray:
        """(h, w, 3) uint8 RGB aligned crop."""
        return self.alignment.crop


class FacePipeline:
    """Decode, detect and align; thread-safe, the detector is built on first use.

    detector: a :class:`FaceDetector` (default: MTCNN on the CPU). template:
    the default alignment template (see ``encoder.align.TEMPLATES``).
    max_pixels, max_bytes: decoding limits (see ``encoder.image``).
    border: "constant" or "replicate" for warp pixels outside the photo.
    """

    def __init__(
        self,
        detector: FaceDetector | None = None,
        *,
        template: str = "arcface112",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        border: str = "constant",
    ) -> None:
        get_template(template)
        self.template = template
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.border = border
        self._detector = detector
        self._detector_lock = threading.Lock()

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            with self._detector_lock:
                if self._detector is None:
                    self._detector = FaceDetector()
        return self._detector

    def load(self, image: ImageSource) -> np.ndarray:
        """Any image source -> (H, W, 3) uint8 RGB under this pipeline's limits."""
        return load_rgb(image, max_pixels=self.max_pixels, max_bytes=self.max_bytes)

    def detect(self, image: ImageSource) -> tuple[np.ndarray, DetectionResult]:
        """(RGB photo (H, W, 3) uint8, every face found in it, most confident first)."""
        rgb = self.load(image)
        return rgb, self.detector.detect(rgb)

    def _no_face(self, result: DetectionResult) -> NoFaceFound:
        h, w = result.image_size
        smallest = int(np.ceil(self.detector.min_face_size / result.detect_scale))
        return NoFaceFound(
            f"no face found in the {w}x{h} image; send a photo in which the face is visible, "
            f"roughly frontal, and at least {smallest} pixels wide"
        )

    def face(
        self,
        image: ImageSource,
        *,
        aligned: bool = False,
        template: str | None = None,
    ) -> Face:
        """The most confident face of ``image``, aligned onto ``template``.

        image: bytes, path, PIL image or uint8 array (see ``encoder.image.load_rgb``).
        aligned=True: ``image`` is already an aligned crop of the template's size;
        detection is skipped and the alignment is the identity (WrongImageSize
        if the size differs). Raises NoFaceFound and the decoding errors.
        """
        template = template or self.template
        rgb = self.load(image)
        if aligned:
            th, tw = get_template(template).size
            h, w = rgb.shape[:2]
            if (h, w) != (th, tw):
                raise WrongImageSize(
                    f"an already-aligned crop for template {template} must be {tw}x{th} pixels, "
                    f"got {w}x{h}; send the original photo without the aligned flag to detect "
                    "and align the face"
                )
            box = np.array([[-0.5, -0.5, w - 0.5, h - 0.5]])
            return Face(identity_alignment(rgb, template), 1.0, 1, box)
        result = self.detector.detect(rgb)
        if result.best is None:
            raise self._no_face(result)
        best = result.best
        alignment = align_face(rgb, best.landmarks, template, border=self.border)
        return Face(alignment, best.score, result.count, result.boxes)

    def faces(self, image: ImageSource, *, template: str | None = None) -> tuple[Face, ...]:
        """Every face of ``image``, aligned, most confident first; NoFaceFound if none.

        Each Face's ``boxes`` lists all faces with its own box first.
        """
        template = template or self.template
        rgb = self.load(image)
        result = self.detector.detect(rgb)
        if result.best is None:
            raise self._no_face(result)
        out = []
        all_boxes = result.boxes
        for i, det in enumerate(result.detections):
            order = [i] + [j for j in range(result.count) if j != i]
            alignment = align_face(rgb, det.landmarks, template, border=self.border)
            out.append(Face(alignment, det.score, result.count, all_boxes[order]))
        return tuple(out)
