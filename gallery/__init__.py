"""The gallery store: SQLite as the source of truth, FAISS as a derived index,
GestaltMatcher-style syndrome and gene ranking, imports and exports.

Never imports torch: embeddings arrive as numpy arrays (or through an injected
``embed(path)`` callable in ``gallery.imports``).
"""

from gallery.errors import (
    DimensionMismatch,
    DuplicateId,
    GalleryError,
    ImportFormatError,
    InvalidEmbedding,
    SchemaTooNew,
    SchemeMismatch,
    UnknownId,
)
from gallery.features import FeatureLayout, FeatureStore, StoredFeatures
from gallery.records import (
    AddReport,
    ClassBalance,
    Entry,
    GalleryStats,
    GeneHit,
    Hit,
    Record,
    RecordInfo,
    SyndromeHit,
)
from gallery.search import SearchFilter
from gallery.store import Gallery

__all__ = [
    "AddReport", "ClassBalance", "DimensionMismatch", "DuplicateId", "Entry", "FeatureLayout",
    "FeatureStore", "Gallery",
    "GalleryError", "GalleryStats", "GeneHit", "Hit", "ImportFormatError", "InvalidEmbedding",
    "Record", "RecordInfo", "SchemaTooNew", "SchemeMismatch", "SearchFilter", "StoredFeatures", "SyndromeHit",
    "UnknownId",
]
