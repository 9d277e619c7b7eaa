"""The face pipeline: image -> decoded RGB -> detector landmarks -> aligned crop.

``FacePipeline().face(image)`` is what the CLI, the service and the tests call.
Several faces: the most confident is taken and the count and boxes reported.
Animated GIFs and multi-page TIFFs: the first frame with a face is used (up to
``max_frames`` are tried) and ``Face.frame`` says which. Already-aligned crops
(``aligned=True``) skip detection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from encoder.align import Alignment, align_face, get_template, identity_alignment
from encoder.detect import (
    DEFAULT_DETECTOR,
    DetectionResult,
    FaceDetector,
    detector_spec,
    shared_detector,
)
from encoder.errors import NoFaceFound, WrongImageSize
from encoder.image import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_PIXELS,
    ImageSource,
    iter_frames,
    load_rgb,
)

__all__ = ["Face", "FacePipeline"]


@dataclass(frozen=True, eq=False)
class Face:
    """One aligned face of a photo.

    alignment: the crop and both warps. score: the detector's confidence (1.0
    for a crop given as already aligned). face_count: faces found in the photo.
    boxes: (face_count, 4) float64 x1, y1, x2, y2 photo boxes, most confident
    first; the first is this face's. frame: 0-based frame (page) of an animated
    GIF or multi-page TIFF the face was found in (0 for still images).
    """

    alignment: Alignment
    score: float
    face_count: int
    boxes: np.ndarray
    frame: int = 0

    @property
    def crop(self) -> np.ndarray:
        """(h, w, 3) uint8 RGB aligned crop."""
        return self.alignment.crop


@dataclass(frozen=True, eq=False)
class _Found:
    """The frame detection settled on: the first with a face, else the first one."""

    rgb: np.ndarray
    result: DetectionResult
    frame: int
    tried: tuple[int, ...]
    frame_count: int
    format: str


class FacePipeline:
    """Decode, detect and align; thread-safe, the detector is built on first use.

    detector: a registered detector's name (``encoder.detect.list_detectors``;
    the process-wide instance is shared) or a :class:`FaceDetector`; default
    ``encoder.detect.DEFAULT_DETECTOR``. template: the default alignment
    template (see ``encoder.align.TEMPLATES``). max_pixels, max_bytes:
    decoding limits (see ``encoder.image``). max_frames: frames of an animated
    image searched for a face. border: "constant" or "replicate" for warp
    pixels outside the photo.
    """

    def __init__(
        self,
        detector: FaceDetector | str | None = None,
        *,
        template: str = "arcface112",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_frames: int = DEFAULT_MAX_FRAMES,
        border: str = "constant",
    ) -> None:
        get_template(template)
        self.template = template
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.max_frames = max_frames
        self.border = border
        if detector is None or isinstance(detector, str):
            self.detector_name = detector or DEFAULT_DETECTOR
            detector_spec(self.detector_name)  # UnknownDetector now, not on the first photo
            self._detector: FaceDetector | None = None
        else:
            self.detector_name = detector.name
            self._detector = detector
        self._detector_lock = threading.Lock()

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            with self._detector_lock:
                if self._detector is None:
                    self._detector = shared_detector(self.detector_name)
        return self._detector

    def load(self, image: ImageSource, frame: int = 0) -> np.ndarray:
        """Any image source -> (H, W, 3) uint8 RGB under this pipeline's limits.

        frame: 0-based frame of an animated image (``Face.frame`` of its face).
        """
        if frame == 0:
            return load_rgb(image, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        for decoded in iter_frames(
            image, max_pixels=self.max_pixels, max_bytes=self.max_bytes, max_frames=frame + 1
        ):
            if decoded.index == frame:
                return decoded.rgb
        raise ValueError(f"the image has no frame {frame} (0-based)")

    def _find(self, image: ImageSource) -> _Found:
        """Detect frame by frame; stop at the first frame with a face."""
        first: _Found | None = None
        tried: list[int] = []
        for frame in iter_frames(
            image, max_pixels=self.max_pixels, max_bytes=self.max_bytes, max_frames=self.max_frames
        ):
            result = self.detector.detect(frame.rgb)
            tried.append(frame.index)
            found = _Found(frame.rgb, result, frame.index, tuple(tried), frame.count, frame.format)
            if result.count:
                return found
            first = first or found
        assert first is not None  # iter_frames yields at least one frame or raises
        return _Found(
            first.rgb, first.result, first.frame, tuple(tried), first.frame_count, first.format
        )

    def detect(self, image: ImageSource) -> tuple[np.ndarray, DetectionResult]:
        """(RGB photo (H, W, 3) uint8, every face found in it, most confident first).

        For an animated image: the first frame with a face (else the first frame).
        """
        found = self._find(image)
        return found.rgb, found.result

    def _no_face(self, found: _Found) -> NoFaceFound:
        h, w = found.result.image_size
        smallest = int(np.ceil(self.detector.min_face_size / found.result.detect_scale))
        advice = (
            "send a photo in which the face is visible, roughly frontal, and at least "
            f"{smallest} pixels wide"
        )
        if found.frame_count == 1:
            return NoFaceFound(f"no face found in the {w}x{h} image; {advice}")
        tried = ", ".join(str(i) for i in found.tried)
        return NoFaceFound(
            f"no face found in the {found.frame_count}-frame {found.format} ({w}x{h}): tried "
            f"frames {tried} (0-based, the first {len(found.tried)}); {advice} in one of the "
            "first frames"
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
        return self.photo_face(image, aligned=aligned, template=template)[1]

    def photo_face(
        self,
        image: ImageSource,
        *,
        aligned: bool = False,
        template: str | None = None,
    ) -> tuple[np.ndarray, Face]:
        """(the decoded (H, W, 3) uint8 photo — the frame the face was found in —, its
        most confident face): one decode for callers that also draw on the photo."""
        template = template or self.template
        if aligned:
            rgb = self.load(image)
            th, tw = get_template(template).size
            h, w = rgb.shape[:2]
            if (h, w) != (th, tw):
                raise WrongImageSize(
                    f"an already-aligned crop for template {template} must be {tw}x{th} pixels, "
                    f"got {w}x{h}; send the original photo without the aligned flag to detect "
                    "and align the face"
                )
            box = np.array([[-0.5, -0.5, w - 0.5, h - 0.5]])
            return rgb, Face(identity_alignment(rgb, template), 1.0, 1, box)
        found = self._find(image)
        best = found.result.best
        if best is None:
            raise self._no_face(found)
        alignment = align_face(found.rgb, best.landmarks, template, border=self.border)
        return found.rgb, Face(alignment, best.score, found.result.count, found.result.boxes,
                               found.frame)

    def faces(self, image: ImageSource, *, template: str | None = None) -> tuple[Face, ...]:
        """Every face of ``image``, aligned, most confident first; NoFaceFound if none.

        Each Face's ``boxes`` lists all faces with its own box first.
        """
        template = template or self.template
        found = self._find(image)
        result = found.result
        if result.best is None:
            raise self._no_face(found)
        out = []
        all_boxes = result.boxes
        for i, det in enumerate(result.detections):
            order = [i] + [j for j in range(result.count) if j != i]
            alignment = align_face(found.rgb, det.landmarks, template, border=self.border)
            out.append(Face(alignment, det.score, result.count, all_boxes[order], found.frame))
        return tuple(out)
