"""Bounded concurrency for heavy work, and per-request cancellation.

A heavy call (anything that runs the face pipeline, the encoder or an
explanation) holds one slot of a semaphore. A call that cannot get a slot
within the queue timeout fails with ``Saturated`` (RESOURCE_EXHAUSTED): the
wait is bounded in time and, through gRPC's worker pool and
``maximum_concurrent_rpcs``, in length.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from server.errors import Cancelled, DeadlineExceeded, Saturated


class HeavyWorkLimiter:
    def __init__(self, max_concurrent: int, queue_timeout_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.queue_timeout_s = queue_timeout_s
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self._busy = 0

    @property
    def busy(self) -> int:
        return self._busy

    @contextmanager
    def slot(self, timeout_s: float | None = None) -> Iterator[None]:
        """Hold one slot for the body; raises Saturated when none frees up in time."""
        wait = self.queue_timeout_s if timeout_s is None else max(0.0, timeout_s)
        if not self._slots.acquire(timeout=wait):
            raise Saturated(
                f"server busy: all {self.max_concurrent} heavy-work slots in use for "
                f"{wait:g} s; retry with backoff")
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
            self._slots.release()


@dataclass
class RequestScope:
    """The cancellation signal and deadline of one RPC, for the library calls it makes.

    ``cancel`` is set when the call ends for any reason (client cancel, disconnect,
    deadline, completion); ``deadline`` is a ``time.monotonic()`` instant or None.
    """

    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None

    @classmethod
    def of(cls, context: grpc.ServicerContext) -> RequestScope:
        scope = cls()
        remaining = context.time_remaining()
        if remaining is not None and remaining < 1e9:
            scope.deadline = time.monotonic() + remaining
        context.add_callback(scope.cancel.set)
        return scope

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise when the caller's deadline has passed or the call was cancelled."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded("the caller's deadline passed before the server finished")
        if self.cancel.is_set():
            raise Cancelled("the call was cancelled by the client")

    def cancelled(self) -> bool:
        """For library loops: True once the call is over or past its deadline."""
        return self.cancel.is_set() or (
            self.deadline is not None and time.monotonic() >= self.deadline)
