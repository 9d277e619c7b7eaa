"""Read replicas survive a kill: a writer, three replicas over published snapshots,
a round-robin client over their static addresses, one replica SIGKILLed mid-run.

The writer is the session's test server (its gallery filled through ImportGallery);
``deploy/gallery_snapshot.py`` publishes its gallery; three ``phenolens serve``
processes follow the published snapshots (``gallery.follow_snapshots``). 200
Explain calls go round-robin over the replicas from four threads while one replica
is killed with SIGKILL: every call succeeds (the client retries UNAVAILABLE on
another replica) with the same ranking. A later write on the writer reaches the
surviving replicas once the next snapshot is published.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import phenolens
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.service.conftest import READ_TOKEN

REPO = Path(__file__).resolve().parents[2]
CALLS = 200
THREADS = 4
KILL_AFTER = 50  # calls completed before one replica is killed


def _snapshot_tool():
    spec = importlib.util.spec_from_file_location("gallery_snapshot",
                                                  REPO / "deploy" / "gallery_snapshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_replica(folder: Path, snapshots: Path) -> tuple[subprocess.Popen, int]:
    folder.mkdir(parents=True)
    port = _free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "shutdown_grace_s": 1,
        "gallery": {"path": str(folder / "gallery.sqlite"),
                    "follow_snapshots": str(snapshots), "follow_interval_s": 0.5},
        "auth": {"tokens": [{"name": "reader", "scopes": ["read"], "token": READ_TOKEN}]},
        "runtime": {"torch_threads": 1},
        "limits": {"queue_timeout_s": 30.0},
        "log": {"level": "WARNING"},
    }
    (folder / "phenolens.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "client"), str(REPO),
                                          os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(folder / "phenolens.yaml")],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "log.jsonl", "w"))
    return process, port


def _wait_serving(port: int, process: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            assert process.poll() is None, f"replica on {port} exited with {process.returncode}"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.5)
    raise AssertionError(f"replica on {port} not serving after {timeout} s")


def _ranking(result) -> tuple[str, ...]:
    return tuple(h.gallery_id for h in result.match.hits)


def test_replicas_survive_a_sigkill_and_follow_published_snapshots(
        server, admin, gallery_ids, aligned_crop, photo_paths, tmp_path):
    tool = _snapshot_tool()
    snapshots = tmp_path / "snapshots"
    tool.publish(server.backend.gallery.path, snapshots)
    replicas = [_start_replica(tmp_path / f"replica-{i}", snapshots) for i in range(3)]
    try:
        started = time.monotonic()
        for process, port in replicas:
            _wait_serving(port, process, timeout=300)
        print(f"3 replicas serving after {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port in replicas)
        results: list[tuple[str, ...]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        killed = threading.Event()
        victim, _ = replicas[1]

        def work(n: int) -> None:
            try:
                with phenolens.Client(target, token=READ_TOKEN, timeout=120,
                                      options=[("grpc.lb_policy_name", "round_robin")]) as c:
                    for _ in range(n):
                        ranking = _ranking(c.explain(aligned_crop, aligned=True, top_k=3,
                                                     photo_maps=False, gallery_crops=False))
                        with lock:
                            results.append(ranking)
                            if len(results) == KILL_AFTER and not killed.is_set():
                                victim.send_signal(signal.SIGKILL)
                                killed.set()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(CALLS // THREADS,))
                   for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        print(f"{len(results)} Explain calls in {time.monotonic() - started:.1f} s, "
              f"one replica SIGKILLed after {KILL_AFTER}; errors: {len(errors)}")
        assert killed.is_set() and victim.wait(10) == -signal.SIGKILL
        assert not errors, errors[:3]
        assert len(results) == CALLS
        assert len(set(results)) == 1, set(results)  # every replica ranks alike
        assert len(results[0]) == 3

        # A write on the writer reaches the surviving replicas after the next publication.
        added = admin.add_image(photo_paths["person_a_2.jpg"], image_id="written-late",
                                subject_id="person_a", syndrome_id="person_a")
        tool.publish(server.backend.gallery.path, snapshots)
        published = time.monotonic()
        for _process, port in (replicas[0], replicas[2]):
            with phenolens.Client(f"127.0.0.1:{port}", token=READ_TOKEN, timeout=30) as c:
                end = time.monotonic() + 30
                while time.monotonic() < end:
                    if any(r.image_id == "written-late" for r in c.iter_images()):
                        break
                    time.sleep(0.3)
                else:
                    raise AssertionError(f"replica on {port} never saw the new image")
                assert c.get_image(added.gallery_id).record.image_id == "written-late"
        print(f"the write reached both surviving replicas {time.monotonic() - published:.1f} s "
              "after publication")
    finally:
        for process, _ in replicas:
            if process.poll() is None:
                process.terminate()
        for process, _ in replicas:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        admin.delete_images(image_ids=["written-late"], missing_ok=True)
