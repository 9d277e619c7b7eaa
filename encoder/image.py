"""Decode untrusted image bytes into (H, W, 3) uint8 RGB arrays, with Pillow.

Accepted: JPEG (and MPO), PNG, WebP, BMP, GIF and TIFF. ``decode_image`` and
``load_rgb`` give the first frame (page) of an animated GIF or multi-page TIFF;
``iter_frames`` gives the first ``max_frames`` one at a time, decoding each only
when it is asked for (the face pipeline uses the first frame with a face in
it). EXIF orientation is applied; alpha is composited on white; palette,
CMYK, 16-bit and grayscale images are converted to 8-bit RGB. Limits on the
byte size and on the pixel count (read from the header, before decoding) guard
against decompression bombs. Every failure is a typed ``encoder.errors``
exception whose message says what was seen and what to do, never the bytes.

Truncated files always fail: this module never sets Pillow's global
``ImageFile.LOAD_TRUNCATED_IMAGES``, and refuses to run if something else has.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from encoder.errors import (
    EmptyImage,
    ImageTooLarge,
    NotAnImage,
    TruncatedImage,
    UnsupportedImage,
)

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_PIXELS",
    "Frame",
    "ImageSource",
    "decode_image",
    "iter_frames",
    "load_rgb",
    "pil_to_rgb",
]

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Frames of an animated GIF / multi-page TIFF searched for a face (each costs a detection).
DEFAULT_MAX_FRAMES = 8
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_ACCEPTED_NAMES = "JPEG, PNG, WebP or BMP"

ImageSource = bytes | bytearray | memoryview | str | Path | np.ndarray | Image.Image

# (magic prefix, offset, human name) to explain what a rejected file looks like.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG image"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG image"),
    (b"RIFF", 0, "RIFF (WebP) image"),
    (b"BM", 0, "BMP image"),
    (b"GIF8", 0, "GIF image"),
    (b"II*\x00", 0, "TIFF image"),
    (b"MM\x00*", 0, "TIFF image"),
    (b"%PDF", 0, "PDF document"),
    (b"ftypheic", 4, "HEIC image"),
    (b"ftypheix", 4, "HEIC image"),
    (b"ftypmif1", 4, "HEIF image"),
    (b"ftypavif", 4, "AVIF image"),
    (b"PK\x03\x04", 0, "ZIP archive"),
    (b"\x1f\x8b", 0, "gzip archive"),
)
_IMAGE_KINDS = {
    "JPEG image",
    "PNG image",
    "RIFF (WebP) image",
    "BMP image",
    "GIF image",
    "TIFF image",
}
_UNSUPPORTED_KINDS = {"HEIC image", "HEIF image", "AVIF image"}


def _sniff(data: bytes) -> str:
    for magic, offset, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    head = data[:512].decode("utf-8", errors="replace")
    body = head[:-3] if len(head) > 3 else head  # a character may be cut at the window's end
    if body and all((ch.isprintable() and ch != "\ufffd") or ch in "\r\n\t" for ch in body):
        return "text"
    return "unrecognised binary data"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _pixel_limit(max_pixels: int) -> int:
    """The limit that actually applies: ours, or Pillow's bomb limit if that is lower."""
    pillow = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, 2 * pillow) if pillow else max_pixels


def _too_many_pixels(size: str, pixels: int | None, max_pixels: int) -> ImageTooLarge:
    """The one decompression-bomb message: the image's size and the single limit applied."""
    amount = f" = {pixels / 1e6:.1f} megapixels" if pixels is not None else ""
    return ImageTooLarge(
        f"the image is {size}{amount}, above the limit of "
        f"{_pixel_limit(max_pixels) / 1e6:.1f} megapixels; downscale it (a face needs far "
        "fewer) and send it again"
    )


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise EmptyImage(f"the image has no pixels ({width}x{height})")
    pixels = width * height
    if pixels > _pixel_limit(max_pixels):
        raise _too_many_pixels(f"{width}x{height}", pixels, max_pixels)


