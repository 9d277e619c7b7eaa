"""Gallery benchmark: search through the gallery against numpy brute force, the ``auto``
index choice, and recall/latency of the approximate index, per gallery size.

    .venv/bin/python -m bench.bench_gallery                       # 1k, 10k, 100k
    .venv/bin/python -m bench.bench_gallery --sizes 1000000       # once: slow to build
    .venv/bin/python -m bench.bench_gallery --hnsw-only 1000000   # the 1M HNSW sweep alone

Synthetic set (face-like neighbourhoods, 128-d like SFace): identities with unequal
image counts (lognormal, median 3, 1 to 50 images); identity centres drawn from an
anisotropic Gaussian (spectrum 1/√(1+i/8) in a random basis) plus a shared mean
direction (weight 0.4), normalised; each image is its centre plus isotropic noise of
norm U(0.55, 1.0), normalised. Same-identity cosines then fall at about 0.5–0.75 and
impostor cosines at about −0.1–0.25 (5th–95th percentiles, printed per run), like
real face embeddings. Queries are 64 new images of random gallery identities.

Each size runs in its own process. "Gallery" times are end to end (``search_batch``:
query normalisation, index search, hit labels, ``Hit`` objects), medians of
interleaved runs against a plain numpy brute force (``q @ X.T`` + ``argpartition``)
over the same normalised float32 matrix in the same process: "× numpy" ≥ 1 means the
gallery is at least as fast (the target). One-query timings cycle through the 64
queries. Recall@10 of the approximate index is against the exact top 10.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 10
TARGET_RATIO = 1.0
TARGET_APPROX_MS = 10.0
TARGET_RECALL = 0.95
# (factory, knob, values) of the approximate indexes swept from 10k records up; "IVF" is
# IVF with about √N lists.
APPROXIMATE = (("HNSW32", "efSearch", (64, 128, 256, 512)), ("IVF", "nprobe", (16, 48, 96)))
skip_ivf_above_100k = True  # IVF at 1M: recall@10 0.85 at nprobe 96 and > 10 ms (see index.py)


def face_like(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors (n, dim) unit float32, identity per row (n,), queries (64, dim) unit float32)."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(np.round(rng.lognormal(np.log(3), 0.7, size=n)), 1, 50).astype(np.int64)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n)) + 1]
    identity = np.repeat(np.arange(len(sizes)), sizes)[:n]
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
    spectrum = (1.0 / np.sqrt(1 + np.arange(dim) / 8.0)).astype(np.float32)
    mean = rng.normal(size=dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = (rng.normal(size=(len(sizes), dim)).astype(np.float32) * spectrum) @ basis.T
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    centres += 0.4 * mean
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def images(who: np.ndarray) -> np.ndarray:
        noise = rng.normal(size=(len(who), dim)).astype(np.float32)
        noise *= (rng.uniform(0.55, 1.0, size=(len(who), 1)) / np.linalg.norm(noise, axis=1, keepdims=True))
        x = centres[who] + noise
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        out[start : start + 100_000] = images(identity[start : start + 100_000])
    queries = images(identity[rng.integers(0, n, 64)])
    return out, identity, queries


def cosine_spread(x: np.ndarray, identity: np.ndarray) -> dict:
    """5th/50th/95th percentile cosines of same-identity and impostor pairs (a sample)."""
    rng = np.random.default_rng(1)
    first = np.flatnonzero(np.r_[True, identity[1:] != identity[:-1]])
    pairs = first[(first + 1 < len(identity)) & (identity[np.minimum(first + 1, len(identity) - 1)] == identity[first])]
    pairs = pairs[:5000]
    same = np.einsum("nd,nd->n", x[pairs], x[pairs + 1])
    a, b = rng.integers(0, len(x), 5000), rng.integers(0, len(x), 5000)
    keep = identity[a] != identity[b]
    impostor = np.einsum("nd,nd->n", x[a[keep]], x[b[keep]])
    pct = (5, 50, 95)
    return {"same": np.percentile(same, pct).round(2).tolist(), "impostor": np.percentile(impostor, pct).round(2).tolist()}


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ x.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable (called with the repeat number), run alternately."""
    times: dict = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(r)
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(v)) for name, v in times.items()}


def _stage(n: int, what: str, since: float) -> None:
    print(f"#   {n:,}: {what} ({time.perf_counter() - since:.0f} s)", file=sys.stderr, flush=True)


