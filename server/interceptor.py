"""One interceptor around every RPC: authentication, scope checks, error mapping, access log.

Library errors become gRPC statuses here, through ``server.errors.status_for``,
so servicer methods simply raise. Unexpected errors become INTERNAL with a
generic message (details stay in the server log, by type only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from server.auth import Principal, TokenAuth, required_scope
from server.errors import status_for
from server.logs import RPC_LOGGER, log_event

log = logging.getLogger(RPC_LOGGER)

class ServiceInterceptor(grpc.ServerInterceptor):
    def __init__(self, auth: TokenAuth) -> None:
        self.auth = auth

    def intercept_service(self, continuation: Callable[[Any], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = tuple(handler_call_details.invocation_metadata or ())
        if handler.request_streaming and handler.response_streaming:
            wrap, factory, behavior = self._wrap_stream, grpc.stream_stream_rpc_method_handler, \
                handler.stream_stream
        elif handler.request_streaming:
            wrap, factory, behavior = self._wrap_unary, grpc.stream_unary_rpc_method_handler, \
                handler.stream_unary
        elif handler.response_streaming:
            wrap, factory, behavior = self._wrap_stream, grpc.unary_stream_rpc_method_handler, \
                handler.unary_stream
        else:
            wrap, factory, behavior = self._wrap_unary, grpc.unary_unary_rpc_method_handler, \
                handler.unary_unary
        return factory(wrap(behavior, method, metadata),
                       request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    # ------------------------------------------------------------------------------------
    def _admit(self, method: str, metadata: tuple, context: grpc.ServicerContext
               ) -> Principal | None:
        if required_scope(method) is None:  # health checking and reflection are open
            return None
        principal = self.auth.authenticate(metadata)
        self.auth.authorize(principal, method)
        return principal

    def _wrap_unary(self, behavior: Callable, method: str, metadata: tuple) -> Callable:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            principal = None
            try:
                principal = self._admit(method, metadata, context)
                return behavior(request, context)
            except Exception as exc:
                _abort(context, exc)
            finally:
                _access_log(method, context, principal, started)

        return run

    def _wrap_stream(self, behavior: Callable, method: str, metadata: tuple) -> Callable:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.monotonic()
            principal = None
            messages = 0
            try:
                principal = self._admit(method, metadata, context)
                for response in behavior(request, context):
                    messages += 1
                    yield response
            except GeneratorExit:
                raise
            except Exception as exc:
                _abort(context, exc)
            finally:
                _access_log(method, context, principal, started, messages=messages)

        return run


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    already = context.code()
    if already is not None and already != grpc.StatusCode.OK:
        raise exc  # context.abort() was called inside the servicer
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error", exc_info=exc,
                  extra={"fields": {"event": "internal_error"}})
        context.abort(code, "internal server error (see the server log)")
    context.abort(code, str(exc) or type(exc).__name__)


def _access_log(method: str, context: grpc.ServicerContext, principal: Principal | None,
                started: float, **fields: Any) -> None:
    code = context.code()
    if code is None:
        remaining = context.time_remaining()
        if context.is_active():
            code = grpc.StatusCode.OK
        elif remaining is not None and remaining <= 0:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            code = grpc.StatusCode.CANCELLED
    log_event(
        log, "rpc",
        logging.INFO if code == grpc.StatusCode.OK else logging.WARNING,
        method=method,
        code=code.name,
        duration_ms=round((time.monotonic() - started) * 1000, 2),
        peer=context.peer(),
        principal=principal.name if principal else None,
        **fields,
    )
