"""One place that maps the library's typed errors to gRPC status codes and CLI exit codes.

The service issue extends ``STATUS_BY_ERROR``; everything else only raises.
"""

from __future__ import annotations

import grpc

from encoder import errors as enc

# Ordered most specific first; the first isinstance match wins.
STATUS_BY_ERROR: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (enc.ImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (enc.FaceError, grpc.StatusCode.INVALID_ARGUMENT),
    (enc.UnknownEncoder, grpc.StatusCode.INVALID_ARGUMENT),
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
