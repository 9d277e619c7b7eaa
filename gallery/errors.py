"""Typed errors of the gallery. ``server/errors.py`` maps each to one gRPC status."""

from __future__ import annotations


class GalleryError(Exception):
    """Base of every error raised by the gallery package."""


class DuplicateId(GalleryError):
    """An image id already in the gallery with different content (pass ``update=True``)."""


class UnknownId(GalleryError):
    """A gallery id or image id that is not in the gallery."""


class SchemeMismatch(GalleryError):
    """Embeddings from another encoder or view scheme than the gallery was built with."""


class DimensionMismatch(GalleryError):
    """Embeddings whose view count or per-view sizes differ from the gallery's."""


class InvalidEmbedding(GalleryError):
    """An embedding with a non-finite value or a zero-length view (cannot be normalised)."""


class ImportFormatError(GalleryError):
    """An import file that does not have the expected columns or structure."""


class SchemaTooNew(GalleryError):
    """A gallery written by a newer PhenoLens (its schema version is above ours)."""
