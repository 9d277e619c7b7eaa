"""YuNet's detect side: the CPU time of a 640x640 photo against how far the landmarks move.

    .venv/bin/python -m bench.bench_detect_side                       # sides 640 512 480 448 416
    .venv/bin/python -m bench.bench_detect_side --sides 640 480 --repeats 40

Photos: every bundled real photo but the aligned crop, each single-face one also in its
five altered copies (``research.photo_variants``: mirrored, rotated ±8°, zoomed out, darkened),
and the group photo t1.jpg resized to 640x480 and 640x640 (51 photos, 66 faces).

Per detect side (the photo downscaled to that longest side; boxes and landmarks mapped
back to the photo by ``FaceDetector.detect``):

- cpu: process CPU time of ``detect`` on t1 at 640x640 (one onnxruntime thread, so the time
  one core spends; median, the sides interleaved), and the wall time beside it;
- vs full: YuNet at full resolution (``detect_side=None``) as reference: faces missed or
  added, mean / worst landmark distance in the 112x112 aligned crop
  (``encoder.detectors.compare.landmark_disagreement_px``), and the SFace cosine of the
  two crops aligned from either detection (mean, 5th percentile, lowest);
- vs mtcnn: the same distance and cosine against MTCNN's detection, an independent
  detector: if a side aligns worse, it drifts from MTCNN too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import torch

from encoder.align import align_face
from encoder.assets import PHOTOS
from encoder.detect import create_detector
from encoder.detectors.compare import landmark_disagreement_px, match_detections
from encoder.image import decode_image


def photos() -> list[tuple[str, np.ndarray]]:
    from research.photo_variants import ALTERATIONS

    out = []
    for p in PHOTOS:
        if p.aligned:
            continue
        rgb = decode_image(p.path.read_bytes())
        out.append((p.name, rgb))
        if p.faces == 1:
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            out += [(f"{name}_{p.name}", np.ascontiguousarray(alter(bgr)[:, :, ::-1]))
                    for name, alter in ALTERATIONS.items()]
    t1 = next(rgb for name, rgb in out if name == "t1.jpg")
    out += [(f"t1@{w}x{h}", cv2.resize(t1, (w, h), interpolation=cv2.INTER_AREA)) for w, h in ((640, 480), (640, 640))]
    return out


def run(sides: list[int], repeats: int) -> dict:
    from encoder.registry import create_encoder

    torch.set_num_threads(1)
    images = photos()
    full = create_detector("yunet", detect_side=None)
    mtcnn = create_detector("mtcnn")
    detectors = {s: create_detector("yunet", detect_side=s) for s in sides}
    sface = create_encoder("sface")

    def cosines(rgb: np.ndarray, pairs: list) -> list[float]:
        if not pairs:
            return []
        crops = [align_face(rgb, d.landmarks).crop for pair in pairs for d in pair]
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(sface(sface.preprocess(np.stack(crops))), dim=1)
        return (emb[0::2] * emb[1::2]).sum(dim=1).tolist()

    stats = {s: {"px": [], "cos": [], "m_px": [], "m_cos": [], "missed": 0, "added": 0} for s in sides}
    faces = 0
    for _, rgb in images:
        ref, other = full.detect(rgb), mtcnn.detect(rgb)
        faces += ref.count
        for s, det in detectors.items():
            found = det.detect(rgb)
            pairs = match_detections(ref, found)
            st = stats[s]
            st["missed"] += ref.count - len(pairs)
            st["added"] += found.count - len(pairs)
            st["px"] += [landmark_disagreement_px(a, b) for a, b in pairs]
            st["cos"] += cosines(rgb, pairs)
            m_pairs = match_detections(other, found)
            st["m_px"] += [landmark_disagreement_px(a, b) for a, b in m_pairs]
            st["m_cos"] += cosines(rgb, m_pairs)
    square = next(rgb for name, rgb in images if name == "t1@640x640")
    cpu: dict = {s: [] for s in sides}
    wall: dict = {s: [] for s in sides}
    for det in detectors.values():
        det.detect(square)
    for _ in range(repeats):
        for s, det in detectors.items():
            c, w = time.process_time(), time.perf_counter()
            det.detect(square)
            cpu[s].append(1e3 * (time.process_time() - c))
            wall[s].append(1e3 * (time.perf_counter() - w))
    rows = []
    for s in sides:
        st = stats[s]
        rows.append({
            "side": s, "cpu_ms": statistics.median(cpu[s]), "wall_ms": statistics.median(wall[s]),
            "missed": st["missed"], "added": st["added"],
            "px_mean": float(np.mean(st["px"])), "px_max": float(np.max(st["px"])),
            "cos_mean": float(np.mean(st["cos"])), "cos_p5": float(np.percentile(st["cos"], 5)),
            "cos_min": float(np.min(st["cos"])),
            "mtcnn_px_mean": float(np.mean(st["m_px"])), "mtcnn_px_max": float(np.max(st["m_px"])),
            "mtcnn_cos_mean": float(np.mean(st["m_cos"])), "mtcnn_cos_min": float(np.min(st["m_cos"])),
        })
    return {"photos": len(images), "faces": faces, "repeats": repeats, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_detect_side", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[640, 512, 480, 448, 416])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    doc = run(args.sides, args.repeats)
    print(f"YuNet by detect side: {doc['photos']} photos, {doc['faces']} faces at full size; t1 at 640x640 "
          f"timed {doc['repeats']}x (medians); landmarks in px of the 112x112 crop\n")
    print("| side | cpu ms (640x640) | wall ms | missed / added | vs full: px mean / max | cos mean / p5 / min "
          "| vs mtcnn: px mean / max | cos mean / min |")
    print("|---:|---:|---:|---|---|---|---|---|")
    for r in doc["rows"]:
        print(f"| {r['side']} | {r['cpu_ms']:.1f} | {r['wall_ms']:.1f} | {r['missed']} / {r['added']} "
              f"| {r['px_mean']:.2f} / {r['px_max']:.2f} | {r['cos_mean']:.3f} / {r['cos_p5']:.3f} / {r['cos_min']:.3f} "
              f"| {r['mtcnn_px_mean']:.2f} / {r['mtcnn_px_max']:.2f} | {r['mtcnn_cos_mean']:.3f} / {r['mtcnn_cos_min']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
