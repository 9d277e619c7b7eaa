"""Reliability under load and faults (issue 14), against real servers on loopback.

Health answers at once while
80 clients push heavy work; admission refuses with the real wait and a retry hint,
and the client's retries ride it out within the deadline; memory admission; every
refusal and unknown method gets an access-log line.
"""

from __future__ import annotations

import threading
import time

import grpc
import phenolens
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from phenolens import requests as rq
from phenolens._proto import phenolens_pb2_grpc

from tests.service.conftest import READ_TOKEN, start_server, wait_for

NO_RETRY = phenolens.Retry(attempts=1)
METADATA = (("authorization", f"Bearer {READ_TOKEN}"),)

# Holds a heavy slot for minutes (see test_errors.SLOW).
SLOW = {"methods": ["occlusion"], "top_k": 1, "photo_maps": False,
        "method_options": {"occlusion": {"patch": 8, "stride": 4, "batch_size": 4}}}


def _hold_slot(client: phenolens.Client, crop, running) -> object:
    """Start a slow explanation and return its open stream once it holds a slot."""
    stream = client.explain_stream(crop, aligned=True, timeout=300, **SLOW)
    next(stream)
    assert wait_for(lambda: running.limiter.busy >= 1, 10, poll=0.01)
    return stream


def _health(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


def test_health_answers_fast_while_80_clients_push_heavy_work(
        backend, tmp_path, aligned_crop, gallery_ids):
    running = start_server(backend, tmp_path, limits={"max_concurrent": 2, "max_queued": 14,
                                                      "queue_timeout_s": 2.0, "workers": 24})
    stop = threading.Event()
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    request = rq.explain_request(aligned_crop, aligned=True, top_k=3, methods=(),
                                 photo_maps=False, overlays=False, gallery_crops=False,
                                 feature_maps=False, gallery_ids=(), filters=None,
                                 exclude_subjects=(), method_options=None)

    def heavy_client() -> None:
        with grpc.insecure_channel(running.address) as channel:
            explain = phenolens_pb2_grpc.PhenoLensStub(channel).Explain
            while not stop.is_set():
                try:
                    explain(request, timeout=30, metadata=METADATA)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                with lock:
                    outcomes[code] = outcomes.get(code, 0) + 1
                if code != "OK":
                    stop.wait(0.2)

    threads = [threading.Thread(target=heavy_client, daemon=True) for _ in range(80)]
    latencies: list[float] = []
    readiness: set[int] = set()
    try:
        for t in threads:
            t.start()
        with grpc.insecure_channel(running.address) as probe:
            _health(probe)  # connect
            assert wait_for(lambda: running.limiter.queued >= 10, 30, poll=0.01)
            for _ in range(30):
                started = time.monotonic()
                assert _health(probe, "liveness", timeout=2) == \
                    health_pb2.HealthCheckResponse.SERVING
                latencies.append(time.monotonic() - started)
                readiness.add(_health(probe, "readiness", timeout=2))
                time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        running.stop(grace_s=1.0)
    latencies.sort()
    print(f"health latency at 80 heavy clients: p50 {latencies[len(latencies) // 2] * 1000:.1f} "
          f"ms, max {latencies[-1] * 1000:.1f} ms; outcomes {outcomes}")
    assert outcomes.get("OK", 0) > 0
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert latencies[len(latencies) // 2] < 0.1, latencies
    assert latencies[-1] < 0.5, latencies
    assert health_pb2.HealthCheckResponse.NOT_SERVING in readiness  # saturated: not ready


def test_refusal_states_the_wait_since_arrival_and_a_retry_hint(
        backend, tmp_path, aligned_crop, gallery_ids):
    running = start_server(backend, tmp_path, limits={"max_concurrent": 1, "max_queued": 1,
                                                      "queue_timeout_s": 0.6})
    try:
        with phenolens.Client(running.address, token=READ_TOKEN, retry=NO_RETRY) as c, \
                grpc.insecure_channel(running.address) as channel:
            stream = _hold_slot(c, aligned_crop, running)
            match = phenolens_pb2_grpc.PhenoLensStub(channel).Match
            request = rq.match_request(aligned_crop, aligned=True, top_k=1)
            queued = match.future(request, timeout=30, metadata=METADATA)
            assert wait_for(lambda: running.limiter.queued == 1, 5, poll=0.01)
            # The queue (1) is full: refused at once, saying so.
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as full:
                match(request, timeout=30, metadata=METADATA)
            assert time.monotonic() - started < 0.5
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already queued" in full.value.details()
            assert phenolens.errors.retry_after_s(full.value) > 0
            # The queued call gives up 0.6 s after it arrived, and says how long it waited.
            with pytest.raises(grpc.RpcError) as waited:
                queued.result()
            assert waited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "since arrival (limit 0.6 s)" in waited.value.details()
            assert "retry in about" in waited.value.details()
            assert phenolens.errors.is_admission_refusal(waited.value)
            stream.close()
        assert backend.activity.wait_idle(timeout=10.0)
    finally:
        running.stop(grace_s=1.0)


def test_client_retries_a_busy_server_within_its_deadline(
        backend, tmp_path, aligned_crop, gallery_ids):
    running = start_server(backend, tmp_path, limits={"max_concurrent": 1, "max_queued": 0,
                                                      "queue_timeout_s": 0.0})
    try:
        with phenolens.Client(running.address, token=READ_TOKEN) as c:
            stream = _hold_slot(c, aligned_crop, running)
            # Busy for longer than the deadline: gives up within it, RESOURCE_EXHAUSTED.
            started = time.monotonic()
            with pytest.raises(phenolens.ResourceExhausted):
                c.match(aligned_crop, aligned=True, top_k=1, timeout=2.0)
            assert time.monotonic() - started < 2.5
            # The slot frees after ~1.5 s: the retried call gets through.
            threading.Timer(1.5, stream.close).start()
            result = c.match(aligned_crop, aligned=True, top_k=1, timeout=30)
            assert result.hits
        assert backend.activity.wait_idle(timeout=10.0)
    finally:
        running.stop(grace_s=1.0)


def test_budget_refusal_is_not_retried(reader, aligned_crop, gallery_ids, backend):
    with pytest.raises(phenolens.ResourceExhausted, match="budget") as info:
        reader.explain(aligned_crop, aligned=True, top_k=1, methods=["rise"],
                       method_options={"rise": {"masks": 10_000_000}}, photo_maps=False)
    assert "retry" not in info.value.details


def test_memory_ceiling_refuses_new_heavy_work(backend, tmp_path, aligned_crop, gallery_ids):
    running = start_server(backend, tmp_path, limits={"max_rss_bytes": 1})
    try:
        with phenolens.Client(running.address, token=READ_TOKEN, retry=NO_RETRY) as c:
            with pytest.raises(phenolens.ResourceExhausted, match="memory in use"):
                c.match(aligned_crop, aligned=True)
            assert c.server_info().api_version  # light calls are not limited by memory
            with grpc.insecure_channel(running.address) as channel:
                assert _health(channel, "readiness") == \
                    health_pb2.HealthCheckResponse.NOT_SERVING
                assert _health(channel, "liveness") == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(grace_s=1.0)


def test_readiness_turns_off_while_draining_and_liveness_stays(backend, tmp_path):
    running = start_server(backend, tmp_path)
    try:
        with grpc.insecure_channel(running.address) as channel:
            assert _health(channel, "readiness") == health_pb2.HealthCheckResponse.SERVING
            running.health.enter_graceful_shutdown()
            assert _health(channel, "readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        running.stop(grace_s=1.0)


def test_refusals_and_unknown_methods_get_an_access_log_line(
        backend, tmp_path, aligned_crop, gallery_ids, server_log):
    running = start_server(backend, tmp_path, limits={"max_rss_bytes": 1})
    try:
        with grpc.insecure_channel(running.address) as channel:
            unknown = channel.unary_unary("/phenolens.v1.PhenoLens/NoSuchMethod")
            with pytest.raises(grpc.RpcError) as info:
                unknown(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with phenolens.Client(running.address, token=READ_TOKEN, retry=NO_RETRY) as c:
            with pytest.raises(phenolens.ResourceExhausted):
                c.match(aligned_crop, aligned=True)
    finally:
        running.stop(grace_s=1.0)
    lines = [r for r in server_log() if r["msg"] == "rpc"]
    assert any(r["method"].endswith("/NoSuchMethod") and r["code"] == "UNIMPLEMENTED"
               for r in lines)
    assert any(r["method"].endswith("/Match") and r["code"] == "RESOURCE_EXHAUSTED"
               for r in lines)


def test_warnings_are_json_log_records(server_log):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library complains", UserWarning, stacklevel=1)
    records = server_log()
    assert any("a library complains" in r["msg"] and r["logger"] == "py.warnings"
               for r in records)


def test_mtls_refusal_is_explained_to_a_client_without_certificate(
        backend, tmp_path, pki, gallery_ids):
    running = start_server(backend, tmp_path, listen="localhost:0",
                           tls={"cert": str(pki.folder / "server.pem"),
                                "key": str(pki.folder / "server.key"),
                                "client_ca": str(pki.folder / "ca.pem")})
    try:
        with phenolens.Client(running.address, token=READ_TOKEN, tls=phenolens.TLS(ca=pki.ca),
                              timeout=5, retry=NO_RETRY) as anonymous:
            with pytest.raises(phenolens.Unavailable, match="client certificate"):
                anonymous.gallery_stats()
    finally:
        running.stop(grace_s=1.0)


def test_kubernetes_probes_ask_readiness_and_liveness_separately():
    from pathlib import Path

    import yaml

    k8s = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
    for name in ("deployment.yaml", "writer.yaml"):
        deployment = next(d for d in yaml.safe_load_all((k8s / name).read_text())
                          if d and d.get("kind") == "Deployment")
        server = deployment["spec"]["template"]["spec"]["containers"][0]
        assert server["readinessProbe"]["grpc"]["service"] == "readiness", name
        assert server["livenessProbe"]["grpc"]["service"] == "liveness", name
        env = {e["name"]: e.get("value") for e in server["env"]}
        assert env["MALLOC_ARENA_MAX"] == "2", name


def test_gallery_write_of_a_photo_with_several_faces_names_the_count(admin, photo_paths,
                                                                    gallery_ids):
    from phenolens import GalleryRecord

    before = admin.gallery_stats().images
    with pytest.raises(phenolens.FailedPrecondition, match="6 faces"):
        admin.add_image(photo_paths["t1.jpg"],
                        GalleryRecord("", image_id="group-photo", subject_id="group"))
    assert admin.gallery_stats().images == before


def test_an_oversized_request_gets_an_access_log_line(backend, tmp_path, server_log):
    import numpy as np

    running = start_server(backend, tmp_path, limits={"max_message_bytes": 64 * 1024})
    try:
        with phenolens.Client(running.address, token=READ_TOKEN, retry=NO_RETRY) as c:
            with pytest.raises(phenolens.ResourceExhausted):
                c.encode(np.zeros((300, 300, 3), np.uint8))
        assert wait_for(lambda: any(
            r["msg"] == "rpc" and r["method"].endswith("/Encode") for r in server_log()), 5, poll=0.01)
    finally:
        running.stop(grace_s=1.0)
    line = next(r for r in server_log() if r["msg"] == "rpc" and r["method"].endswith("/Encode"))
    assert line["code"] == "NOT_RECEIVED"


def test_a_gallery_write_may_pick_one_face_of_a_group_photo(admin, photo_paths, gallery_ids):
    from phenolens import GalleryRecord

    before = admin.gallery_stats().images
    with pytest.raises(phenolens.InvalidArgument, match="6 face"):
        admin.add_image(photo_paths["t1.jpg"], GalleryRecord("", image_id="t1-face-9",
                                                             subject_id="t1-9"), face_index=9)
    records = [admin.add_image(photo_paths["t1.jpg"], GalleryRecord(
        "", image_id=f"t1-face-{i}", subject_id=f"t1-{i}"), face_index=i) for i in (0, 3)]
    assert admin.gallery_stats().images == before + 2
    ids = [r.gallery_id for r in records]
    crops = [admin.get_image(gid, include_crop=True).aligned_crop_png for gid in ids]
    assert crops[0] and crops[0] != crops[1]  # two different people of the photo
    admin.delete_images(ids)
