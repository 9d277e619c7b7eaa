"""Face pipeline benchmark: decoding, detection per detector (same run), alignment, agreement.

    .venv/bin/python -m bench.bench_pipeline                # every bundled photo, 5 repeats
    .venv/bin/python -m bench.bench_pipeline --repeats 20 --threads 1 --json

Each stage is timed separately on the real photos (median of the repeats,
after one warm-up call): ``decode`` is ``encoder.image.decode_image`` on the
file bytes; ``<detector>`` is ``FaceDetector.detect`` of each registered
detector (downscale to its detect side, network, decoding of its output),
timed interleaved in the same run so the ratio holds on a busy machine;
``cpu`` is the process CPU time of the same call (all threads), the steadier
number where wall time includes waiting for a core. ``align`` is
``align_face`` onto the ArcFace 112 template, ``warp`` is ``warp_to_photo``
of a 7x7 map. Rows ``t1@640x480`` and ``t1@640x640`` are t1.jpg resized to
those sizes and saved as JPEG (quality 95): the issue's "640-px photo".
``--json`` rows also carry ``detect_ms`` / ``detect_cpu_ms`` of the default
detector (``encoder.detect.DEFAULT_DETECTOR``), the keys ``bench.run_all`` reads.

Agreement (reference: the first detector, mtcnn): faces are paired by box
overlap; ``lm_px`` is the mean distance between the two detectors' 5
landmarks in the 112x112 crop aligned with the reference's landmarks;
``cos`` is the cosine of the SFace embeddings of the two aligned crops.
``--threads`` sets torch's intra-op threads (MTCNN); YuNet runs one thread.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
from PIL import Image

from encoder.align import align_face, warp_to_photo
from encoder.assets import PHOTOS
from encoder.detect import (
    DEFAULT_DETECTOR,
    DetectionResult,
    FaceDetector,
    create_detector,
    list_detectors,
)
from encoder.detectors.compare import landmark_disagreement_px, match_detections
from encoder.image import decode_image

REFERENCE = "mtcnn"


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


def _inputs() -> list[tuple[str, np.ndarray, bytes]]:
    """(name, RGB photo, file bytes) for every bundled photo and the two 640-px sizes."""
    out: list[tuple[str, np.ndarray, bytes]] = []
    for photo in PHOTOS:
        if photo.aligned:
            continue
        data = photo.path.read_bytes()
        out.append((photo.name, decode_image(data), data))
    group = next(rgb for name, rgb, _ in out if name == "t1.jpg")
    for w, h in ((640, 480), (640, 640)):
        small = cv2.resize(group, (w, h), interpolation=cv2.INTER_AREA)
        buf = io.BytesIO()
        Image.fromarray(small).save(buf, "JPEG", quality=95)
        data = buf.getvalue()
        out.append((f"t1@{w}x{h}", decode_image(data), data))
    return out


def _agreement(
    rgb: np.ndarray, ref: DetectionResult, other: DetectionResult, sface: torch.nn.Module
) -> tuple[float, float, int]:
    """(mean landmark px in the aligned crop, mean SFace cosine, faces paired)."""
    pairs = match_detections(ref, other)
    if not pairs:
        return float("nan"), float("nan"), 0
    px = [landmark_disagreement_px(a, b) for a, b in pairs]
    crops = [align_face(rgb, d.landmarks).crop for pair in pairs for d in pair]
    with torch.inference_mode():
        emb = torch.nn.functional.normalize(sface(sface.preprocess(np.stack(crops))), dim=1)
    cos = (emb[0::2] * emb[1::2]).sum(dim=1)
    return float(np.mean(px)), float(cos.mean()), len(pairs)


def run(repeats: int) -> tuple[list[str], list[dict[str, object]]]:
    from encoder.registry import create_encoder

    names = [REFERENCE] + [n for n in list_detectors() if n != REFERENCE]
    detectors: dict[str, FaceDetector] = {n: create_detector(n) for n in names}
    sface = create_encoder("sface")
    rows: list[dict[str, object]] = []
    for label, rgb, data in _inputs():
        results = {n: d.detect(rgb) for n, d in detectors.items()}
        row: dict[str, object] = {"photo": label, "size": f"{rgb.shape[1]}x{rgb.shape[0]}"}
        row["decode_ms"] = _median_ms(lambda d=data: decode_image(d), repeats)
        for n, det in detectors.items():
            row[f"{n}_faces"] = results[n].count
            row[f"{n}_score"] = results[n].best.score if results[n].best else float("nan")
            row[f"{n}_ms"] = _median_ms(lambda r=rgb, d=det: d.detect(r), repeats)
            row[f"{n}_cpu_ms"] = _median_ms(lambda r=rgb, d=det: d.detect(r), repeats, time.process_time)
        row["detector"] = DEFAULT_DETECTOR
        row["detect_ms"] = row[f"{DEFAULT_DETECTOR}_ms"]
        row["detect_cpu_ms"] = row[f"{DEFAULT_DETECTOR}_cpu_ms"]
        for n in names[1:]:
            px, cos, paired = _agreement(rgb, results[REFERENCE], results[n], sface)
            row[f"{n}_lm_px"], row[f"{n}_cos"], row[f"{n}_paired"] = px, cos, paired
        best = results[names[0]].best
        if best is not None:
            alignment = align_face(rgb, best.landmarks)
            row["align_ms"] = _median_ms(lambda r=rgb, b=best: align_face(r, b.landmarks), repeats)
            row["warp_back_ms"] = _median_ms(
                lambda a=alignment: warp_to_photo(np.ones((7, 7)), a), repeats
            )
        rows.append(row)
    return names, rows


def _print(names: list[str], rows: list[dict[str, object]], repeats: int) -> None:
    other = names[1:]
    print(f"torch threads: {torch.get_num_threads()}, median of {repeats} runs, ms (wall / cpu)")
    head = f"{'photo':<15}{'size':>10}{'faces':>7}"
    for n in names:
        head += f"{n + ' ms':>15}"
    head += f"{'ratio':>7}{'lm_px':>7}{'cos':>7}" * len(other)
    head += f"{'scores':>14}{'decode':>8}{'align':>7}"
    print(head)
    for r in rows:
        faces = "/".join(str(r[f"{n}_faces"]) for n in names)
        line = f"{r['photo']:<15}{r['size']:>10}{faces:>7}"
        for n in names:
            line += f"{r[f'{n}_ms']:>8.1f} /{r[f'{n}_cpu_ms']:>5.1f}"
        for n in other:
            ratio = float(r[f"{REFERENCE}_ms"]) / float(r[f"{n}_ms"])
            line += f"{ratio:>6.1f}x{r[f'{n}_lm_px']:>7.2f}{r[f'{n}_cos']:>7.3f}"
        scores = "/".join(f"{float(r[f'{n}_score']):.3f}" for n in names)
        line += f"{scores:>14}{r['decode_ms']:>8.1f}"
        line += f"{r.get('align_ms', float('nan')):>7.2f}"
        print(line)
    for n in names:
        ms = statistics.fmean(float(r[f"{n}_ms"]) for r in rows)
        cpu = statistics.fmean(float(r[f"{n}_cpu_ms"]) for r in rows)
        print(f"mean {n}: {ms:.1f} ms wall, {cpu:.1f} ms cpu")
    for n in other:
        ratio = statistics.fmean(float(r[f"{REFERENCE}_ms"]) / float(r[f"{n}_ms"]) for r in rows)
        px = [float(r[f"{n}_lm_px"]) for r in rows]
        cos = [float(r[f"{n}_cos"]) for r in rows]
        print(
            f"{n} vs {REFERENCE}: {ratio:.1f}x faster (mean of per-photo ratios); landmarks "
            f"{statistics.fmean(px):.2f} px mean, {max(px):.2f} px worst (112x112 crop); SFace "
            f"cosine {statistics.fmean(cos):.3f} mean, {min(cos):.3f} lowest"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_pipeline", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names, rows = run(args.repeats)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return 0
    _print(names, rows, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
