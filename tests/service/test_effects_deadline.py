"""Region effects under a deadline, on a real server: they obey it like every method."""

from __future__ import annotations

import time

import phenolens

from explain.effects import forget_query_edits
from tests.service.conftest import READ_TOKEN, start_server, wait_for


def test_region_effects_stop_within_half_a_second_of_their_deadline(
        backend, tmp_path, aligned_crop, gallery_ids):
    running = start_server(backend, tmp_path, limits={"max_concurrent": 1,
                                                      "queue_timeout_s": 0.5})
    try:
        with phenolens.Client(running.address, token=READ_TOKEN,
                              retry=phenolens.Retry(attempts=1)) as c:
            def explain(timeout: float) -> None:
                forget_query_edits()  # the query's own edits are made again every call
                c.explain(aligned_crop, aligned=True, top_k=5, effects=5,
                          methods=["similarity"], photo_maps=False, timeout=timeout)

            c.explain(aligned_crop, aligned=True, top_k=1, effects=1, methods=["similarity"],
                      photo_maps=False, timeout=120)  # measures the rate of an edit batch
            t0 = time.monotonic()
            explain(120)
            full = time.monotonic() - t0
            # a deadline well inside the effects' work, on a fast machine or a slow one
            deadline = max(0.2, 0.4 * full)
            started = time.monotonic()
            try:
                explain(deadline)
                finished = True
            except phenolens.DeadlineExceeded:
                finished = False
            wait_for(lambda: not (backend.activity.active or running.limiter.busy), 30)
            overrun = time.monotonic() - started - deadline
            print(f"region effects: {full:.2f} s in full; work left {overrun:.3f} s after a "
                  f"{deadline:.2f} s deadline")
            assert not finished
            assert overrun <= 0.5
            assert c.match(aligned_crop, aligned=True, top_k=1, timeout=30).hits
    finally:
        running.stop(grace_s=1.0)
