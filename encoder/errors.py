"""Typed errors of the face pipeline. The server maps each to one gRPC status."""

from __future__ import annotations


class EncoderError(Exception):
    """Base of every error raised by the encoder package."""


class ImageError(EncoderError):
    """The bytes given are not a usable image (the caller must send another)."""


class EmptyImage(ImageError):
    pass


class NotAnImage(ImageError):
    pass


class TruncatedImage(ImageError):
    pass


class ImageTooLarge(ImageError):
    """Pixel count or byte size above the configured limit (decompression bombs)."""


class UnsupportedImage(ImageError):
    """A real image in a mode or format we cannot convert to RGB."""


class FaceError(EncoderError):
    pass


class NoFaceFound(FaceError):
    pass


class WrongImageSize(FaceError):
    """An already-aligned crop whose size does not match the encoder input."""


class UnknownEncoder(EncoderError):
    pass


class UnknownDetector(EncoderError):
    """A face detector name that is not registered (the message lists the known ones)."""


class CheckpointError(EncoderError):
    """A weights file that cannot be loaded into the requested architecture."""
