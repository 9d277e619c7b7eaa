"""Arrays and images on the wire: FloatArray <-> numpy, and every accepted image input.

Images may be a path, file bytes, a PIL image or a numpy array (H, W) or
(H, W, C) uint8; numpy arrays travel as raw pixels so Pillow is not needed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._proto import types_pb2

ImageLike = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | Any
"""A path, image file bytes, a ``PIL.Image.Image`` or a uint8 numpy array."""


def to_float_array(array: np.ndarray) -> types_pb2.FloatArray:
    arr = np.ascontiguousarray(np.asarray(array, dtype="<f4"))
    return types_pb2.FloatArray(shape=list(arr.shape), data=arr.tobytes())


def from_float_array(message: types_pb2.FloatArray) -> np.ndarray:
    """The array of a FloatArray message; an empty message gives an empty (0,) array."""
    shape = tuple(int(n) for n in message.shape)
    arr = np.frombuffer(message.data, dtype="<f4").astype(np.float32)
    if not shape:
        return arr
    expected = int(np.prod(shape))
    if arr.size != expected:
        raise ValueError(f"FloatArray holds {arr.size} values, shape {shape} needs {expected}")
    return arr.reshape(shape)


def optional_array(message: types_pb2.FloatArray) -> np.ndarray | None:
    return from_float_array(message) if message.shape else None


def _pixels(arr: np.ndarray) -> types_pb2.RawPixels:
    if arr.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8 (H, W) or (H, W, C), got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"numpy images must be (H, W), (H, W, 1|3|4), got shape {arr.shape}")
    arr = np.ascontiguousarray(arr)
    h, w, c = arr.shape
    return types_pb2.RawPixels(height=h, width=w, channels=c, data=arr.tobytes())


def to_image(image: ImageLike, *, aligned: bool = False) -> types_pb2.Image:
    """The Image message for any accepted input."""
    if isinstance(image, types_pb2.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return types_pb2.Image(encoded=bytes(image), aligned=aligned)
    if isinstance(image, (str, os.PathLike)):
        return types_pb2.Image(encoded=Path(image).read_bytes(), aligned=aligned)
    if isinstance(image, np.ndarray):
        return types_pb2.Image(pixels=_pixels(image), aligned=aligned)
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return types_pb2.Image(pixels=_pixels(np.asarray(image.convert("RGB"))), aligned=aligned)
    raise TypeError(f"unsupported image input {type(image).__name__}: give a path, bytes, "
                    "a PIL image or a uint8 numpy array")


def to_rgb(image: ImageLike) -> np.ndarray | None:
    """(H, W, 3) uint8 pixels of an input, or None when decoding needs Pillow and it is absent."""
    if isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else image[:, :, None]
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return np.ascontiguousarray(arr[:, :, :3])
    try:
        from PIL import Image, ImageOps
    except ImportError:
        return None
    if hasattr(image, "convert") and hasattr(image, "size"):
        return np.asarray(image.convert("RGB"))
    data = Path(image).read_bytes() if isinstance(image, (str, os.PathLike)) else bytes(image)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def require_pillow():
    """The ``PIL.Image`` module, or an ImportError that says how to get it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("this needs Pillow: pip install 'phenolens[images]'") from None
    return Image


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 of PNG bytes sent by the server; needs Pillow."""
    Image = require_pillow()

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
