"""Encoder benchmark: the SFace cosine table of the real photos and per-image timings.

    .venv/bin/python -m bench.bench_encoder                  # table + timings, 3 repeats
    .venv/bin/python -m bench.bench_encoder --repeats 10 --threads 1 --flip --json

Faces: every single-face bundled photo (detected and aligned by
``FacePipeline``) plus the already-aligned Tom Hanks crop. The table is the
cosine of every pair under the chosen view scheme (mean over views); same-person
pairs are marked. Timings are medians after one warm-up (wall clock, and in
brackets process CPU time, which stays meaningful on a shared machine): ``load`` (decode),
``detect`` (MTCNN), ``align`` (similarity warp), ``embed`` (all views, batch of
one), and ``embed/img@8`` (per image in a batch of 8).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from encoder.align import align_face
from encoder.assets import PHOTOS
from encoder.pipeline import FacePipeline
from encoder.views import default_ensemble


def _median_ms(fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1000.0 * statistics.median(times)


def _cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    """Process CPU time: what the step costs when the machine is shared (all threads summed)."""
    return _median_ms(fn, repeats, time.process_time)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_encoder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--flip", action="store_true", help="sface:orig,sface:flip")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ensemble = default_ensemble(flip=args.flip)
    pipeline = FacePipeline(template=ensemble.alignment)
    photos = [p for p in PHOTOS if p.faces == 1]
    person = {p.name: p.person for p in photos}
    faces = {p.name: pipeline.face(p.path, aligned=p.aligned) for p in photos}
    names = list(faces)
    emb = ensemble.embed(np.stack([faces[n].crop for n in names]))  # (N, V, D)
    cos = np.einsum("ivd,jvd->ijv", emb, emb).mean(axis=-1)

    timings: dict[str, dict[str, float]] = {}
    for p in photos:
        if p.aligned:
            continue
        rgb = pipeline.load(p.path)
        result = pipeline.detector.detect(rgb)
        landmarks = result.best.landmarks
        crop = faces[p.name].crop[None]
        timings[p.name] = {
            "size": f"{rgb.shape[1]}x{rgb.shape[0]}",
            "load_ms": _median_ms(lambda p=p: pipeline.load(p.path), args.repeats),
            "detect_ms": _median_ms(lambda rgb=rgb: pipeline.detector.detect(rgb), args.repeats),
            "align_ms": _median_ms(lambda rgb=rgb, lm=landmarks: align_face(rgb, lm), args.repeats),
            "embed_ms": _median_ms(lambda crop=crop: ensemble.embed(crop), args.repeats),
            "detect_cpu_ms": _cpu_ms(lambda rgb=rgb: pipeline.detector.detect(rgb), args.repeats),
            "embed_cpu_ms": _cpu_ms(lambda crop=crop: ensemble.embed(crop), args.repeats),
        }
    batch = np.stack([faces[n].crop for n in names][:8])
    batch = np.concatenate([batch] * (8 // len(batch) + 1))[:8]
    per_image_at_8 = _median_ms(lambda: ensemble.embed(batch), args.repeats) / 8

    if args.json:
        print(json.dumps({
            "view_scheme": ensemble.scheme.id,
            "threads": torch.get_num_threads(),
            "cosine": {f"{a}|{b}": round(float(cos[i, j]), 4)
                       for (i, a), (j, b) in itertools.combinations(enumerate(names), 2)},
            "timings": timings,
            "embed_per_image_batch8_ms": round(per_image_at_8, 2),
        }, indent=2))
        return 0

    print(f"view scheme {ensemble.scheme.id}, torch threads {torch.get_num_threads()}\n")
    short = [n.rsplit(".", 1)[0] for n in names]
    print("| |" + "|".join(short) + "|")
    print("|---|" + "---|" * len(short))
    for i, a in enumerate(short):
        cells = []
        for j in range(len(names)):
            if j <= i:
                cells.append("")
            else:
                same = person[names[i]] == person[names[j]]
                cells.append(f"**{cos[i, j]:.3f}**" if same else f"{cos[i, j]:.3f}")
        print(f"|{a}|" + "|".join(cells) + "|")
    print("\n(bold: same person)\n")
    print("| photo | size | load ms | detect ms (cpu) | align ms | embed ms (cpu) |")
    print("|---|---|---|---|---|---|")
    for name, t in timings.items():
        print(f"| {name} | {t['size']} | {t['load_ms']:.1f} | {t['detect_ms']:.1f} "
              f"({t['detect_cpu_ms']:.1f}) | {t['align_ms']:.2f} | {t['embed_ms']:.1f} "
              f"({t['embed_cpu_ms']:.1f}) |")
    print(f"\nembedding per image in a batch of 8: {per_image_at_8:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
