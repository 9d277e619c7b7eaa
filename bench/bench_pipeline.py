"""Face pipeline benchmark: per-image time of decoding, MTCNN detection and alignment.

    .venv/bin/python -m bench.bench_pipeline                # every bundled photo, 5 repeats
    .venv/bin/python -m bench.bench_pipeline --repeats 10 --threads 1 --json

Each stage is timed separately on the real photos (median of the repeats,
after one warm-up call): ``decode`` is ``encoder.image.decode_image`` on the
file bytes, ``detect`` is ``FaceDetector.detect`` (downscale to 640 + MTCNN),
``align`` is ``align_face`` onto the ArcFace 112 template, ``warp_back`` is
``warp_to_photo`` of a 7x7 map. ``detect_cpu`` is the process CPU time of
detection (all threads): on a machine shared with other work it is the steadier
number, wall time there includes waiting for a core. ``--threads`` sets torch's intra-op threads
(MTCNN runs many small ops; on a busy machine one thread is often faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from encoder.align import align_face, warp_to_photo
from encoder.assets import PHOTOS
from encoder.detect import FaceDetector
from encoder.image import decode_image


def _median_ms(
    fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1000.0 * statistics.median(times)


def run(repeats: int, min_face_size: int) -> list[dict[str, object]]:
    detector = FaceDetector(min_face_size=min_face_size)
    rows: list[dict[str, object]] = []
    for photo in PHOTOS:
        if photo.aligned:
            continue
        data = photo.path.read_bytes()
        rgb = decode_image(data)
        result = detector.detect(rgb)
        best = result.best
        row: dict[str, object] = {
            "photo": photo.name,
            "size": f"{rgb.shape[1]}x{rgb.shape[0]}",
            "faces": result.count,
            "decode_ms": _median_ms(lambda d=data: decode_image(d), repeats),
            "detect_ms": _median_ms(lambda r=rgb: detector.detect(r), repeats),
            "detect_cpu_ms": _median_ms(
                lambda r=rgb: detector.detect(r), repeats, time.process_time
            ),
        }
        if best is not None:
            alignment = align_face(rgb, best.landmarks)
            row["align_ms"] = _median_ms(lambda r=rgb, b=best: align_face(r, b.landmarks), repeats)
            row["warp_back_ms"] = _median_ms(
                lambda a=alignment: warp_to_photo(np.ones((7, 7)), a), repeats
            )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_pipeline", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--min-face-size", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.repeats, args.min_face_size)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return 0
    print(f"torch threads: {torch.get_num_threads()}, median of {args.repeats} runs, ms")
    header = f"{'photo':<18}{'size':>10}{'faces':>6}{'decode':>9}{'detect':>9}{'cpu':>8}{'align':>8}{'warp':>8}"
    print(header)
    for r in rows:
        print(
            f"{r['photo']:<18}{r['size']:>10}{r['faces']:>6}{r['decode_ms']:>9.1f}"
            f"{r['detect_ms']:>9.1f}{r['detect_cpu_ms']:>8.1f}{r.get('align_ms', float('nan')):>8.2f}"
            f"{r.get('warp_back_ms', float('nan')):>8.2f}"
        )
    for key in ("decode_ms", "detect_ms", "detect_cpu_ms", "align_ms", "warp_back_ms"):
        values = [float(r[key]) for r in rows if key in r]
        print(f"mean {key}: {statistics.fmean(values):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
