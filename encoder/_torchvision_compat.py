"""Make ``import torchvision`` work with the CPU build of torch (DESIGN.md §6).

PyPI's torchvision 0.28.0 is built against CUDA torch; with CPU torch its
compiled ops (``_C.so``) fail to load, and importing torchvision then raises
``operator torchvision::nms does not exist`` because its import-time fake
registrations for ``nms``/``qnms`` run unconditionally.

:func:`ensure_torchvision` fixes that once per process, and only when the
compiled ops really are missing: it defines the ``torchvision::nms`` and
``torchvision::qnms`` schemas with a pure-torch greedy NMS kernel, imports
torchvision, and routes ``torchvision.ops.nms`` (and therefore
``batched_nms``, which MTCNN uses) to that kernel. Every other compiled op
keeps torchvision's own behaviour without ``_C``: ``roi_align`` falls back to
its Python implementation, the rest raise torchvision's "Couldn't load custom
C++ ops" error.

Call it before importing torchvision, facenet_pytorch or pytorch_grad_cam::

    from encoder._torchvision_compat import ensure_torchvision
    torchvision = ensure_torchvision()
    from pytorch_grad_cam import GradCAM
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

__all__ = ["ensure_torchvision", "nms_reference", "uses_fallback_ops"]

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
# torch.library.Library objects deregister their ops when garbage collected.
_LIBRARIES: list[torch.library.Library] = []

_NMS_SCHEMA = "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_QNMS_SCHEMA = "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS with torchvision's semantics, in numpy.

    boxes (N, 4) as (x1, y1, x2, y2), scores (N,). Returns the int64 indices of
    the kept boxes in decreasing order of score; a box is discarded when its
    IoU with a kept, higher-scoring box is greater than ``iou_threshold``.
    """
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"boxes must be (N, 4), got {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.size(0) != boxes.size(0):
        raise ValueError(f"scores must be (N,) with N={boxes.size(0)}, got {tuple(scores.shape)}")
    device = boxes.device
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=device)
    b = boxes.detach().to("cpu", torch.float64 if boxes.dtype == torch.float64 else torch.float32)
    b = b.numpy()
    s = scores.detach().to("cpu", torch.float64).numpy()
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-s, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return torch.as_tensor(keep, dtype=torch.int64, device=device)


def _qnms_reference(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    return nms_reference(dets.float(), scores.float(), iou_threshold)


def _compiled_ops_load() -> bool:
    """True when torchvision's own ``_C`` extension loads (checked without importing torchvision)."""
    if hasattr(torch.ops.torchvision, "nms"):
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed; run `make setup`")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(package_dir.glob("_C.*so")) + sorted(package_dir.glob("_C.*pyd"))
    for lib_path in candidates:
        try:
            torch.ops.load_library(str(lib_path))
        except (ImportError, OSError):
            continue
        if hasattr(torch.ops.torchvision, "nms"):
            return True
    return False


def _register_fallback_ops() -> None:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define(_NMS_SCHEMA)
    lib.define(_QNMS_SCHEMA)
    # CPU only: a GPU build of torch comes with a torchvision whose compiled ops load.
    lib.impl("nms", nms_reference, "CPU")
    lib.impl("qnms", _qnms_reference, "CPU")
    _LIBRARIES.append(lib)


def _route_nms(torchvision: ModuleType) -> None:
    """Point torchvision.ops.nms at the registered op, bypassing the ``_C`` check."""

    def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        if boxes.is_quantized:
            return torch.ops.torchvision.qnms(boxes.int_repr(), scores.int_repr(), iou_threshold)
        return torch.ops.torchvision.nms(boxes, scores, iou_threshold)

    nms.__doc__ = torchvision.ops.boxes.nms.__doc__
    torchvision.ops.boxes.nms = nms
    torchvision.ops.nms = nms


def uses_fallback_ops() -> bool:
    """Whether :func:`ensure_torchvision` had to register the pure-torch NMS."""
    ensure_torchvision()
    return bool(_STATE["fallback"])


def ensure_torchvision() -> ModuleType:
    """Import torchvision, first registering a pure-torch NMS if its compiled ops do not load.

    Idempotent and thread-safe; returns the ``torchvision`` module. Raises
    ImportError if torchvision is not installed.
    """
    module = _STATE.get("module")
    if module is not None:
        return module  # type: ignore[return-value]
    with _LOCK:
        module = _STATE.get("module")
        if module is not None:
            return module  # type: ignore[return-value]
        already = sys.modules.get("torchvision")
        if already is not None and hasattr(already, "ops"):
            fallback = not already.extension._has_ops()
        else:
            fallback = not _compiled_ops_load()
            if fallback and not hasattr(torch.ops.torchvision, "nms"):
                _register_fallback_ops()
        import torchvision

        if fallback:
            _route_nms(torchvision)
        _STATE["fallback"] = fallback
        _STATE["module"] = torchvision
        return torchvision