def run_one(n: int, dim: int, workdir: Path) -> dict:
    from gallery import Entry, Gallery

    began = time.perf_counter()
    x, identity, queries = face_like(n, dim, seed=n)
    result: dict = {"n": n, "dim": dim, "cosines": cosine_spread(x, identity)}
    path = workdir / f"bench_{n}.db"
    for p in workdir.glob(f"bench_{n}.db*"):
        p.unlink()
    gallery = Gallery.open(path, index="Flat", encoder_id="synthetic", view_scheme="synthetic:orig")
    t = time.perf_counter()
    for start in range(0, n, 20_000):
        gallery.add_many(
            (Entry(image_id=f"img{i}", subject_id=f"s{identity[i]}", syndrome_id=f"SYN{identity[i] % 1000}",
                   syndrome_name=f"Syndrome {identity[i] % 1000}", views=x[i : i + 1])
             for i in range(start, min(n, start + 20_000))),
            batch_size=20_000,
        )
    result["add_s"] = time.perf_counter() - t
    _stage(n, "added", began)

    q1 = [queries[i : i + 1, None, :] for i in range(64)]
    q64 = queries[:, None, :]
    repeats = 31 if n <= 100_000 else 7
    # gallery ids are 1 + row index (fresh gallery, AUTOINCREMENT from 1)
    exact = [np.array([h.gallery_id - 1 for h in hits]) for hits in gallery.search_batch(q64, K)]
    truth = numpy_topk(x, queries, K)
    result["exact_equals_numpy"] = float(np.mean([np.array_equal(a, b) for a, b in zip(exact, truth, strict=True)]))
    t1 = _interleaved({
        "gallery": lambda r: gallery.search_batch(q1[r % 64], K),
        "numpy": lambda r: numpy_topk(x, queries[r % 64 : r % 64 + 1], K),
        "index": lambda r: gallery._index.search(queries[r % 64 : r % 64 + 1], K),
    }, repeats * 3)
    t64 = _interleaved({
        "gallery": lambda r: gallery.search_batch(q64, K),
        "numpy": lambda r: numpy_topk(x, queries, K),
        "index": lambda r: gallery._index.search(queries, K),
    }, repeats)
    for name in ("gallery", "numpy", "index"):
        result[f"{name}_1_ms"] = 1e3 * t1[name]
        result[f"{name}_64_ms"] = 1e3 * t64[name]
    gallery.close(save_index=False)
    _stage(n, "exact and numpy timed", began)

    t = time.perf_counter()
    auto = Gallery.open(path)
    result["auto_open_s"] = time.perf_counter() - t
    result["auto"] = auto.index_effective_factory
    found = auto.search_batch(q64, K)
    result["auto_recall10"] = float(np.mean(
        [len(set(tr.tolist()) & {h.gallery_id - 1 for h in f}) / K for tr, f in zip(truth, found, strict=True)]))
    result["auto_1_ms"] = 1e3 * _interleaved({"1": lambda r: auto.search_batch(q1[r % 64], K)}, 3 * repeats)["1"]
    result["auto_64_ms"] = 1e3 * _interleaved({"64": lambda r: auto.search_batch(q64, K)}, repeats)["64"]
    auto.close(save_index=False)
    _stage(n, f"auto ({result['auto']}) timed", began)

    if n >= 10_000:
        result["approx_sweeps"] = [
            _sweep(path, factory, knob, values, truth, q1, q64, n, began)
            for factory, knob, values in APPROXIMATE
            if not (factory.startswith("IVF") and n > 100_000 and skip_ivf_above_100k)
        ]
    result["db_mib"] = path.stat().st_size / 2**20
    for p in workdir.glob(f"bench_{n}.db*"):
        p.unlink()
    return result


def _sweep(path: Path, factory: str, knob: str, values: tuple, truth: np.ndarray, q1: list, q64: np.ndarray,
           n: int, began: float) -> dict:
    """Build ``factory`` through the gallery, then recall@10 and one-query ms per ``knob`` value."""
    import faiss

    from gallery import Gallery
    from gallery.index import ivf_factory

    factory = ivf_factory(n) if factory == "IVF" else factory
    t = time.perf_counter()
    gallery = Gallery.open(path, index=factory)
    out: dict = {"factory": gallery.index_effective_factory, "knob": knob, "build_s": time.perf_counter() - t}
    inner = faiss.downcast_index(gallery._index._index.index)
    points = []
    for value in values:
        if knob == "efSearch":
            inner.hnsw.efSearch = value
        else:
            faiss.extract_index_ivf(inner).nprobe = value
        found = gallery.search_batch(q64, K)
        recall = float(np.mean([len(set(tr.tolist()) & {h.gallery_id - 1 for h in f}) / K
                                for tr, f in zip(truth, found, strict=True)]))
        ms = 1e3 * _interleaved({"1": lambda r: gallery.search_batch(q1[r % 64], K)}, 64)["1"]
        points.append({"value": value, "recall10": recall, "ms_1q": ms})
    out["points"] = points
    gallery.close(save_index=False)
    _stage(n, f"{factory} swept", began)
    return out


