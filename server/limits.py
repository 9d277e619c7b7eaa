"""Admission of heavy work, and per-request cancellation.

A heavy call (anything that runs the face pipeline, the encoder or an
explanation) holds one of ``max_concurrent`` slots. Admission is bounded three
ways, each refusal a ``Saturated`` (RESOURCE_EXHAUSTED) with a retry hint:

- at most ``max_queued`` calls wait for a slot; one more is refused at once;
- a waiting call gives up ``queue_timeout_s`` after it *arrived* at the server
  (the interceptor records arrival, so time spent waiting for a handler thread
  counts), and the message states the real wait;
- while the process's resident memory is above ``max_rss_bytes`` no new heavy
  call starts. The default (``AUTO``) is the smaller of 85 % of the memory the
  process may use (its cgroup's limit when it runs in a container with one, else
  physical RAM), so the server refuses work before the kernel's OOM killer takes
  the pod down, and what the process holds when the limiter is made (models and
  the gallery's index loaded) plus ``AUTO_HEADROOM_BYTES`` (3 GiB), so a laptop
  keeps room for everything else it runs and a big gallery still gets the same
  room for heavy work. Measured (tests/service/test_memory.py): a server holds
  about 0.75 GB idle, and 8 concurrent heavy methods on 2 slots add 0.15-0.5 GB at
  the peak; a 4 GiB pod gets 3.4 GiB, a laptop about 3.8 GB.

When the last heavy call ends, a background thread collects reference cycles (those
of calls stopped by their deadline hold tensors) and hands freed heap back to the
system (glibc ``malloc_trim``), so RSS settles near idle.
"""

from __future__ import annotations

import contextvars
import ctypes
import ctypes.util
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import psutil

from server.errors import Cancelled, DeadlineExceeded, Saturated

# When the current RPC arrived (time.monotonic()); set by the interceptor for the handler.
ARRIVAL: contextvars.ContextVar[float | None] = contextvars.ContextVar("arrival", default=None)

_PROCESS = psutil.Process()


def rss_bytes() -> int:
    """Resident set size of this process (0 where it cannot be read)."""
    try:
        return int(_PROCESS.memory_info().rss)
    except psutil.Error:
        return 0


AUTO = -1  # max_rss_bytes: derive the ceiling from the memory this process may use
AUTO_SHARE = 0.85
AUTO_HEADROOM_BYTES = 3 * 2**30
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max",  # cgroup v2
                  "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v1


def memory_available_bytes() -> int:
    """Memory this process may use: its cgroup's limit when one is set (psutil reads no
    cgroups: the one file), else physical RAM (psutil); 0 when neither can be read."""
    try:
        physical = int(psutil.virtual_memory().total)
    except (psutil.Error, OSError):
        physical = 0
    for path in _CGROUP_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and (not physical or int(text) < physical):
            return int(text)  # "max" or v1's huge "unlimited" value: no cgroup limit
    return physical


def rss_ceiling(configured: int, held: int | None = None) -> int:
    """The RSS ceiling for a configured ``max_rss_bytes``: itself when >= 0 (0: none);
    for ``AUTO`` the smaller of ``AUTO_SHARE`` of ``memory_available_bytes()`` and
    ``held`` (default: this process's RSS now) plus ``AUTO_HEADROOM_BYTES``."""
    if configured >= 0:
        return configured
    room = (rss_bytes() if held is None else held) + AUTO_HEADROOM_BYTES
    available = memory_available_bytes()
    return min(int(AUTO_SHARE * available), room) if available else room


