"""Guard's batches are sized by the time they take, within the time left (issue 22)."""

from __future__ import annotations

import time

import pytest

from explain import limits
from explain.errors import Cancelled, TimeLimitExceeded
from explain.limits import BATCH_TARGET_S, Guard


@pytest.fixture()
def kind(request) -> str:
    name = f"test/{request.node.name}"
    yield name
    limits._SECONDS_PER_ITEM.pop(name, None)


def _cancellable(**kw) -> Guard:
    return Guard(cancel=lambda: False, **kw)


def test_an_unmeasured_kind_starts_a_cancellable_call_with_batches_of_one(kind):
    assert _cancellable().batch_size(kind, 32) == 1
    assert [s.stop - s.start for s in _cancellable().batches(3, kind, 32)][:1] == [1]


def test_batches_hold_the_target_time_at_the_measured_rate(kind):
    limits._measured(kind, 0.01 * 4, 4)  # 10 ms an item
    assert _cancellable().batch_size(kind, 32) == round(BATCH_TARGET_S / 0.01)
    assert _cancellable().batch_size(kind, 4) == 4  # never above the method's largest batch
    limits._measured(kind, 0.5, 1)  # the machine got busy: counts at once
    assert _cancellable().batch_size(kind, 32) == 1


def test_a_batch_never_outlasts_the_time_left(kind):
    limits._measured(kind, 0.001, 1)  # 1 ms an item: 100 per target batch
    guard = _cancellable(time_limit=0.02)
    assert 1 <= guard.batch_size(kind, 1000) <= 20
    time.sleep(0.03)
    assert guard.batch_size(kind, 1000) == 1  # past the limit: one more poll, then stop


def test_a_call_that_cannot_be_cancelled_keeps_full_batches_within_its_limit(kind):
    limits._measured(kind, 0.01, 1)  # 10 ms an item
    assert Guard().batch_size(kind, 32) == 32  # the same batches, the same maps, every call
    assert Guard(time_limit=60).batch_size(kind, 32) == 32
    assert Guard(time_limit=0.1).batch_size(kind, 32) <= 10  # but never past its limit


def test_batches_cover_the_range_once_and_measure_the_rate(kind):
    covered = []
    for part in _cancellable().batches(10, kind, 4):
        time.sleep(0.002 * (part.stop - part.start))
        covered.extend(range(10)[part])
    assert covered == list(range(10))
    assert limits.seconds_per_item(kind) == pytest.approx(0.002, abs=0.05)


def test_the_guard_stops_between_batches_when_late_or_cancelled(kind):
    guard = Guard(time_limit=0.0)
    with pytest.raises(TimeLimitExceeded):
        for _ in guard.batches(10, kind, 4):
            time.sleep(0.001)
            guard.check()
    cancelled = Guard(cancel=lambda: True)
    with pytest.raises(Cancelled):
        cancelled.spend(1)
