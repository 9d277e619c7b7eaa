"""``phenolens compare A B`` and ``phenolens encode IMAGE...``: faces and embeddings locally.

Both detect and align the most confident face of each image (or take it as an
already-aligned crop with ``--aligned``), run every view of the chosen scheme,
and print the result; ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _encoder_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("encoder")
    group.add_argument("--encoder", default="sface", help="encoder name (default: sface); "
                       "see encoder.registry.list_encoders()")
    group.add_argument("--weights", type=Path, help="weights file for the encoder")
    group.add_argument("--flip", action="store_true", help="add the mirrored view")
    group.add_argument("--gray", action="store_true", help="add the grayscale view(s)")
    group.add_argument("--view-scheme", help='explicit views, e.g. "sface:orig,sface:flip"')
    group.add_argument("--device", help="cpu, cuda or mps (default: PHENOLENS_DEVICE or cpu)")
    group.add_argument("--threads", type=int, help="torch CPU threads")
    group.add_argument("--detector", help="face detector: yunet (default) or mtcnn")
    parser.add_argument("--aligned", action="store_true",
                        help="images are already aligned crops of the encoder's size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def register(subparsers: argparse._SubParsersAction) -> None:
    compare = subparsers.add_parser(
        "compare", help="cosine similarity of the faces in two images",
        description="Detect, align and embed the most confident face of each image and print "
                    "their cosine similarity (mean over the views of the scheme).")
    compare.add_argument("image_a", type=Path)
    compare.add_argument("image_b", type=Path)
    _encoder_options(compare)
    compare.set_defaults(func=run_compare)

    encode = subparsers.add_parser(
        "encode", help="embedding of the face in each image",
        description="Detect, align and embed the most confident face of each image.")
    encode.add_argument("images", type=Path, nargs="+")
    _encoder_options(encode)
    encode.set_defaults(func=run_encode)


@dataclass(frozen=True)
class EncodedFace:
    """One image's face and its (V, D) per-view embeddings."""

    image: str
    face: Any  # encoder.pipeline.Face
    embeddings: np.ndarray
    dims: tuple[int, ...]


def _ensemble(args: argparse.Namespace):
    from encoder.runtime import configure_torch
    from encoder.views import ViewScheme, ensemble_for

    runtime = configure_torch(args.device or "cpu", args.threads)
    if args.view_scheme:
        scheme = ViewScheme.parse(args.view_scheme)
    else:
        flips = (False, True) if args.flip else (False,)
        grays = (False, True) if args.gray else (False,)
        scheme = ViewScheme.product([args.encoder], flips=flips, grays=grays)
    weights = {args.encoder: args.weights} if args.weights else None
    return ensemble_for(scheme, weights=weights, device=str(runtime.device))


def _encode(args: argparse.Namespace, paths: list[Path]) -> tuple[Any, list[EncodedFace]]:
    from encoder.pipeline import FacePipeline

    ensemble = _ensemble(args)
    pipeline = FacePipeline(args.detector, template=ensemble.alignment)
    faces = [pipeline.face(path, aligned=args.aligned) for path in paths]
    embeddings = ensemble.embed(np.stack([f.crop for f in faces]))
    return ensemble, [
        EncodedFace(str(path), face, emb, ensemble.dims)
        for path, face, emb in zip(paths, faces, embeddings, strict=True)
    ]


def _face_json(item: EncodedFace) -> dict[str, Any]:
    a = item.face.alignment
    return {
        "image": item.image,
        "face_count": int(item.face.face_count),
        "frame": int(item.face.frame),
        "score": round(float(item.face.score), 6),
        "box": [round(float(v), 2) for v in item.face.boxes[0]],
        "alignment": {
            "template": a.template,
            "crop_size": list(a.crop_size),
            "landmarks_photo": np.round(a.landmarks_photo, 2).tolist(),
            "template_error_px": round(a.template_error_px(), 3),
        },
    }


def view_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(V, D) and (V, D) per-view unit embeddings -> (V,) cosines."""
    return np.einsum("vd,vd->v", a.astype(np.float64), b.astype(np.float64))


def run_compare(args: argparse.Namespace) -> int:
    ensemble, (a, b) = _encode(args, [args.image_a, args.image_b])
    per_view = view_cosines(a.embeddings, b.embeddings)
    cosine = float(per_view.mean())
    views = [v.id for v in ensemble.scheme.views]
    if args.json:
        print(json.dumps({
            "cosine": round(cosine, 6),
            "per_view": {v: round(float(c), 6) for v, c in zip(views, per_view, strict=True)},
            "encoder": "+".join(m.spec.name for m in ensemble.encoders.values()),
            "view_scheme": ensemble.scheme.id,
            "faces": [_face_json(a), _face_json(b)],
        }, indent=2))
    else:
        print(f"cosine {cosine:.4f}  ({ensemble.scheme.id})")
        for item in (a, b):
            print(f"  {item.image}: {item.face.face_count} face(s), using the most confident "
                  f"(score {item.face.score:.3f})")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    ensemble, items = _encode(args, list(args.images))
    views = [v.id for v in ensemble.scheme.views]
    if args.json:
        print(json.dumps({
            "encoder": "+".join(m.spec.name for m in ensemble.encoders.values()),
            "view_scheme": ensemble.scheme.id,
            "faces": [
                {**_face_json(item), "embeddings": {
                    v: np.round(item.embeddings[i, : item.dims[i]], 6).tolist()
                    for i, v in enumerate(views)
                }}
                for item in items
            ],
        }))
    else:
        for item in items:
            print(f"{item.image}: {item.face.face_count} face(s), score {item.face.score:.3f}, "
                  f"template error {item.face.alignment.template_error_px():.2f} px")
            for i, v in enumerate(views):
                head = ", ".join(f"{x:+.4f}" for x in item.embeddings[i, :4])
                print(f"  {v} ({item.dims[i]}-d, unit length): [{head}, ...]")
    return 0
