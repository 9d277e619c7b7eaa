"""Service latency: p50/p95 per call type against a real server on loopback.

    .venv/bin/python -m bench.bench_service                  # 30 calls per type
    .venv/bin/python -m bench.bench_service --calls 50 --json

A server is started in this process on a free loopback port (real SFace, MTCNN,
SQLite + FAISS gallery of the bundled photos and their mirrored aligned crops,
imported through ImportGallery)
and driven by the Python client, one call at a time after 3 warm-up calls:

- Encode: a photo (decode + MTCNN detection + alignment + 2 views of SFace);
- Encode (aligned): an already-aligned 112x112 crop (no detection);
- Match: the photo, top 10 images + syndrome and gene rankings;
- Explain: the photo, top 3, default methods (similarity + Grad-CAM) with query
  photo maps and gallery crops;
- ExplainStream first message: time until the MatchResponse event arrives;
- ExplainStream all: time until the last explained match arrives;
- Explain top 3 / top 10, cached vs uncached: the same call against a server
  that keeps the hits' feature maps (``explain.feature_cache_size``, default)
  and one that encodes the hits on every call (size 0), from a photo and from
  an aligned crop (no detection: the difference is the hit forwards); these
  eight are timed interleaved, one call of each per round.
- Explain top 10 from the feature store ("store", issue 15 item 3): a server
  without the in-memory cache over the same gallery, so every call reads the hits'
  features from the store filled at import, as a freshly started server does
  (cold; the store's pages are in the OS cache after the first call); against
  "cached" (warm, the in-memory cache) and "uncached" (no store, hits encoded),
  timed in the same interleaved rounds. Printed with the store's bytes per image,
  and Explain of a photo against its aligned crop plus detection (Encode photo
  minus Encode aligned crop, both also timed in those rounds): target <= 1.5x.

Latency includes gRPC, protobuf and the client's conversion to numpy. On a
shared machine the numbers move with the load: the load average is printed.

``--load`` measures reliability under load instead (issue 14), against a server
with the default admission settings (2 heavy slots, a queue of 14, 2 s from
arrival, 2 GiB RSS ceiling):

- the admission curve: 1, 4, 16 and 64 concurrent clients, each calling Explain
  (aligned crop, top 3, default methods) for ``--seconds`` with the client's
  default retries (backoff + jitter, honouring the server's hint) and a 30 s
  deadline: throughput (explains/s), p50/p95 of successful calls, the fraction
  of calls that failed even after retries, and server-side refusals per call;
- health latency (liveness Check) sampled during the 64-client run;
- memory: RSS idle, peak under 16 clients running integrated_gradients, and
  settled 5..30 s after the load (the server and its clients share this
  process, so the figures include the clients).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.timing import time_interleaved

QUERY = "person_a_2.jpg"
ALIGNED = "Tom_Hanks_54745.png"
BENCH_TOKEN = "bench-admin-token"  # a loopback server of this process only


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return 1000.0 * float(np.percentile(ordered, q))

    return {"p50_ms": round(at(50), 1), "p95_ms": round(at(95), 1),
            "mean_ms": round(1000.0 * statistics.fmean(ordered), 1), "n": len(ordered)}


def _time(fn: Callable[[], object], calls: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _bench_config(threads: int | None):
    """A loopback server's configuration over a fresh gallery file, with an admin token."""
    from server.config import load_config
    from server.logs import setup_logging

    setup_logging("ERROR")
    tmp = Path(tempfile.mkdtemp(prefix="phenolens-bench-"))
    return load_config(None, env={}, listen="127.0.0.1:0",
                       gallery={"path": str(tmp / "bench.sqlite")},
                       runtime={"torch_threads": threads} if threads else {},
                       auth={"tokens": [{"name": "bench", "scopes": ["admin"],
                                         "token": BENCH_TOKEN}]},
                       log={"level": "WARNING"})


def _sharing(backend, config, **extra):
    """A Backend over ``backend``'s models and gallery, with another configuration."""
    from server.backend import Backend

    return Backend(config, pipeline=backend.pipeline, views=backend.views,
                   gallery=backend.gallery, explainer=backend.explainer,
                   encoder_id=backend.encoder_id, view_scheme=backend.view_scheme,
                   encoders=backend.encoders, **extra)


