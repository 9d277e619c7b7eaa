"""PNG bytes of an aligned crop or a map (Pillow's encoder)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 image -> PNG bytes (8-bit, lossless)."""
    image = np.ascontiguousarray(rgb)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected an (H, W, 3) or (H, W) uint8 image, got {image.dtype} {image.shape}")
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", compress_level=6)
    return out.getvalue()
