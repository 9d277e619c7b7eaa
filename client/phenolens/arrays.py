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
    message = types_pb2.FloatArray()
    set_float_array(message, array)
    return message


def set_float_array(message: types_pb2.FloatArray, array: np.ndarray) -> None:
    """Fill ``message`` (e.g. a field of a message being built) in place with ``array``: no
    FloatArray built apart and copied in, which counts for the large photo maps."""
    arr = np.ascontiguousarray(array, dtype="<f4")
    message.shape[:] = arr.shape
    message.data = arr.tobytes()


def from_float_array(message: types_pb2.FloatArray, *, copy: bool = True) -> np.ndarray:
    """The array of a FloatArray message; an empty message gives an empty (0,) array.
    ``copy=False``: a read-only float32 view of the message's bytes (no copy of its own)."""
    shape = tuple(int(n) for n in message.shape)
    arr = np.frombuffer(message.data, dtype="<f4")
    if copy or arr.dtype != np.float32:  # a copy, or native order on a big-endian machine
        arr = arr.astype(np.float32)
    if not shape:
        return arr
    expected = int(np.prod(shape))
    if arr.size != expected:
        raise ValueError(f"FloatArray holds {arr.size} values, shape {shape} needs {expected}")
    return arr.reshape(shape)


def optional_array(message: types_pb2.FloatArray, *, copy: bool = True) -> np.ndarray | None:
    return from_float_array(message, copy=copy) if message.shape else None


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


def image_rgb(message: types_pb2.Image) -> np.ndarray | None:
    """(H, W, 3) uint8 pixels of an Image message as ``to_rgb`` gives them for its input
    (None when decoding needs Pillow and it is absent)."""
    if message.WhichOneof("source") == "pixels":
        p = message.pixels
        return to_rgb(np.frombuffer(p.data, np.uint8).reshape(p.height, p.width, p.channels)
                      .copy())
    return to_rgb(message.encoded)


class LazyRGB:
    """The pixels of a sent Image (``image_rgb``), decoded on the first call and kept: the
    query photo that photo overlays are drawn on, decoded only when one is drawn."""

    def __init__(self, message: types_pb2.Image) -> None:
        self._message: types_pb2.Image | None = message
        self._rgb: np.ndarray | None = None

    def __call__(self) -> np.ndarray | None:
        message = self._message
        if message is not None:
            self._rgb = image_rgb(message)
            self._message = None
        return self._rgb


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
