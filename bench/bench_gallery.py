"""Gallery benchmark: add time, search latency, recall and memory at 10k / 100k / 1M records.

    .venv/bin/python -m bench.bench_gallery                      # 10k, 100k, 1M
    .venv/bin/python -m bench.bench_gallery --sizes 10000,100000

Records are synthetic 512-d embeddings drawn around N/10 random centres (faces
cluster by person; uniform noise would be a worst case no real gallery has).
Each size runs in its own process so resident memory is that size's alone. Adds
go through ``Gallery.add_many`` (the path imports use), committed in batches.
Latencies are end to end (``Gallery.search_batch``, hit metadata from SQLite
included), the median of several runs, and are compared with a plain numpy
brute force (``X @ q`` + ``argpartition``) over the same normalised vectors in
the same process: "× numpy" > 1 means the gallery is faster.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 10


def _rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size in MiB, from /proc."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 vectors around n/10 centres (a subject's few images around its face)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 10), dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        m = min(step, n - start)
        out[start : start + m] = centres[rng.integers(0, len(centres), m)]
        out[start : start + m] += 0.9 * rng.normal(size=(m, dim)).astype(np.float32)
    return out


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ x.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def _stage(n: int, what: str, since: float) -> None:
    print(f"#   {n:,}: {what} ({time.perf_counter() - since:.0f} s)", file=sys.stderr, flush=True)


def run_one(n: int, dim: int, approx: str, nprobe: int, workdir: Path) -> dict:
    from gallery import Entry, Gallery

    began = time.perf_counter()
    data = synthetic(n, dim, seed=n)
    # queries: new images of gallery subjects (a gallery vector plus fresh noise)
    rng = np.random.default_rng(n + 1)
    queries = data[rng.integers(0, n, 64)] + 0.9 * rng.normal(size=(64, dim)).astype(np.float32)
    path = workdir / f"bench_{n}.db"
    for p in workdir.glob(f"bench_{n}.db*"):
        p.unlink()
    result: dict = {"n": n, "dim": dim, "approx": approx, "nprobe": nprobe}

    gallery = Gallery.open(path, encoder_id="synthetic", view_scheme="synthetic:orig")
    t = time.perf_counter()
    batch = 20_000
    for start in range(0, n, batch):
        entries = [
            Entry(image_id=f"img{i}", subject_id=f"s{i // 3}", syndrome_id=f"SYN{i % 1000}",
                  syndrome_name=f"Syndrome {i % 1000}", views=data[i : i + 1])
            for i in range(start, min(n, start + batch))
        ]
        gallery.add_many(entries, batch_size=batch)
    result["add_s"] = time.perf_counter() - t
    _stage(n, "added", began)
    result["rss_after_add_mib"] = _rss_mib()[0]

    data /= np.linalg.norm(data, axis=1, keepdims=True)
    normalised = data
    q1, q64 = queries[:1, None, :], queries[:, None, :]
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    repeats = 9 if n <= 100_000 else 5

    exact_hits = gallery.search_batch(q64, K)
    truth = [{h.gallery_id for h in hits} for hits in exact_hits]
    result["exact_1_ms"] = 1e3 * _median_time(lambda: gallery.search_batch(q1, K), repeats)
    result["exact_64_ms"] = 1e3 * _median_time(lambda: gallery.search_batch(q64, K), repeats)
    result["numpy_1_ms"] = 1e3 * _median_time(lambda: numpy_topk(normalised, qn[:1], K), repeats)
    result["numpy_64_ms"] = 1e3 * _median_time(lambda: numpy_topk(normalised, qn, K), repeats)
    # gallery ids are 1 + row index here (fresh gallery, AUTOINCREMENT from 1)
    np_ids = numpy_topk(normalised, qn, K) + 1
    result["exact_recall_vs_numpy"] = float(np.mean(
        [len(t & set(row.tolist())) / K for t, row in zip(truth, np_ids, strict=True)]))
    normalised = data = None
    _stage(n, "exact searches and numpy done", began)

    t = time.perf_counter()
    approximate = Gallery.open(path, index=approx, nprobe=nprobe)
    result["approx_build_s"] = time.perf_counter() - t
    _stage(n, f"{approx} built", began)
    result["approx_effective"] = approximate.index_effective_factory
    found = approximate.search_batch(q64, K)
    result["approx_recall10"] = float(np.mean(
        [len(t & {h.gallery_id for h in f}) / K for t, f in zip(truth, found, strict=True)]))
    result["approx_1_ms"] = 1e3 * _median_time(lambda: approximate.search_batch(q1, K), repeats)
    result["approx_64_ms"] = 1e3 * _median_time(lambda: approximate.search_batch(q64, K), repeats)
    result["rss_mib"], result["peak_rss_mib"] = _rss_mib()
    approximate.close(save_index=False)
    gallery.close(save_index=False)
    result["db_mib"] = path.stat().st_size / 2**20
    for p in workdir.glob(f"bench_{n}.db*"):
        p.unlink()
    return result


def default_nlist(n: int) -> int:
    """About √N lists, a power of two, with the 39 training vectors per list FAISS asks
    for (4·√N = 4096 lists took 17 minutes to build at 1M on the shared 2-core machine and
    needed nprobe far above 16)."""
    nlist = 2 ** round(math.log2(max(16, math.sqrt(n))))
    while nlist > 16 and 39 * nlist > n:
        nlist //= 2
    return int(min(4096, nlist))


def table(rows: list[dict]) -> str:
    head = (
        "| records | add (s) | add (rec/s) | exact 1q (ms) | exact 64q (ms) | numpy 1q (ms) | numpy 64q (ms) "
        "| exact × numpy 1q / 64q | approx index | build (s) | approx 1q (ms) | approx 64q (ms) "
        "| approx × numpy 1q / 64q | recall@10 | RSS (MiB) | peak RSS (MiB) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['add_s']:.1f} | {r['n'] / r['add_s']:,.0f} | {r['exact_1_ms']:.2f} "
            f"| {r['exact_64_ms']:.1f} | {r['numpy_1_ms']:.2f} | {r['numpy_64_ms']:.1f} "
            f"| {r['numpy_1_ms'] / r['exact_1_ms']:.2f} / {r['numpy_64_ms'] / r['exact_64_ms']:.2f} "
            f"| {r['approx_effective']} nprobe={r['nprobe']} | {r['approx_build_s']:.1f} "
            f"| {r['approx_1_ms']:.2f} | {r['approx_64_ms']:.1f} "
            f"| {r['numpy_1_ms'] / r['approx_1_ms']:.1f} / {r['numpy_64_ms'] / r['approx_64_ms']:.1f} "
            f"| {r['approx_recall10']:.3f} | {r['rss_mib']:,.0f} | {r['peak_rss_mib']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_gallery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated record counts")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--approx", default=None, help="approximate factory (default IVF<4√N>,Flat)")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="where the SQLite files go")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one:
        approx = args.approx or f"IVF{default_nlist(args.one)},Flat"
        print(json.dumps(run_one(args.one, args.dim, approx, args.nprobe, workdir)))
        return 0
    rows: list[dict] = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        cmd = [sys.executable, "-m", "bench.bench_gallery", "--one", str(n), "--dim", str(args.dim),
               "--nprobe", str(args.nprobe), "--workdir", str(workdir)]
        if args.approx:
            cmd += ["--approx", args.approx]
        t = time.perf_counter()
        # Passive OpenMP waits: spinning FAISS threads collapse on a shared, busy CPU.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env,
                             cwd=Path(__file__).resolve().parents[1])
        if out.returncode != 0:
            break
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"# {n:,} records done in {time.perf_counter() - t:.0f} s: {json.dumps(rows[-1])}",
              file=sys.stderr, flush=True)
    print(f"Gallery benchmark ({args.dim}-d synthetic records, k={K}, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f})\n")
    print(table(rows))
    return 0 if len(rows) == len(args.sizes.split(",")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
