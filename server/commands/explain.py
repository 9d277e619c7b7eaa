"""``phenolens explain``: maps on both faces for the top-K gallery matches of a photo (or one pair).

    phenolens explain IMAGE --gallery PATH [--top K] [--methods similarity gradcam ...] --out DIR [--json]
    phenolens explain IMAGE --against OTHER_IMAGE --out DIR

Writes, per match and method: the pair figure, the query map drawn on the
original photo, the gallery-side overlay, and the raw maps (.npy, native
resolution: 7x7 cells for the CAM family, the aligned crop for pixel methods).
With --json, prints one JSON object per match.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENGINE_METHODS = ("similarity", "gradcam")  # both sides for all K in one batched pass


def register(subparsers: argparse._SubParsersAction) -> None:
    from explain.limits import DEFAULT_BUDGET, DEFAULT_TIME_LIMIT_S

    p = subparsers.add_parser(
        "explain",
        help="explain matches with signed maps on both faces",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", type=Path, help="query photo")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--gallery", type=Path, help="gallery file to search")
    target.add_argument("--against", type=Path, help="explain one pair: the query and this photo")
    p.add_argument("--top", type=int, default=5, help="gallery matches to explain (default 5)")
    p.add_argument("--methods", nargs="+", default=list(ENGINE_METHODS), metavar="METHOD",
                   help="attribution methods (default: similarity gradcam); "
                        "see `python -c 'import explain.methods as m; print(m.list_methods())'`")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="one JSON object per match on stdout")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                   help=f"forward passes per pair and method (default {DEFAULT_BUDGET})")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S,
                   help=f"seconds per pair and method (default {DEFAULT_TIME_LIMIT_S:g})")
    p.add_argument("--config", type=Path, help="PhenoLens configuration file (YAML or TOML)")
    p.add_argument("--index", help="FAISS factory string for the gallery")
    group = p.add_argument_group("encoder")
    group.add_argument("--encoder", help="encoder name, e.g. sface, iresnet50")
    group.add_argument("--weights", type=Path, help="checkpoint for the encoder")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="add the mirrored view (default: from the configuration)")
    group.add_argument("--view-scheme", help='explicit views, e.g. "sface:orig,sface:flip"')
    group.add_argument("--aligned", action="store_true", help="the images are aligned crops")
    group.add_argument("--detector", help="face detector, e.g. yunet, mtcnn (default: configured)")
    from server.remote import add_remote_arguments

    add_remote_arguments(p)
    p.set_defaults(func=run_explain)


@dataclass(frozen=True)
class _Match:
    rank: int
    label: str
    crop: np.ndarray  # (H, W, 3) uint8 aligned
    info: dict
    photo: np.ndarray | None = None  # the other original photo (--against only)
    alignment: object | None = None


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _gallery_matches(args: argparse.Namespace, config, embed, query_views) -> list[_Match]:
    from gallery import Gallery, SchemeMismatch

    index = args.index or config.gallery.index or "Flat"
    with Gallery.open(args.gallery, index=index, create=False) as gallery:
        if gallery.view_scheme not in (None, embed.view_scheme):
            raise SchemeMismatch(
                f"the gallery holds {gallery.view_scheme!r} embeddings; this encoder gives "
                f"{embed.view_scheme!r} (pass --view-scheme/--encoder to match it)")
        hits = gallery.search(query_views, args.top, view_scheme=embed.view_scheme)
        matches = []
        for rank, hit in enumerate(hits, start=1):
            record = gallery.get(hit.gallery_id)
            if record.crop_png is None:
                continue
            matches.append(_Match(
                rank, hit.syndrome_name or hit.syndrome_id, _decode_png(record.crop_png),
                {"gallery_id": hit.gallery_id, "image_id": hit.image_id,
                 "subject_id": hit.subject_id, "syndrome_id": hit.syndrome_id,
                 "syndrome_name": hit.syndrome_name, "gallery_score": hit.score},
            ))
    return matches


def run_explain(args: argparse.Namespace) -> int:
    if args.server:
        from server.remote import remote_explain

        return remote_explain(args)
    if args.gallery is None and args.against is None:
        raise ValueError("say what to explain against: --gallery PATH, --against PHOTO or --server HOST:PORT")
    from explain.engine import Explainer
    from explain.errors import UnknownMethod
    from explain.methods import METHODS
    from explain.render import overlay_png, pair_figure, photo_overlay_png, symmetric_limit
    from server.commands.gallery import PipelineEmbedder
    from server.config import load_config

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UnknownMethod(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if args.top < 1:
        raise ValueError("--top must be at least 1")
    config = load_config(args.config)
    embed = PipelineEmbedder(config, args)
    explainer = Explainer(embed.ensemble)
    query_views, query_crop = embed(args.image)
    query_face = embed.last_face
    query_photo = embed.pipeline.load(args.image, frame=query_face.frame)

    if args.gallery is not None:
        matches = _gallery_matches(args, config, embed, query_views)
    else:
        _, other_crop = embed(args.against)
        other = embed.last_face
        matches = [_Match(1, args.against.stem, other_crop, {"image": args.against.name},
                          embed.pipeline.load(args.against), other.alignment)]
    args.out.mkdir(parents=True, exist_ok=True)
    if not matches:
        return 0
    pairs = explainer.explain(query_crop, np.stack([m.crop for m in matches]))

    for match, pair in zip(matches, pairs, strict=True):
        doc = {"rank": match.rank, **match.info, "cosine": pair.cosine,
               "residual": pair.query.residual, "gallery_residual": pair.gallery.residual,
               "bias_share": pair.query.bias_share, "gallery_bias_share": pair.gallery.bias_share,
               "view_cosines": list(pair.view_cosines), "methods": {}}
        for method in args.methods:
            if method in ENGINE_METHODS:
                side = {"similarity": "similarity", "gradcam": "gradcam"}[method]
                q_map, g_map = getattr(pair.query, side), getattr(pair.gallery, side)
                q_aligned = getattr(pair.query, f"{side}_aligned")
                g_aligned = getattr(pair.gallery, f"{side}_aligned")
                entry = {"query_sum": float(q_map.sum()), "gallery_sum": float(g_map.sum())}
            else:
                result = explainer.attribute(method, query_crop, match.crop, budget=args.budget,
                                             time_limit=args.time_limit)
                q_map, g_map = result.query, result.gallery
                q_aligned, g_aligned = result.query_aligned, result.gallery_aligned
                entry = {"query_sum": float(q_map.sum()), "gallery_sum": float(g_map.sum()),
                         "forward_passes": result.forward_passes, "seconds": result.seconds}
            stem = f"match{match.rank:02d}_{method}"
            limit = symmetric_limit(q_aligned, g_aligned)
            out = {
                "pair": args.out / f"{stem}_pair.png",
                "query_photo": args.out / f"{stem}_query_photo.png",
                "gallery_overlay": args.out / f"{stem}_gallery.png",
                "query_map": args.out / f"{stem}_query.npy",
                "gallery_map": args.out / f"{stem}_gallery.npy",
            }
            pair_figure(query_crop, match.crop, q_aligned, g_aligned, cosine=pair.cosine,
                        label=match.label, method=method, path=out["pair"])
            photo_overlay_png(query_photo, q_aligned, query_face.alignment, out["query_photo"],
                              limit=limit)
            if match.photo is not None:
                photo_overlay_png(match.photo, g_aligned, match.alignment, out["gallery_overlay"],
                                  limit=limit)
            else:
                overlay_png(match.crop, g_aligned, out["gallery_overlay"], limit=limit)
            np.save(out["query_map"], q_map)
            np.save(out["gallery_map"], g_map)
            entry["files"] = {k: str(v) for k, v in out.items()}
            doc["methods"][method] = entry
        if args.json:
            print(json.dumps(doc, ensure_ascii=False))
        else:
            print(f"#{match.rank}  cosine {pair.cosine:+.4f}  residual {pair.query.residual:+.1e}  "
                  f"{match.label}  -> {args.out}/match{match.rank:02d}_*")
    return 0
