"""One place that maps the library's typed errors to gRPC status codes and CLI exit codes.

The service issue extends ``STATUS_BY_ERROR``; everything else only raises.
"""

from __future__ import annotations

import grpc

from encoder import errors as enc
from explain import errors as xpl
from gallery import errors as gal


class ServiceError(Exception):
    """Base of the errors the server raises itself (not the library's)."""


class BadRequest(ServiceError):
    """A request that is malformed or over a configured limit (top_k, methods, page size)."""


class Saturated(ServiceError):
    """Admission refused: slots, queue or memory full. ``retry_after_s`` is the server's
    estimate of when a retry could be admitted (sent to the client as a hint)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(ServiceError):
    """No bearer token, or one the server does not know."""


class PermissionDenied(ServiceError):
    """A known token without the scope the method needs."""


class NotFound(ServiceError):
    pass


class SeveralFaces(ServiceError):
    """A gallery write of a photo with more than one face: which one is meant is unknown."""


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed while the server was still working."""


class Cancelled(ServiceError):
    """The caller went away (cancelled the call or disconnected)."""


# Ordered most specific first; the first isinstance match wins.
STATUS_BY_ERROR: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Saturated, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (SeveralFaces, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (gal.UnknownId, grpc.StatusCode.NOT_FOUND),
    (gal.DuplicateId, grpc.StatusCode.ALREADY_EXISTS),
    (gal.SchemeMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (gal.DimensionMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (gal.SchemaTooNew, grpc.StatusCode.FAILED_PRECONDITION),
    (gal.InvalidEmbedding, grpc.StatusCode.INVALID_ARGUMENT),
    (gal.ImportFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (xpl.UnknownMethod, grpc.StatusCode.INVALID_ARGUMENT),
    (xpl.InvalidOption, grpc.StatusCode.INVALID_ARGUMENT),
    (xpl.BudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (xpl.TimeLimitExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (xpl.Cancelled, grpc.StatusCode.CANCELLED),
    (xpl.NonAffineHead, grpc.StatusCode.FAILED_PRECONDITION),
    (xpl.IncompatibleViews, grpc.StatusCode.FAILED_PRECONDITION),
    (enc.ImageTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (enc.ImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (enc.FaceError, grpc.StatusCode.INVALID_ARGUMENT),
    (enc.UnknownEncoder, grpc.StatusCode.INVALID_ARGUMENT),
    (enc.UnknownDetector, grpc.StatusCode.INVALID_ARGUMENT),
    (enc.CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
    (FileNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def describe_error(exc: BaseException) -> tuple[str, int]:
    """(message for a person, CLI exit code): 2 for bad input, 1 for anything else."""
    code = status_for(exc)
    exit_code = 2 if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) else 1
    return (str(exc) or type(exc).__name__), exit_code