def hnsw_only(n: int, dim: int, values: tuple = (128, 192, 256, 384, 512)) -> dict:
    """The auto index above its limit (FAISS HNSW32, efConstruction 40, as the gallery builds
    it) straight over the same face-like vectors, without SQLite: what the 1M row reports,
    since adding 1M records through the gallery and building HNSW there took too long to
    repeat. The gallery adds its label lookup and Hit objects (tens of µs) on top."""
    import faiss

    x, _identity, queries = face_like(n, dim, seed=n)
    truth = numpy_topk(x, queries, K)
    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    index.add(x)
    out: dict = {"n": n, "build_s": time.perf_counter() - t, "points": []}
    for value in values:
        index.hnsw.efSearch = value
        _, found = index.search(queries, K)
        recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(found, truth, strict=True)]))
        ms = 1e3 * _interleaved({"1": lambda r: index.search(queries[r % 64 : r % 64 + 1], K)}, 64)["1"]
        out["points"].append({"value": value, "recall10": recall, "ms_1q": ms})
        print(f"# efSearch {value}: recall@10 {recall:.3f}, {ms:.2f} ms per query", file=sys.stderr, flush=True)
    return out


def table(rows: list[dict]) -> str:
    from gallery.index import AUTO_EF_SEARCH

    head = (
        "| records | add (s) | gallery 1q (ms) | numpy 1q (ms) | × numpy 1q (≥ 1) | gallery 64q (ms) "
        "| numpy 64q (ms) | × numpy 64q (≥ 1) | index only × numpy 1q / 64q | exact = numpy "
        "| auto choice | auto 1q (ms) | auto recall@10 | HNSW32 recall@10 / ms per query at "
        f"efSearch {AUTO_EF_SEARCH} (≥ {TARGET_RECALL} / < {TARGET_APPROX_MS:g}) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        hnsw = next((s for s in r.get("approx_sweeps", []) if s["knob"] == "efSearch"), None)
        at = next((p for p in hnsw["points"] if p["value"] == AUTO_EF_SEARCH), None) if hnsw else None
        approx = f"{at['recall10']:.3f} / {at['ms_1q']:.2f}" if at else "–"
        lines.append(
            f"| {r['n']:,} | {r['add_s']:.0f} | {r['gallery_1_ms']:.3f} | {r['numpy_1_ms']:.3f} "
            f"| {r['numpy_1_ms'] / r['gallery_1_ms']:.2f} | {r['gallery_64_ms']:.2f} | {r['numpy_64_ms']:.2f} "
            f"| {r['numpy_64_ms'] / r['gallery_64_ms']:.2f} "
            f"| {r['numpy_1_ms'] / r['index_1_ms']:.2f} / {r['numpy_64_ms'] / r['index_64_ms']:.2f} "
            f"| {r['exact_equals_numpy']:.0%} | {r['auto']} | {r['auto_1_ms']:.3f} | {r['auto_recall10']:.3f} "
            f"| {approx} |"
        )
    sweeps = [(r["n"], s) for r in rows for s in r.get("approx_sweeps", [])]
    if sweeps:
        lines += ["", "Approximate indexes (recall@10 / ms per one-query search, per knob value):", ""]
        lines += ["| records | index (build s) | points |", "|---|---|---|"]
        for n, s in sweeps:
            cells = ", ".join(f"{s['knob']} {p['value']}: {p['recall10']:.3f} / {p['ms_1q']:.2f}" for p in s["points"])
            lines.append(f"| {n:,} | {s['factory']} ({s['build_s']:.0f}) | {cells} |")
    lines += ["", "Cosine spread (5th / 50th / 95th percentile), same identity vs impostor:", ""]
    lines += [f"- {r['n']:,}: same {r['cosines']['same']}, impostor {r['cosines']['impostor']}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_gallery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated record counts")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None, help="where the SQLite files go")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--hnsw-only", type=int, metavar="N",
                        help="only the HNSW32 efSearch sweep over N face-like vectors (no SQLite)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hnsw_only:
        print(json.dumps(hnsw_only(args.hnsw_only, args.dim)))
        return 0
    workdir = args.workdir or Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(run_one(args.one, args.dim, workdir)))
        return 0
    rows: list[dict] = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for n in sizes:
        cmd = [sys.executable, "-m", "bench.bench_gallery", "--one", str(n), "--dim", str(args.dim),
               "--workdir", str(workdir)]
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
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"Gallery benchmark ({args.dim}-d face-like synthetic records, k={K}, {os.cpu_count()} CPU cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f})\n")
    print(table(rows))
    return 0 if len(rows) == len(sizes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
