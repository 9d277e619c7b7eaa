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

Latency includes gRPC, protobuf and the client's conversion to numpy. On a
shared machine the numbers move with the load: the load average is printed.
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


def _time_interleaved(fns: dict[str, Callable[[], object]], calls: int,
                      warmup: int = 3) -> dict[str, list[float]]:
    """Each round calls every function once, so load drifts hit them all alike."""
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


def run(calls: int, threads: int | None) -> dict:
    import phenolens
    from PIL import Image

    from encoder.assets import PHOTOS, photo
    from server.app import start
    from server.backend import Backend
    from server.config import load_config
    from server.logs import setup_logging

    setup_logging("ERROR")
    tmp = Path(tempfile.mkdtemp(prefix="phenolens-bench-"))
    config = load_config(None, env={}, listen="127.0.0.1:0",
                         gallery={"path": str(tmp / "bench.sqlite")},
                         runtime={"torch_threads": threads} if threads else {},
                         auth={"tokens": [{"name": "bench", "scopes": ["admin"],
                                           "token": BENCH_TOKEN}]},
                         log={"level": "WARNING"})
    t0 = time.perf_counter()
    backend = Backend.from_config(config)
    backend.warm_up()
    server = start(config, backend=backend)
    startup_s = time.perf_counter() - t0
    uncached_config = dataclasses.replace(config, explain=dataclasses.replace(
        config.explain, feature_cache_size=0))
    uncached = start(uncached_config, backend=Backend(
        uncached_config, pipeline=backend.pipeline, views=backend.views,
        gallery=backend.gallery, explainer=backend.explainer, encoder_id=backend.encoder_id,
        view_scheme=backend.view_scheme, encoders=backend.encoders))
    try:
        with phenolens.Client(server.address, token=BENCH_TOKEN, timeout=300) as client, \
                phenolens.Client(uncached.address, token=BENCH_TOKEN, timeout=300) as plain:
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
            paired = {}
            for k in (3, 10):
                for source, kwargs in (("photo", {}), ("crop", {"aligned": True})):
                    image = query if source == "photo" else crop
                    for label, c in (("cached", client), ("uncached", plain)):
                        paired[f"Explain {source} top {k} {label}"] = \
                            lambda c=c, k=k, image=image, kwargs=kwargs: \
                            c.explain(image, top_k=k, **kwargs)
            results.update({name: _percentiles(samples) for name, samples
                            in _time_interleaved(paired, calls).items()})
            info = client.server_info()
    finally:
        uncached.stop(grace_s=1.0)
        server.stop(grace_s=1.0)
        backend.close()
    import torch

    return {
        "server_start_s": round(startup_s, 2),
        "encoder_id": info.encoder_id, "view_scheme": info.view_scheme,
        "gallery_size": info.gallery_size, "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "latency": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per type")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in the server")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