def run(calls: int, threads: int | None) -> dict:
    import phenolens
    from PIL import Image

    from encoder.assets import PHOTOS, photo
    from server.app import start
    from server.backend import Backend

    config = _bench_config(threads)
    t0 = time.perf_counter()
    backend = Backend.from_config(config)
    backend.warm_up()
    server = start(config, backend=backend)
    startup_s = time.perf_counter() - t0
    uncached_config = dataclasses.replace(config, explain=dataclasses.replace(
        config.explain, feature_cache_size=0))
    uncached = start(uncached_config, backend=_sharing(backend, uncached_config))
    # no in-memory cache: every call reads the store
    from_store = _sharing(backend, uncached_config, feature_store=backend.feature_store)
    stored = start(uncached_config, backend=from_store)
    try:
        with phenolens.Client(server.address, token=BENCH_TOKEN, timeout=300) as client, \
                phenolens.Client(uncached.address, token=BENCH_TOKEN, timeout=300) as plain, \
                phenolens.Client(stored.address, token=BENCH_TOKEN, timeout=300) as cold:
            singles = [p for p in PHOTOS if p.faces == 1 and p.name != QUERY]
            items = [phenolens.ImportItem(
                phenolens.GalleryRecord("", image_id=p.name, subject_id=p.person,
                                        syndrome_id=p.person), image=p.path, aligned=p.aligned)
                for p in singles]
            items += [phenolens.ImportItem(
                phenolens.GalleryRecord("", image_id=f"mirrored-{p.name}", subject_id=p.person,
                                        syndrome_id=p.person),
                image=np.ascontiguousarray(client.encode(p.path, aligned=p.aligned,
                                                         return_crop=True)
                                           .aligned_crop()[:, ::-1]), aligned=True)
                for p in singles]
            client.import_gallery(items)
            query = photo(QUERY).read_bytes()
            crop = np.asarray(Image.open(photo(ALIGNED)).convert("RGB"))

            def stream_first() -> None:
                events = client.explain_stream(query, top_k=3)
                next(events)
                events.close()

            def stream_all() -> None:
                for _ in client.explain_stream(query, top_k=3):
                    pass

            cases = {
                "Encode (photo)": lambda: client.encode(query),
                "Encode (aligned crop)": lambda: client.encode(crop, aligned=True),
                "Match (photo, top 10)": lambda: client.match(query, top_k=10),
                "Explain (photo, top 3)": lambda: client.explain(query, top_k=3),
                "ExplainStream first message": stream_first,
                "ExplainStream all (top 3)": stream_all,
            }
            results = {name: _percentiles(_time(fn, calls)) for name, fn in cases.items()}
            # Detection (Encode photo minus Encode aligned crop) timed in the same rounds as the
            # Explain calls it is compared with, so a change of load hits both sides alike.
            paired = {"Encode photo (paired)": lambda: client.encode(query),
                      "Encode crop (paired)": lambda: client.encode(crop, aligned=True)}
            for k in (3, 10):
                for source, kwargs in (("photo", {}), ("crop", {"aligned": True})):
                    image = query if source == "photo" else crop
                    clients = [("cached", client), ("uncached", plain)]
                    if k == 10:
                        clients.append(("store", cold))
                    for label, c in clients:
                        paired[f"Explain {source} top {k} {label}"] = \
                            lambda c=c, k=k, image=image, kwargs=kwargs: \
                            c.explain(image, top_k=k, **kwargs)
            results.update({name: _percentiles(samples) for name, samples
                            in time_interleaved(paired, calls).items()})
            info = client.server_info()
            features = backend.feature_store
            store = {"images": len(features),
                     "bytes_per_image": features.layout.bytes_per_image,
                     "hit_encodes_of_store_server": from_store.activity.hit_encodes,
                     "hit_faces_read_from_store": from_store.activity.store_reads}
    finally:
        stored.stop(grace_s=1.0)
        uncached.stop(grace_s=1.0)
        server.stop(grace_s=1.0)
        backend.close()
    import torch

    return {
        "server_start_s": round(startup_s, 2),
        "encoder_id": info.encoder_id, "view_scheme": info.view_scheme,
        "gallery_size": info.gallery_size, "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "latency": results,
        "feature_store": store,
    }


