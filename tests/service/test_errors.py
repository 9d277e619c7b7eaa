"""Each error status provoked for real, and abandoned work that really stops."""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import phenolens
import pytest

from tests.service.conftest import ADMIN_TOKEN, READ_TOKEN, start_server

# An explanation that takes minutes on this CPU: occlusion with a 4-pixel stride is
# ~680 forward passes per side and view, run 4 at a time so that the engine checks
# for cancellation often.
SLOW = {"methods": ["occlusion"], "top_k": 1, "photo_maps": False,
        "method_options": {"occlusion": {"patch": 8, "stride": 4, "batch_size": 4}}}


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code


def test_corrupt_image_is_invalid_argument(reader, photo_paths):
    data = photo_paths["astronaut.png"].read_bytes()
    with pytest.raises(phenolens.InvalidArgument) as info:
        reader.encode(data[: len(data) // 3])
    assert "truncated" in info.value.details.lower() or "image" in info.value.details.lower()
    with pytest.raises(phenolens.InvalidArgument):
        reader.match(b"this is not an image at all")


def test_photo_without_a_face_is_invalid_argument(reader):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (90, 140, 200)).save(buf, format="PNG")
    with pytest.raises(phenolens.InvalidArgument) as info:
        reader.match(buf.getvalue())
    assert "no face" in info.value.details


def test_aligned_crop_of_the_wrong_size_is_invalid_argument(reader):
    with pytest.raises(phenolens.InvalidArgument):
        reader.encode(np.zeros((100, 100, 3), np.uint8), aligned=True)


def test_unknown_gallery_id_is_not_found(reader, admin, gallery_ids):
    with pytest.raises(phenolens.NotFound):
        reader.get_image("987654321")
    with pytest.raises(phenolens.NotFound):
        reader.get_image("not-an-id")
    with pytest.raises(phenolens.NotFound):
        admin.delete_images(["987654321"])


def test_unknown_method_and_top_k_over_the_limit_are_invalid_argument(reader, aligned_crop,
                                                                      gallery_ids):
    with pytest.raises(phenolens.InvalidArgument, match="unknown"):
        reader.explain(aligned_crop, aligned=True, methods=["telepathy"])
    with pytest.raises(phenolens.InvalidArgument, match="top_k"):
        reader.match(aligned_crop, aligned=True, top_k=10_000)


def test_view_scheme_mismatch_is_failed_precondition(reader, admin, photo_paths, gallery_ids):
    from phenolens import GalleryRecord, ImportItem

    enc = reader.encode(photo_paths["person_a_2.jpg"])
    with pytest.raises(phenolens.FailedPrecondition, match="view scheme"):
        reader.match(embedding=enc.embedding[:1], view_scheme="iresnet50:orig")
    item = ImportItem(GalleryRecord("", image_id="wrong-scheme", syndrome_id="x"),
                      embedding=enc.embedding, view_scheme="gm_casia:orig,gm_casia:flip")
    with pytest.raises(phenolens.FailedPrecondition):
        admin.import_gallery([item])


def test_missing_or_unknown_token_is_unauthenticated(server, photo_paths):
    with phenolens.Client(server.address) as anonymous:
        with pytest.raises(phenolens.Unauthenticated):
            anonymous.server_info()
    with phenolens.Client(server.address, token="guess") as wrong:
        with pytest.raises(phenolens.Unauthenticated):
            wrong.match(photo_paths["astronaut.png"])


def test_read_token_cannot_write_but_admin_can(reader, admin, aligned_crop, gallery_ids):
    with pytest.raises(phenolens.PermissionDenied, match="admin"):
        reader.add_image(aligned_crop, aligned=True, image_id="not-allowed")
    with pytest.raises(phenolens.PermissionDenied):
        reader.delete_images([gallery_ids["astronaut.png"]])
    with pytest.raises(phenolens.PermissionDenied):
        reader.import_gallery([])
    assert reader.get_image(gallery_ids["astronaut.png"]).record.image_id == "astronaut.png"
    assert admin.gallery_stats().images >= 1  # admin implies read


def test_deadline_is_deadline_exceeded_and_the_explanation_stops(server, backend, aligned_crop,
                                                                 gallery_ids):
    activity = backend.activity
    started, stopped = activity.started, activity.stopped
    with pytest.raises(phenolens.DeadlineExceeded):
        with phenolens.Client(server.address, token=READ_TOKEN) as c:
            # Enough time for the match (an aligned crop: no detection), far too little
            # for the minutes of occlusion work.
            c.explain(aligned_crop, aligned=True, timeout=8.0, **SLOW)
    assert activity.started == started + 1, "the deadline passed before the explanation began"
    # The server-side computation ends soon after the deadline, not minutes later.
    assert activity.wait_idle(timeout=10.0), "explanation still running after the deadline"
    assert activity.stopped == stopped + 1


def test_cancelled_stream_stops_the_explanation(server, backend, aligned_crop, gallery_ids):
    activity = backend.activity
    stopped = activity.stopped
    with phenolens.Client(server.address, token=READ_TOKEN) as c:
        stream = c.explain_stream(aligned_crop, aligned=True, timeout=120, **SLOW)
        first = next(stream)  # the match: the explanation is now computing
        assert isinstance(first, phenolens.MatchResult)
        deadline = time.monotonic() + 10
        while activity.active == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert activity.active == 1
        stream.close()  # the client abandons the call
    assert activity.wait_idle(timeout=10.0), "explanation still running after cancellation"
    assert activity.stopped == stopped + 1


def test_saturated_server_answers_resource_exhausted(backend, tmp_path, aligned_crop,
                                                     gallery_ids):
    running = start_server(backend, tmp_path, limits={"max_concurrent": 1,
                                                      "queue_timeout_s": 0.0})
    try:
        with phenolens.Client(running.address, token=READ_TOKEN) as c:
            stream = c.explain_stream(aligned_crop, aligned=True, timeout=120, **SLOW)
            next(stream)  # holds the only heavy slot while it explains
            assert running.limiter.busy == 1
            with pytest.raises(phenolens.ResourceExhausted, match="busy"):
                c.match(aligned_crop, aligned=True, timeout=30)
            assert c.server_info().api_version  # light calls still answer
            stream.close()
        assert backend.activity.wait_idle(timeout=10.0)
    finally:
        running.stop(grace_s=1.0)


def test_oversized_message_is_refused(backend, tmp_path):
    running = start_server(backend, tmp_path, limits={"max_message_bytes": 64 * 1024})
    try:
        with phenolens.Client(running.address, token=READ_TOKEN) as c:
            with pytest.raises(phenolens.ResourceExhausted):
                c.encode(np.zeros((300, 300, 3), np.uint8))
    finally:
        running.stop(grace_s=1.0)


def test_logs_are_json_without_ids_or_image_bytes(server, reader, admin, photo_paths,
                                                  gallery_ids, server_log):
    reader.match(photo_paths["person_a_2.jpg"], top_k=2)
    with pytest.raises(phenolens.NotFound):
        reader.get_image("424242")
    records = [r for r in server_log() if r.get("msg") == "rpc"]
    methods = {r["method"]: r for r in records}
    match = methods["/phenolens.v1.PhenoLens/Match"]
    assert match["code"] == "OK" and match["duration_ms"] > 0
    assert match["peer"].startswith("ipv") and match["principal"] == "reader"
    assert methods["/phenolens.v1.GalleryAdmin/GetImage"]["code"] == "NOT_FOUND"
    text = repr(server_log())
    for secret in ("person_a", "person_b", "424242", READ_TOKEN, ADMIN_TOKEN,
                   gallery_ids["person_a_1.jpg"] + '"'):
        assert secret not in text


def test_graceful_shutdown_lets_in_flight_calls_finish(backend, tmp_path, aligned_crop,
                                                       gallery_ids):
    running = start_server(backend, tmp_path)
    short = {"methods": ["occlusion"], "top_k": 1, "photo_maps": False,
             "method_options": {"occlusion": {"patch": 56, "stride": 56, "batch_size": 1}}}
    outcome: dict = {}

    def call() -> None:
        with phenolens.Client(running.address, token=READ_TOKEN) as c:
            try:
                outcome["result"] = c.explain(aligned_crop, aligned=True, timeout=120,
                                              **short)
            except phenolens.PhenoLensError as exc:
                outcome["error"] = exc

    worker = threading.Thread(target=call)
    worker.start()
    deadline = time.monotonic() + 20
    while backend.activity.active == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.activity.active == 1
    running.grpc_server.stop(120.0).wait()  # Server.stop, minus closing the shared backend
    worker.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].explanations[0].map("occlusion", "query").aligned.shape == (112, 112)
    with phenolens.Client(running.address, token=READ_TOKEN, timeout=5,
                          retry=phenolens.Retry(attempts=1)) as c:
        with pytest.raises(phenolens.Unavailable):
            c.server_info()


def test_client_retries_unavailable_until_the_server_is_up(backend, tmp_path, gallery_ids):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcome: dict = {}

    def call() -> None:
        retry = phenolens.Retry(attempts=12, base_s=0.2, cap_s=1.0)
        with phenolens.Client(f"127.0.0.1:{port}", token=READ_TOKEN, retry=retry,
                              timeout=10) as c:
            try:
                outcome["info"] = c.server_info()
            except phenolens.PhenoLensError as exc:
                outcome["error"] = exc

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.5)  # the first attempts find nothing listening
    running = start_server(backend, tmp_path, listen=f"127.0.0.1:{port}")
    try:
        worker.join(60)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["info"].api_version == "phenolens.v1"
    finally:
        running.stop(grace_s=1.0)


def test_client_gives_up_with_unavailable_after_its_retries():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with phenolens.Client(f"127.0.0.1:{port}", retry=phenolens.Retry(attempts=2, base_s=0.01),
                          timeout=5) as c:
        with pytest.raises(phenolens.Unavailable):
            c.server_info()
