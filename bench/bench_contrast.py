"""What-differs maps: the cost of ``contrast`` for a top-K result against the field's explainers.

    .venv/bin/python -m bench.bench_contrast                  # K = 1 5 10, peers on one pair
    .venv/bin/python -m bench.bench_contrast --ks 1 10 --reps 5 --json

In one process, medians of ``--reps`` rounds in which the encode and every contrast
measurement run once each in turn (SFace, one view, one torch thread unless --threads):

- encode: one query encode (preprocess + features + head, one image);
- contrast cached: ``explain_matches(query crop, cached hit features, ["contrast"])`` —
  the query encode, then its tail once forward and K directions back through it,
  products with the hits' cached activations (the server's path: its feature store
  keeps them); no hit's tail is run;
- contrast uncached: the same with the K hit crops encoded in one batch first;
- peers, one pair each through the same family call with their defaults: occlusion
  (pixel, the GestaltMatcher thesis' 10×10 patches), xSSAB (Huber et al. 2024: the
  cosine's positive and negative arguments backpropagated), CorrRISE (Lu et al. 2024:
  masked forwards correlated with the similarity).

Target (issue 12): contrast for all K hits with cached features ≤ 3× one encode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.bench_explain import _crops
from bench.timing import time_interleaved
from explain.attribution.engine import Explainer
from explain.attribution.matches import explain_matches

PEERS = ("occlusion", "xssab", "corrrise")
TARGET = 3.0


def _time(fn, reps: int) -> float:
    fn()  # warm-up (placement, head linearisation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_contrast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peer-reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from encoder.registry import create_encoder

    explainer = Explainer(create_encoder("sface"))
    query, hits = _crops(max(args.ks))
    hit_features = explainer.encode(hits)
    runs = {"encode": lambda: explainer.encode(query)}
    for k in args.ks:
        cached = hit_features.select(list(range(k)))
        runs[f"cached {k}"] = lambda c=cached: list(explain_matches(explainer, query, c,
                                                                     ("contrast",)))
        runs[f"uncached {k}"] = lambda k=k: list(explain_matches(explainer, query, hits[:k],
                                                                 ("contrast",)))
    ms = {name: 1000 * statistics.median(t)
          for name, t in time_interleaved(runs, args.reps, warmup=1).items()}
    encode_ms = ms["encode"]
    rows = []
    for k in args.ks:
        ms_cached, ms_full = ms[f"cached {k}"], ms[f"uncached {k}"]
        rows.append({"k": k, "encode_ms": encode_ms, "contrast_cached_ms": ms_cached,
                     "contrast_uncached_ms": ms_full, "cached_per_encode": ms_cached / encode_ms,
                     "uncached_per_encode": ms_full / encode_ms,
                     "target_met": ms_cached / encode_ms <= TARGET})
    peers = []
    if not args.no_peers:
        one = hit_features.select([0])
        for method in PEERS:
            result = {}

            def run(method=method, result=result):
                (m,) = explain_matches(explainer, query, one, (method,), budget=None,
                                       time_limit=None)
                result["passes"] = m[method].forward_passes

            ms = _time(run, args.peer_reps)
            peers.append({"method": method, "pair_ms": ms, "per_encode": ms / encode_ms,
                          "forward_passes": result["passes"]})
        one_contrast = next(r for r in rows if r["k"] == min(args.ks))
        for p in peers:
            p["times_contrast_pair"] = p["pair_ms"] / one_contrast["contrast_cached_ms"]
    doc = {"encode_ms": encode_ms, "contrast": rows, "peers": peers, "threads": args.threads,
           "target": f"contrast cached top-K <= {TARGET:g}x one encode"}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"one encode: {encode_ms:.1f} ms (SFace, {args.threads} thread)\n")
    print("| K | contrast cached (ms) | × encode | target ≤ 3× | contrast uncached (ms) | × encode |")
    print("|---:|---:|---:|:---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']} | {r['contrast_cached_ms']:.1f} | {r['cached_per_encode']:.2f} | "
              f"{'met' if r['target_met'] else 'missed'} | {r['contrast_uncached_ms']:.1f} | "
              f"{r['uncached_per_encode']:.2f} |")
    if peers:
        print("\n| peer (one pair, defaults) | ms | × encode | forward passes | × contrast (one pair) |")
        print("|---|---:|---:|---:|---:|")
        for p in peers:
            print(f"| {p['method']} | {p['pair_ms']:.0f} | {p['per_encode']:.1f} | "
                  f"{p['forward_passes']} | {p['times_contrast_pair']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
