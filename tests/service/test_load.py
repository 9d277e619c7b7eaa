"""Load: 16 concurrent clients x 20 Explain calls, no error, server memory bounded.

Kept affordable on a 2-core machine: the query is an already-aligned crop (no
detection), top_k = 2 and the default (batched, backward-free) methods. The
server runs in this process, so the resident memory measured is the server's
plus the clients'; the bound is on its growth over the 320 calls.
"""

from __future__ import annotations

import threading

import phenolens

from tests.service.conftest import READ_TOKEN

CLIENTS = 16
CALLS = 20
RSS_GROWTH_LIMIT_MB = 300


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_16_clients_x_20_explains_without_error_and_bounded_memory(server, aligned_crop,
                                                                   gallery_ids):
    errors: list[BaseException] = []
    counts = [0] * CLIENTS
    start = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        try:
            with phenolens.Client(server.address, token=READ_TOKEN, timeout=120) as c:
                start.wait()
                for _ in range(CALLS):
                    result = c.explain(aligned_crop, aligned=True, top_k=2, photo_maps=False)
                    assert len(result.explanations) == 2
                    counts[i] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    c0 = phenolens.Client(server.address, token=READ_TOKEN)
    c0.explain(aligned_crop, aligned=True, top_k=2, photo_maps=False)  # warm caches
    c0.close()
    rss_before = _rss_mb()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    rss_after = _rss_mb()
    assert not errors, errors[:3]
    assert sum(counts) == CLIENTS * CALLS
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB, (rss_before, rss_after)
    assert server.limiter.busy == 0
