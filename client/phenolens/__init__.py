"""PhenoLens Python client: explainable face matching over gRPC.

``Client`` (blocking) and ``AsyncClient`` (asyncio) expose every call of the
phenolens.v1 contract and return frozen dataclasses with numpy arrays. Needs
grpcio, protobuf and numpy; Pillow (``pip install phenolens[images]``) for PIL
inputs, decoding crops and ``save_overlay``. No torch, no faiss.
"""

from .aio import AsyncClient
from .client import TLS, Client, Retry
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PhenoLensError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .requests import Filters, ImportItem
from .results import (
    Encoding,
    ExplainedMatch,
    ExplainResult,
    ExplanationMap,
    FaceAlignment,
    GalleryImage,
    GalleryRecord,
    GalleryStats,
    Hit,
    ImportSummary,
    MatchResult,
    Page,
    ServerInfo,
)
from .syndrome import CompositeResult, FillInResult, SyndromeClient, SyndromeMapResult

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "Client", "TLS", "Retry", "Filters", "ImportItem",
    "Encoding", "ExplainedMatch", "ExplainResult", "ExplanationMap", "FaceAlignment",
    "GalleryImage", "GalleryRecord", "GalleryStats", "Hit", "ImportSummary", "MatchResult",
    "Page", "ServerInfo",
    "SyndromeClient", "CompositeResult", "SyndromeMapResult", "FillInResult",
    "PhenoLensError", "InvalidArgument", "NotFound", "FailedPrecondition", "Unauthenticated",
    "PermissionDenied", "ResourceExhausted", "DeadlineExceeded", "Unavailable",
]