def _rss() -> int:
    """This process's resident set size in bytes (read directly, so the bench also runs
    against older trees for before/after figures)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _drive(address: str, clients: int, seconds: float, call) -> dict:
    """``clients`` threads each calling ``call(client)`` until ``seconds`` pass."""
    import threading

    import phenolens

    lat: list[float] = []
    failed: dict[str, int] = {}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker() -> None:
        with phenolens.Client(address, token=BENCH_TOKEN, timeout=30) as c:
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    call(c)
                except phenolens.PhenoLensError as exc:
                    with lock:
                        failed[exc.code.name] = failed.get(exc.code.name, 0) + 1
                    continue
                with lock:
                    lat.append(time.perf_counter() - t)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    total = len(lat) + sum(failed.values())
    row = {"clients": clients, "calls": total, "ok": len(lat),
           "throughput_per_s": round(len(lat) / wall, 2),
           "failed_fraction": round(sum(failed.values()) / max(1, total), 3),
           "failed": failed}
    if lat:
        row.update(_percentiles(lat))
    return row


def _probe_health(address: str, stop, out: list[float]) -> None:
    """Every 0.2 s until ``stop``: one health Check (whole server), its latency to ``out``;
    a probe that fails or takes 2 s counts as 2 s."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        while not stop.wait(0.2):
            t = time.perf_counter()
            try:
                stub.Check(request, timeout=2)
                out.append(time.perf_counter() - t)
            except grpc.RpcError:
                out.append(2.0)


def run_load(seconds: float, threads: int | None) -> dict:
    import threading

    import phenolens
    from PIL import Image

    from encoder.assets import PHOTOS, photo
    from server.app import start
    from server.backend import Backend

    config = _bench_config(threads)
    backend = Backend.from_config(config)
    backend.warm_up()
    server = start(config, backend=backend)
    crop = np.asarray(Image.open(photo(ALIGNED)).convert("RGB"))
    report: dict = {"limits": dataclasses.asdict(config.limits), "curve": []}
    try:
        with phenolens.Client(server.address, token=BENCH_TOKEN, timeout=300) as admin:
            admin.import_gallery([phenolens.ImportItem(
                phenolens.GalleryRecord("", image_id=p.name, subject_id=p.person,
                                        syndrome_id=p.person), image=p.path, aligned=p.aligned)
                for p in PHOTOS if p.faces == 1])

            def explain(c) -> None:
                c.explain(crop, aligned=True, top_k=3, photo_maps=False, gallery_crops=False)

            explain(admin)
            for clients in (1, 4, 16, 64):
                refused = getattr(server.limiter, "refused", 0)
                health: list[float] = []
                stop = threading.Event()
                prober = threading.Thread(target=_probe_health,
                                          args=(server.address, stop, health))
                prober.start()
                row = _drive(server.address, clients, seconds, explain)
                stop.set()
                prober.join()
                row["server_refusals_per_call"] = round(
                    (getattr(server.limiter, "refused", 0) - refused) / max(1, row["calls"]), 2)
                row["health_ms"] = _percentiles(health) if health else {}
                report["curve"].append(row)
            time.sleep(5)
            idle = _rss()
            peak = [idle]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.05):
                    peak[0] = max(peak[0], _rss())

            sampler = threading.Thread(target=sample)
            sampler.start()
            heavy = _drive(server.address, 16, seconds, lambda c: c.explain(
                crop, aligned=True, top_k=1, methods=["integrated_gradients"],
                photo_maps=False, gallery_crops=False))
            stop.set()
            sampler.join()
            after = time.monotonic()
            settled = {}
            for mark in (5, 10, 20, 30):
                time.sleep(max(0.0, after + mark - time.monotonic()))
                settled[f"{mark}s"] = round(_rss() / 2**20)
            report["memory"] = {"idle_mb": round(idle / 2**20), "peak_mb": round(peak[0] / 2**20),
                                "settled_mb": settled, "limit_mb": round(
                                    getattr(server.limiter, "max_rss_bytes", 0) / 2**20),
                                "heavy_run": heavy}
    finally:
        server.stop(grace_s=1.0)
        backend.close()
    report["load_average"] = os.getloadavg()
    report["cpus"] = os.cpu_count()
    return report


