"""Typed errors of the client: one class per gRPC status the service returns."""

from __future__ import annotations

import grpc


class PhenoLensError(Exception):
    """A call failed; ``code`` is the gRPC status, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgument(PhenoLensError):
    """A bad image, no face, or a malformed request."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PhenoLensError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(PhenoLensError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(PhenoLensError):
    """E.g. an embedding or gallery of another view scheme than the server's."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(PhenoLensError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(PhenoLensError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(PhenoLensError):
    """The server is saturated or the message is too large; retry later or send less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(PhenoLensError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(PhenoLensError):
    code = grpc.StatusCode.CANCELLED


class Unavailable(PhenoLensError):
    """The server could not be reached (after the client's retries)."""

    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE: dict[grpc.StatusCode, type[PhenoLensError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Unauthenticated,
        PermissionDenied, ResourceExhausted, DeadlineExceeded, Cancelled, Unavailable,
    )
}


def from_rpc_error(error: grpc.RpcError) -> PhenoLensError:
    """The typed error for a failed call (``grpc.RpcError`` raised by grpcio)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, PhenoLensError)
    return cls(details, code)
