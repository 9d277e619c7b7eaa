"""One interceptor around every RPC: admission, authentication, scope checks, error
mapping, access log.

Library errors become gRPC statuses here, through ``server.errors.status_for``,
so servicer methods simply raise. Unexpected errors become INTERNAL with a
generic message (details stay in the server log, by type only).

The interceptor runs when a call arrives (on gRPC's polling thread, before a
handler thread is assigned), so it records the arrival time for admission
(``server.limits.ARRIVAL``) and refuses calls beyond ``max_in_flight`` itself,
with an access-log line, instead of gRPC's silent ``maximum_concurrent_rpcs``.
Open methods (health, reflection) are never counted or refused and run on their
own small thread pool, so they never wait behind heavy work. Unknown methods get
an access-log line too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from server.auth import Principal, TokenAuth, required_scope
from server.errors import BadRequest, Saturated, status_for
from server.limits import ARRIVAL
from server.logs import RPC_LOGGER, log_event

log = logging.getLogger(RPC_LOGGER)

RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of a refusal; the client honours it


class ServiceInterceptor(grpc.ServerInterceptor):
    """``max_in_flight``: most non-open calls in handlers at once (None: unlimited);
    ``pool``: the server's handler pool and ``open_pool`` the one of open methods; given,
    a call whose request never reaches its handler (larger than the message limit, or
    the client left first) still gets an access-log line."""

    def __init__(self, auth: TokenAuth, *, max_in_flight: int | None = None,
                 pool: futures.ThreadPoolExecutor | None = None,
                 open_pool: futures.ThreadPoolExecutor | None = None) -> None:
        self.auth = auth
        self.max_in_flight = max_in_flight
        self.pool = pool
        self.open_pool = open_pool
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def intercept_service(self, continuation: Callable[[Any], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        arrived = time.monotonic()
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None:
            log_event(log, "rpc", logging.WARNING, method=method, code="UNIMPLEMENTED",
                      duration_ms=0.0, peer=None, principal=None,
                      reason="no such method")
            return None
        metadata = tuple(handler_call_details.invocation_metadata or ())
        is_open = required_scope(method) is None
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
        call = _CallRecord(method, arrived)
        run = wrap(_checked_requests(behavior, handler.request_streaming), method, metadata,
                   call, counted=not is_open)
        pool = self.open_pool if is_open else self.pool
        if pool is not None:
            run.experimental_thread_pool = _LoggedPool(pool, call)  # grpc runs it there
        return factory(run, request_deserializer=_lenient(handler.request_deserializer),
                       response_serializer=handler.response_serializer)

    def _enter(self, counted: bool) -> None:
        """Count a call into its handler; refuse it when ``max_in_flight`` are running."""
        if not counted:
            return
        with self._lock:
            if self.max_in_flight is not None and self._in_flight >= self.max_in_flight:
                raise Saturated(f"server busy: {self._in_flight} calls in progress (limit "
                                f"{self.max_in_flight}); retry in about 0.5 s", 0.5)
            self._in_flight += 1

    def _leave(self, counted: bool) -> None:
        if counted:
            with self._lock:
                self._in_flight -= 1

    # ------------------------------------------------------------------------------------
    def _admit(self, method: str, metadata: tuple, context: grpc.ServicerContext
               ) -> Principal | None:
        if required_scope(method) is None:  # health checking and reflection are open
            return None
        principal = self.auth.authenticate(metadata)
        self.auth.authorize(principal, method)
        return principal

    def _wrap_unary(self, behavior: Callable, method: str, metadata: tuple, call: _CallRecord,
                    *, counted: bool) -> Callable:
        arrived = call.arrived

        def run(request: Any, context: grpc.ServicerContext) -> Any:
            call.entered = True
            principal = None
            entered = False
            token = ARRIVAL.set(arrived)
            try:
                self._enter(counted)
                entered = True
                principal = self._admit(method, metadata, context)
                return behavior(request, context)
            except Exception as exc:
                _abort(context, exc)
            finally:
                if entered:
                    self._leave(counted)
                ARRIVAL.reset(token)
                _access_log(method, context, principal, arrived)

        return run

    def _wrap_stream(self, behavior: Callable, method: str, metadata: tuple, call: _CallRecord,
                     *, counted: bool) -> Callable:
        arrived = call.arrived

        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call.entered = True
            principal = None
            messages = 0
            entered = False
            try:
                self._enter(counted)
                entered = True
                principal = self._admit(method, metadata, context)
                ARRIVAL.set(arrived)  # the generator may resume on another thread
                for response in behavior(request, context):
                    messages += 1
                    yield response
                    ARRIVAL.set(arrived)
            except GeneratorExit:
                raise
            except Exception as exc:
                _abort(context, exc)
            finally:
                if entered:
                    self._leave(counted)
                _access_log(method, context, principal, arrived, messages=messages)

        return run


class _CallRecord:
    """One call as the interceptor saw it arrive; ``entered`` once its handler runs."""

    def __init__(self, method: str, arrived: float) -> None:
        self.method = method
        self.arrived = arrived
        self.entered = False


class _LoggedPool(futures.ThreadPoolExecutor):
    """gRPC's per-handler pool hook: runs the call's work on ``inner`` and writes the
    access-log line of a call whose handler never ran (gRPC dropped the request: too
    large for ``grpc.max_receive_message_length``, or the client went away first).
    It never starts threads of its own."""

    def __init__(self, inner: futures.ThreadPoolExecutor, call: _CallRecord) -> None:
        super().__init__(max_workers=1)
        self.inner = inner
        self.call = call

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> futures.Future:
        def work() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                if not self.call.entered:
                    log_event(log, "rpc", logging.WARNING, method=self.call.method,
                              code="NOT_RECEIVED", principal=None, peer=None,
                              duration_ms=round((time.monotonic() - self.call.arrived) * 1000,
                                                2),
                              reason="the request never reached the handler: larger than "
                                     "limits.max_message_bytes, or the client went away")

        return self.inner.submit(work)


class _Undecodable:
    """Stands for a request message that did not parse (gRPC itself would answer
    INTERNAL, without an access-log line); the handler turns it into BadRequest."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
            return _Undecodable(exc)

    return parse


def _refuse_undecodable(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise BadRequest(f"the request is not a valid message of this method "
                         f"({type(request.error).__name__})")
    return request


def _checked_requests(behavior: Callable, request_streaming: bool) -> Callable:
    """``behavior`` that refuses an undecodable request (or stream item) with BadRequest."""
    if request_streaming:
        def checked_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behavior((_refuse_undecodable(r) for r in requests), context)

        return checked_stream

    def checked(request: Any, context: grpc.ServicerContext) -> Any:
        return behavior(_refuse_undecodable(request), context)

    return checked


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    already = context.code()
    if already is not None and already != grpc.StatusCode.OK:
        raise exc  # context.abort() was called inside the servicer
    code = status_for(exc)
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(round(retry_after * 1000))),))
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