def print_load(report: dict) -> None:
    print(f"PhenoLens under load: {report['cpus']} CPUs (shared), load average "
          f"{report['load_average'][0]:.1f}; Explain top 3 of an aligned crop, default methods")
    print(f"{'clients':>7} {'calls':>6} {'expl/s':>7} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'failed':>7} {'refusals/call':>13} {'health p50/p95 ms':>18}")
    for r in report["curve"]:
        h = r["health_ms"]
        print(f"{r['clients']:>7} {r['calls']:>6} {r['throughput_per_s']:>7.2f} "
              f"{r.get('p50_ms', float('nan')):>8.0f} {r.get('p95_ms', float('nan')):>8.0f} "
              f"{r['failed_fraction']:>7.1%} {r['server_refusals_per_call']:>13.2f} "
              f"{h.get('p50_ms', float('nan')):>8.1f}/{h.get('p95_ms', float('nan')):<8.1f}")
    m = report["memory"]
    print(f"RSS (MB): idle {m['idle_mb']}, peak under 16 integrated_gradients clients "
          f"{m['peak_mb']} (limit {m['limit_mb']}), settled after load {m['settled_mb']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per type")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in the server")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--load", action="store_true",
                        help="admission curve, health latency and memory under load instead")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="--load: seconds per concurrency level")
    args = parser.parse_args(argv)
    if args.load:
        report = run_load(args.seconds, args.threads)
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        (out / "bench_service_load.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2) if args.json else "", end="")
        if not args.json:
            print_load(report)
        return 0
    report = run(args.calls, args.threads)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_service.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"PhenoLens service latency, {report['encoder_id']} [{report['view_scheme']}], "
          f"gallery of {report['gallery_size']}, {report['cpus']} CPUs, torch threads "
          f"{report['torch_threads']}, load average {report['load_average'][0]:.1f}")
    print(f"{'call':<32} {'p50 ms':>9} {'p95 ms':>9} {'mean ms':>9} {'n':>4}")
    for name, r in report["latency"].items():
        print(f"{name:<32} {r['p50_ms']:>9.1f} {r['p95_ms']:>9.1f} {r['mean_ms']:>9.1f} "
              f"{r['n']:>4}")
    print_store(report)
    return 0


def detection_ms(p50: dict[str, float]) -> float:
    """Detection's share of a photo call: Encode photo minus Encode aligned crop (p50), from
    the calls timed in the Explain calls' interleaved rounds where the report has them."""
    if "Encode photo (paired)" in p50:
        return p50["Encode photo (paired)"] - p50["Encode crop (paired)"]
    return p50["Encode (photo)"] - p50["Encode (aligned crop)"]


def print_store(report: dict) -> None:
    """The feature store's size and the cold/warm/uncached and photo/crop ratios (p50)."""
    p50 = {name: r["p50_ms"] for name, r in report["latency"].items()}
    s = report["feature_store"]
    print(f"feature store: {s['bytes_per_image']:,} B per image ({s['images']} images); "
          f"the store server encoded {s['hit_encodes_of_store_server']} hits, read "
          f"{s['hit_faces_read_from_store']} from the store")
    for source in ("crop", "photo"):
        cold, warm, plain = (p50[f"Explain {source} top 10 {label}"]
                             for label in ("store", "cached", "uncached"))
        print(f"Explain {source} top 10: cold (store) {cold:.1f} ms, warm (cache) {warm:.1f} ms, "
              f"uncached {plain:.1f} ms; cold/warm {cold / warm:.2f}x, uncached/cold "
              f"{plain / cold:.2f}x")
    detection = detection_ms(p50)
    for label in ("cached", "store"):
        photo, crop = p50[f"Explain photo top 10 {label}"], p50[f"Explain crop top 10 {label}"]
        print(f"Explain photo top 10 ({label}) / (crop top 10 + detection {detection:.1f} ms): "
              f"{photo / (crop + detection):.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    raise SystemExit(main())