def _bomb_pixels(exc: Image.DecompressionBombError) -> int | None:
    """The pixel count in Pillow's bomb message ("Image size (N pixels) exceeds ..."), if any."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return int(found.group(1)) if found else None


def _check_bytes(size: int, max_bytes: int) -> None:
    if size == 0:
        raise EmptyImage(
            "the image is empty (0 bytes); send the bytes of a JPEG, PNG, WebP or BMP file"
        )
    if size > max_bytes:
        raise ImageTooLarge(
            f"the image file is {size} bytes ({_mib(size)}), above the limit of {max_bytes} bytes "
            f"({_mib(max_bytes)}); recompress or downscale it and send it again"
        )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check format and pixel count before any decoding."""
    kind = _sniff(data)
    if kind in _UNSUPPORTED_KINDS:
        raise UnsupportedImage(
            f"{kind.split()[0]} images are not supported; convert it to {_ACCEPTED_NAMES}"
        )
    try:
        im = Image.open(io.BytesIO(data), formats=None)
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels("declared by its header", _bomb_pixels(exc), max_pixels) from None
    except UnidentifiedImageError:
        if kind in _IMAGE_KINDS:
            raise TruncatedImage(
                f"the data ({len(data)} bytes) starts like a {kind} but its header is truncated "
                "or corrupt; send the complete file"
            ) from None
        raise NotAnImage(
            f"the data ({len(data)} bytes) is not an image (it looks like {kind}); send a "
            f"{_ACCEPTED_NAMES} file"
        ) from None
    except (OSError, EOFError, SyntaxError, ValueError, zlib.error) as exc:
        raise TruncatedImage(
            f"the {kind} header could not be read ({type(exc).__name__}); the file is "
            "truncated or corrupt, send the complete file"
        ) from None
    if im.format not in ACCEPTED_FORMATS:
        fmt = im.format
        im.close()
        raise UnsupportedImage(f"{fmt} images are not accepted; convert it to {_ACCEPTED_NAMES}")
    width, height = im.size
    _check_pixels(width, height, max_pixels)
    return im


def _load(im: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by another module; truncated uploads "
            "would decode as partly grey images. Unset it."
        )
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(f"{im.size[0]}x{im.size[1]}", _bomb_pixels(exc), max_pixels) from None
    except (OSError, EOFError, SyntaxError, ValueError, zlib.error) as exc:
        raise TruncatedImage(
            f"the {im.format or 'image'} data ({im.size[0]}x{im.size[1]}) is truncated or "
            f"corrupt ({type(exc).__name__}: {exc}); send the complete file"
        ) from None


