"""Timing shared by the benches."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_interleaved(fns: dict[str, Callable[[], object]], calls: int,
                     warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of ``calls`` calls of each function, after ``warmup`` untimed rounds. Each
    round calls every function once, so load drifts hit them all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return out
