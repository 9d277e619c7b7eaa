"""Load: 16 concurrent clients x 20 Explain calls, no error, server memory bounded.

Kept affordable on a 2-core machine: the query is an already-aligned crop (no
detection), top_k = 2 and the default (batched, backward-free) methods. The
server runs in this process, so the resident memory measured is the server's
plus the clients'. A warm-up round with the same 16 threads first fills the
per-thread allocator arenas, gRPC buffers and torch caches; the bound is on the
growth over the 320 calls after it (a leak of even 1 MB per call would fail). Heavy
methods under concurrency, their peak and the return to idle: test_memory.py.
"""

from __future__ import annotations

import threading

import phenolens
import psutil

from tests.service.conftest import READ_TOKEN, start_server

CLIENTS = 16
CALLS = 20
WARMUP_CALLS = 3
RSS_GROWTH_LIMIT_MB = 300


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _round(address: str, crop, calls: int) -> tuple[int, list[BaseException]]:
    errors: list[BaseException] = []
    done = [0] * CLIENTS
    barrier = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        try:
            with phenolens.Client(address, token=READ_TOKEN, timeout=300) as c:
                barrier.wait()
                for _ in range(calls):
                    result = c.explain(crop, aligned=True, top_k=2, photo_maps=False)
                    assert len(result.explanations) == 2
                    assert result.explanations[0].map("similarity", "gallery").aligned.shape \
                        == (112, 112)
                    done[i] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    return sum(done), errors


def test_16_clients_x_20_explains_without_error_and_bounded_memory(backend, tmp_path,
                                                                   aligned_crop, gallery_ids):
    # A queue timeout long enough for 16 callers sharing 2 heavy slots on a busy 2-core box.
    running = start_server(backend, tmp_path, limits={"max_concurrent": 2,
                                                      "queue_timeout_s": 120.0})
    try:
        done, errors = _round(running.address, aligned_crop, WARMUP_CALLS)
        assert not errors, errors[:3]
        rss_before = _rss_mb()
        done, errors = _round(running.address, aligned_crop, CALLS)
        rss_after = _rss_mb()
        assert not errors, errors[:3]
        assert done == CLIENTS * CALLS
        assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB, (rss_before, rss_after)
        assert running.limiter.busy == 0 and backend.activity.active == 0
    finally:
        running.stop(grace_s=1.0)