def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_memory() -> None:
    """Return freed heap pages to the system (glibc only; a no-op elsewhere)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(frozen=True)
class AdmissionState:
    """A snapshot for health, logs and tests."""

    busy: int
    queued: int
    max_concurrent: int
    max_queued: int
    rss_bytes: int
    max_rss_bytes: int

    @property
    def saturated(self) -> bool:
        """True when a new heavy call would be refused at once."""
        return self.queued >= self.max_queued or self.over_memory

    @property
    def over_memory(self) -> bool:
        return 0 < self.max_rss_bytes <= self.rss_bytes


class HeavyWorkLimiter:
    """``max_concurrent`` slots, a queue of at most ``max_queued`` (None: unbounded),
    waits bounded from arrival, and an RSS ceiling (``max_rss_bytes``; 0: none; ``AUTO``:
    see ``rss_ceiling``)."""

    def __init__(self, max_concurrent: int, queue_timeout_s: float,
                 max_queued: int | None = None, max_rss_bytes: int = 0,
                 trim_memory: bool = True) -> None:
        self.max_concurrent = max_concurrent
        self.queue_timeout_s = queue_timeout_s
        self.max_queued = max_queued
        self.max_rss_bytes = rss_ceiling(max_rss_bytes)
        self._cond = threading.Condition()
        self._busy = 0
        self._queued = 0
        self.refused = 0  # admission refusals so far (for benchmarks and operators)
        self._mean_hold_s = 1.0  # running mean of how long a heavy call holds its slot
        self._trim = threading.Event()
        if trim_memory and _MALLOC_TRIM is not None:
            threading.Thread(target=self._trimmer, name="malloc-trim", daemon=True).start()

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def queued(self) -> int:
        return self._queued

    def state(self) -> AdmissionState:
        return AdmissionState(self._busy, self._queued, self.max_concurrent,
                              self.max_queued if self.max_queued is not None else 1 << 30,
                              rss_bytes() if self.max_rss_bytes else 0, self.max_rss_bytes)

    def retry_after_s(self) -> float:
        """How long until a slot is likely free: the queue ahead, served at the mean
        hold time by ``max_concurrent`` slots (0.1 s to 30 s)."""
        ahead = self._queued + max(0, self._busy - self.max_concurrent + 1)
        estimate = self._mean_hold_s * (ahead + 1) / self.max_concurrent
        return round(min(30.0, max(0.1, estimate)), 2)

    def _refuse(self, why: str) -> Saturated:
        self.refused += 1
        hint = self.retry_after_s()
        return Saturated(f"server busy: {why}; retry in about {hint:g} s", hint)

    @contextmanager
    def slot(self, timeout_s: float | None = None) -> Iterator[None]:
        """Hold one slot for the body; raises Saturated when none frees up within the
        queue timeout, counted from the RPC's arrival (``ARRIVAL``) when known."""
        now = time.monotonic()
        arrived = ARRIVAL.get() or now
        limit = self.queue_timeout_s if timeout_s is None else max(0.0, timeout_s)
        rss = rss_bytes() if self.max_rss_bytes else 0
        if self.max_rss_bytes and rss >= self.max_rss_bytes:
            raise self._refuse(f"memory in use {rss / 2**30:.2f} GiB is at the limit of "
                               f"{self.max_rss_bytes / 2**30:.2f} GiB")
        with self._cond:
            if self._busy >= self.max_concurrent:
                if self.max_queued is not None and self._queued >= self.max_queued:
                    raise self._refuse(f"all {self.max_concurrent} heavy-work slots in use and "
                                       f"{self._queued} calls already queued")
                self._queued += 1
                try:
                    got = self._cond.wait_for(
                        lambda: self._busy < self.max_concurrent,
                        max(0.0, arrived + limit - time.monotonic()))
                finally:
                    self._queued -= 1
                if not got:
                    raise self._refuse(
                        f"waited {time.monotonic() - arrived:.2f} s since arrival (limit "
                        f"{limit:g} s) for one of {self.max_concurrent} heavy-work slots")
            self._busy += 1
        started = time.monotonic()
        try:
            yield
        finally:
            held = time.monotonic() - started
            with self._cond:
                self._busy -= 1
                self._mean_hold_s = 0.8 * self._mean_hold_s + 0.2 * held
                idle = self._busy == 0
                self._cond.notify()
            if idle:
                self._trim.set()

    def _trimmer(self) -> None:
        while True:
            self._trim.wait()
            self._trim.clear()
            # calls stopped by a deadline leave reference cycles (exception, traceback,
            # frames holding tensors) that only the cycle collector frees; they are young,
            # and a young collection takes well under a millisecond (a full one ~0.1 s
            # of held GIL, which the next call would wait for)
            gc.collect(1)
            release_free_memory()


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
