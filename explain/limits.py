"""Cost budget, time limit and cancellation of one explanation call, and batches sized by
the time they take.

A call stops at the first poll after its time limit passes or it is cancelled, so how
late it stops is the length of one batch of work between two polls. ``Guard.batches``
sizes each batch of a cancellable call from the measured seconds per item (remembered per
kind of work across calls, so a call's first batch is sized too, once the server's
warm-up or an earlier call measured it) to take at most ``BATCH_TARGET_S`` and never more
than the time left.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator

from explain.errors import BudgetExceeded, Cancelled, TimeLimitExceeded

CancelSignal = threading.Event | Callable[[], bool] | None

DEFAULT_BUDGET = 1024  # forward passes (images through the encoder) per call
DEFAULT_TIME_LIMIT_S = 60.0
# Longest batch between two polls: a late or cancelled call stops at most about this long
# after its limit (the target is 0.25 s on CPU, polling and scheduling included).
BATCH_TARGET_S = 0.1

_SECONDS_PER_ITEM: dict[str, float] = {}  # kind of work -> measured seconds per item
_MEASURED = threading.Lock()


def seconds_per_item(kind: str) -> float | None:
    """The measured seconds one item of ``kind`` takes (None until measured)."""
    return _SECONDS_PER_ITEM.get(kind)


def _measured(kind: str, seconds: float, items: int) -> None:
    per_item = seconds / max(items, 1)
    with _MEASURED:
        old = _SECONDS_PER_ITEM.get(kind)
        # a slower batch counts at once (the machine got busy), a faster one gradually
        _SECONDS_PER_ITEM[kind] = per_item if old is None or per_item > old else \
            0.7 * old + 0.3 * per_item


class Guard:
    """Counts forward passes and stops a call that runs out of budget, time, or is cancelled.

    Created inside each call (request-scoped); ``spend(n)`` is called before
    every batch of n images goes through the encoder.
    """

    def __init__(
        self,
        budget: int | None = None,
        time_limit: float | None = None,
        cancel: CancelSignal = None,
    ) -> None:
        if budget is not None and budget < 1:
            raise BudgetExceeded(f"budget must be at least 1 forward pass, got {budget}")
        self.budget = budget
        self.time_limit = time_limit
        self.cancel = cancel
        self.started = time.monotonic()
        self.used = 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self) -> None:
        cancel = self.cancel
        if cancel is not None and (cancel.is_set() if isinstance(cancel, threading.Event) else cancel()):
            raise Cancelled("explanation cancelled by the caller")
        if self.time_limit is not None and self.elapsed > self.time_limit:
            raise TimeLimitExceeded(
                f"explanation stopped after {self.elapsed:.2f} s (limit {self.time_limit:g} s)"
            )

    @property
    def time_left(self) -> float | None:
        return None if self.time_limit is None else self.time_limit - self.elapsed

    def batch_size(self, kind: str, most: int) -> int:
        """How many items of ``kind`` (e.g. "sface/112x112/forward") go in the next batch,
        1..``most``. A call that can be cancelled (a server's) gets as many as take
        ``BATCH_TARGET_S`` and fit in the time left at the measured rate (1 until it is
        measured). A call that cannot be cancelled gets ``most`` unless a batch that size
        would outlast its time limit: fixed batches, so the same call gives bit-identical
        maps (batch composition changes float32 sums in the last digits)."""
        per_item = _SECONDS_PER_ITEM.get(kind)
        left = self.time_left
        if most <= 1:
            return 1
        if self.cancel is None:
            if per_item is None or left is None or most * per_item <= left:
                return most
            return max(1, min(most, math.floor(max(left, 0.0) / max(per_item, 1e-6))))
        if per_item is None:
            return 1
        span = BATCH_TARGET_S if left is None else min(BATCH_TARGET_S, max(left, 0.0))
        return max(1, min(most, math.floor(span / max(per_item, 1e-6))))

    def batches(self, total: int, kind: str, most: int) -> Iterator[slice]:
        """Slices of ``range(total)`` in batches sized by ``batch_size(kind, most)``, each
        timed (from yield to the next request) to keep the rate of ``kind`` measured."""
        at = 0
        while at < total:
            size = min(self.batch_size(kind, most), total - at)
            started = time.monotonic()
            yield slice(at, at + size)
            _measured(kind, time.monotonic() - started, size)
            at += size

    def timed(self, kind: str, items: int) -> _Timed:
        """``with guard.timed(kind, n):`` measures one batch of n items of ``kind`` run
        elsewhere (e.g. inside captum), for later ``batch_size`` calls."""
        return _Timed(kind, items)

    def require(self, passes: int, what: str) -> None:
        """Refuse up front a call whose planned cost is over the budget."""
        if self.budget is not None and passes > self.budget:
            raise BudgetExceeded(
                f"{what} needs {passes} forward passes; the budget is {self.budget}"
            )

    def spend(self, passes: int) -> None:
        self.check()
        self.used += passes
        if self.budget is not None and self.used > self.budget:
            raise BudgetExceeded(
                f"used {self.used} forward passes; the budget is {self.budget}"
            )


class _Timed:
    def __init__(self, kind: str, items: int) -> None:
        self.kind, self.items = kind, items

    def __enter__(self) -> _Timed:
        self.started = time.monotonic()
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            _measured(self.kind, time.monotonic() - self.started, self.items)
