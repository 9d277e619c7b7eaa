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


RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of an admission refusal
GRPC_CONCURRENCY_REFUSAL = "Concurrent RPC limit exceeded!"  # grpc core's own refusal


def retry_after_s(error: grpc.RpcError) -> float | None:
    """The server's retry hint (seconds) on a refused call, None when it sent none."""
    try:
        metadata = error.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - errors built without a call carry no metadata
        return None
    for key, value in metadata:
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, float(value) / 1000.0)
            except (TypeError, ValueError):
                return None
    return None


def is_admission_refusal(error: grpc.RpcError) -> bool:
    """RESOURCE_EXHAUSTED because the server was busy (worth a retry), as opposed to a
    message too large or an explanation over its budget (never worth one)."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return retry_after_s(error) is not None or error.details() == GRPC_CONCURRENCY_REFUSAL


def from_rpc_error(error: grpc.RpcError, *, without_client_cert: bool = False
                   ) -> PhenoLensError:
    """The typed error for a failed call (``grpc.RpcError`` raised by grpcio).

    ``without_client_cert``: the channel uses TLS without a client certificate; a
    connection the server closed during the handshake is then explained as the mutual
    TLS refusal it most likely is (grpc only says "Socket closed")."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if without_client_cert and code == grpc.StatusCode.UNAVAILABLE and \
            "socket closed" in details.lower():
        details += (" (the server closed the TLS connection; if it requires mutual TLS, "
                    "pass a client certificate: TLS(cert=..., key=...))")
    cls = _BY_CODE.get(code, PhenoLensError)
    return cls(details, code)
