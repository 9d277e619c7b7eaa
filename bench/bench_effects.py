"""Region effects: what measuring them costs per hit, in query encodes, beside contrast.

    .venv/bin/python -m bench.bench_effects                  # K = 3 hits, both views
    .venv/bin/python -m bench.bench_effects --ks 1 3 10 --reps 3 --json

In one process (SFace with its mirrored view, as the server explains; one torch thread
unless --threads), medians of ``--reps`` rounds in which every measurement runs once in
turn (``bench.timing.time_interleaved``):

- encode: one query encode (both views of one crop) — the unit of the targets;
- effects, pixels: ``region_effects(query, K cached hits, mode="pixels")`` on a query seen
  for the first time (its kept neutral edits forgotten first) — per hit 27 edited crops
  (query with the hit's region, hit with the query's, hit with the neutral face's; 9
  regions) and, once per query, 9 (query with the neutral face's): hits without stored
  neutral edits, the most a call makes;
- the same with the hits' neutral edits kept (they do not depend on the query: the server
  makes them when a face is imported and keeps them in the feature store, and beside the
  hits' cached features): 18 crops per hit — the served path for gallery hits; once for a
  query seen for the first time, and once for a query whose own 9 neutral edits are kept
  (``explain.effects.QUERY_EDITS_KEPT``: Match, Explain and the report of one photo);
- effects, features: the same edits made on the contrast layer, then the network's tail;
- contrast cached: ``explain_matches(..., ["contrast"])`` for the same K hits.

Target (issue 20): effects ≤ 3× one encode per hit on the served path (never more than 10×,
also for hits without stored neutral edits).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.bench_explain import _crops
from bench.timing import time_interleaved
from explain.attribution.engine import Explainer
from explain.attribution.matches import explain_matches
from explain.attribution.views import SingleEncoderViews
from explain.effects import (
    KeptEdits,
    RegionEffects,
    bundled_neutral,
    forget_query_edits,
    region_effects,
)

TARGET = 3.0
CAP = 10.0


def measure(reps: int = 3, k: int = 3, threads: int = 1) -> dict:
    """{"ms_per_hit", "encode_ms", "ratio", "features_ratio", "contrast_ratio", "k"}: the
    served (pixel) effects' milliseconds per hit and its ratio to one query encode."""
    from encoder.registry import create_encoder

    torch.set_num_threads(threads)
    explainer = Explainer(SingleEncoderViews(create_encoder("sface"), flip=True))
    query, hits = _crops(k)
    neutral = bundled_neutral()
    q, g = explainer.encode(query), explainer.encode(hits)
    kept = KeptEdits()  # as the server's feature cache keeps them
    RegionEffects(explainer, q, neutral=neutral).of(g, kept)

    def first(fn):  # a query seen for the first time: its neutral edits made in the call
        def call():
            forget_query_edits()
            return fn()
        return call

    times = time_interleaved({
        "encode": lambda: explainer.encode(query),
        "pixels": first(lambda: region_effects(explainer, q, g, neutral=neutral, mode="pixels")),
        "kept": first(lambda: RegionEffects(explainer, q, neutral=neutral).of(g, kept)),
        "kept_warm": lambda: RegionEffects(explainer, q, neutral=neutral).of(g, kept),
        "features": lambda: region_effects(explainer, q, g, neutral=neutral, mode="features"),
        "contrast": lambda: list(explain_matches(explainer, query, g, ["contrast"])),
    }, reps, warmup=1)
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    encode = ms["encode"]
    return {"k": k, "encode_ms": encode, "ms_per_hit": ms["pixels"] / k,
            "ratio": ms["pixels"] / k / encode,
            "kept_ms_per_hit": ms["kept"] / k, "kept_ratio": ms["kept"] / k / encode,
            "warm_ms_per_hit": ms["kept_warm"] / k, "warm_ratio": ms["kept_warm"] / k / encode,
            "features_ms_per_hit": ms["features"] / k,
            "features_ratio": ms["features"] / k / encode,
            "contrast_ms": ms["contrast"], "contrast_ratio": ms["contrast"] / encode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_effects", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[3])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [measure(args.reps, k, args.threads) for k in args.ks]
    if args.json:
        print(json.dumps(rows))
        return 0
    def status(ratio: float) -> str:
        return "met" if ratio <= TARGET else (
            "not met (under the cap)" if ratio <= CAP else "not met (over the cap)")

    print("| K | encode | served: hits' neutral edits stored, query's kept | × encode "
          "| served, query seen first | × encode | target ≤ 3× (cap 10×) "
          "| hits without stored edits, query seen first | × encode | cap 10× "
          "| contrast-layer edits | × encode | contrast (all K) | × encode |")
    print("|---:|---:|---:|---:|---:|---:|:---|---:|---:|:---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']} | {r['encode_ms']:.1f} ms | {r['warm_ms_per_hit']:.0f} ms | "
              f"{r['warm_ratio']:.1f} | {r['kept_ms_per_hit']:.0f} ms | {r['kept_ratio']:.1f} | "
              f"{status(r['kept_ratio'])} | {r['ms_per_hit']:.0f} ms | "
              f"{r['ratio']:.1f} | {'met' if r['ratio'] <= CAP else 'not met'} | "
              f"{r['features_ms_per_hit']:.0f} ms | {r['features_ratio']:.1f} | "
              f"{r['contrast_ms']:.0f} ms | {r['contrast_ratio']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