def _apply_orientation(im: Image.Image) -> Image.Image:
    try:
        rotated = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, AttributeError):
        # Malformed EXIF is common in the wild; the pixels themselves are fine.
        return im
    return rotated if rotated is not None else im


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in im.info
    ):
        out = _composite_on_white(im)
    elif mode == "RGB":
        out = im
    elif mode in ("P", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        try:
            out = im.convert("RGB")
        except ValueError as exc:
            raise UnsupportedImage(f"cannot convert a {mode} image to RGB ({exc})") from None
    elif mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (and Pillow's 32-bit "I", which holds it): 0..65535 -> 0..255.
        values = np.asarray(im).astype(np.int64)
        gray = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    else:
        raise UnsupportedImage(
            f"images in Pillow mode {mode!r} are not supported; save it as 8-bit RGB "
            f"{_ACCEPTED_NAMES}"
        )
    return np.array(out, dtype=np.uint8, copy=True)


def pil_to_rgb(im: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A PIL image (any supported mode, EXIF orientation applied) -> (H, W, 3) uint8 RGB."""
    _check_pixels(im.size[0], im.size[1], max_pixels)
    _load(im, max_pixels)
    return _to_rgb(_apply_orientation(im))


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied.

    Raises EmptyImage, NotAnImage, TruncatedImage, ImageTooLarge (more than
    ``max_bytes`` bytes, or more than ``max_pixels`` pixels as declared by the
    header, checked before decoding) or UnsupportedImage. Pillow's own hard
    limit (2 x ``Image.MAX_IMAGE_PIXELS``) also applies.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image takes bytes, got {type(data).__name__}")
    data = bytes(data)
    _check_bytes(len(data), max_bytes)
    im = _open(data, max_pixels)
    with im:
        _load(im, max_pixels)
        return _to_rgb(_apply_orientation(im))


def _array_to_rgb(arr: np.ndarray, max_pixels: int) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise UnsupportedImage(f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise UnsupportedImage(
            f"image arrays must be (H, W), (H, W, 3) or (H, W, 4); got {arr.shape}"
        )
    if arr.size == 0:
        raise EmptyImage(f"the image array is empty, shape {arr.shape}")
    _check_pixels(arr.shape[1], arr.shape[0], max_pixels)
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.uint32)
        rgb = arr[:, :, :3].astype(np.uint32)
        blended = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
        return blended.astype(np.uint8)
    return np.array(arr, dtype=np.uint8, order="C", copy=True)


def load_rgb(
    src: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Any image source -> (H, W, 3) uint8 RGB (a new array the caller may modify).

    ``src`` is encoded bytes, a file path (str or Path), a PIL image, or a
    uint8 array of shape (H, W), (H, W, 3) RGB or (H, W, 4) RGBA (alpha is
    composited on white). Raises the errors of :func:`decode_image`, and
    FileNotFoundError for a missing path.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        return decode_image(bytes(src), max_pixels=max_pixels, max_bytes=max_bytes)
    if isinstance(src, (str, Path)):
        path = Path(src)
        _check_bytes(path.stat().st_size, max_bytes)
        return decode_image(path.read_bytes(), max_pixels=max_pixels, max_bytes=max_bytes)
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, max_pixels)
    if isinstance(src, Image.Image):
        return pil_to_rgb(src, max_pixels=max_pixels)
    raise TypeError(
        "load_rgb takes bytes, a path, a PIL image or a uint8 numpy array, got "
        f"{type(src).__name__}"
    )


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame of a (possibly animated) image.

    index: 0-based frame (GIF) or page (TIFF) number. count: frames in the
    file (1 for still images and arrays). rgb: (H, W, 3) uint8. format: the
    decoder's format name ("GIF", "TIFF", ...; "array" for arrays).
    """

    index: int
    count: int
    rgb: np.ndarray
    format: str


def _frames_of(im: Image.Image, max_pixels: int, max_frames: int) -> Iterator[Frame]:
    count = max(1, int(getattr(im, "n_frames", 1)))
    fmt = im.format or "image"
    for index in range(min(count, max_frames)):
        if index:
            try:
                im.seek(index)
            except EOFError:  # n_frames over-counted (damaged file): stop at the last real frame
                return
            except (OSError, SyntaxError, ValueError, zlib.error) as exc:
                raise TruncatedImage(
                    f"frame {index} of the {count}-frame {fmt} is truncated or corrupt "
                    f"({type(exc).__name__}); send the complete file"
                ) from None
            _check_pixels(im.size[0], im.size[1], max_pixels)
        _load(im, max_pixels)
        yield Frame(index, count, _to_rgb(_apply_orientation(im)), fmt)


def iter_frames(
    src: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> Iterator[Frame]:
    """The first ``max_frames`` frames of ``src`` as :class:`Frame`, each decoded when asked for.

    Still images and arrays give one frame. Same sources, limits (per frame)
    and errors as :func:`load_rgb`; the errors of frame k surface when frame k
    is reached.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if isinstance(src, (str, Path)):
        path = Path(src)
        _check_bytes(path.stat().st_size, max_bytes)
        src = path.read_bytes()
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        _check_bytes(len(data), max_bytes)
        with _open(data, max_pixels) as im:
            yield from _frames_of(im, max_pixels, max_frames)
        return
    if isinstance(src, Image.Image):
        _check_pixels(src.size[0], src.size[1], max_pixels)
        yield from _frames_of(src, max_pixels, max_frames)
        return
    yield Frame(0, 1, load_rgb(src, max_pixels=max_pixels, max_bytes=max_bytes), "array")
