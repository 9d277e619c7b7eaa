"""Cost budget, time limit and cancellation of one explanation call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from explain.errors import BudgetExceeded, Cancelled, TimeLimitExceeded

CancelSignal = threading.Event | Callable[[], bool] | None

DEFAULT_BUDGET = 1024  # forward passes (images through the encoder) per call
DEFAULT_TIME_LIMIT_S = 60.0


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
