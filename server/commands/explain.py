"""``phenolens explain``: maps on both faces for the top-K gallery matches of a photo (or pairs).

    phenolens explain IMAGE --gallery PATH [--top K] [--methods contrast similarity ...] --out DIR [--json]
    phenolens explain IMAGE --against OTHER_IMAGE --out DIR
    phenolens explain --pairs PAIRS.csv --out DIR [--methods ...] [--json]

Writes, per match and method: the pair figure, the query map drawn on the
original photo, the gallery-side overlay, and the raw maps (.npy, native
resolution: 7x7 cells for the CAM family, the aligned crop for pixel methods).
With --json, prints one JSON object per match. ``--pairs`` explains every
(query, gallery) row of a CSV with columns ``query,gallery`` (photo paths,
relative to the CSV) in one process, the model loaded once; files are named
``pairNNN_<method>_*`` and each JSON line names both photos.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    from explain.attribution.catalogue import DEFAULT_METHODS, METHOD_NAMES
    from explain.limits import DEFAULT_BUDGET, DEFAULT_TIME_LIMIT_S

    p = subparsers.add_parser(
        "explain",
        help="explain matches with signed maps on both faces",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", type=Path, nargs="?", help="query photo (not with --pairs)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--gallery", type=Path, help="gallery file to search")
    target.add_argument("--against", type=Path, help="explain one pair: the query and this photo")
    target.add_argument("--pairs", type=Path,
                        help="CSV with columns query,gallery: explain every pair, model loaded once")
    p.add_argument("--top", type=int, default=5, help="gallery matches to explain (default 5)")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"attribution methods (default: {' '.join(DEFAULT_METHODS)}); one or "
                        f"more of: {' '.join(METHOD_NAMES)}")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="one JSON object per match on stdout")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                   help=f"forward passes per pair and method (default {DEFAULT_BUDGET})")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S,
                   help=f"seconds per pair and method (default {DEFAULT_TIME_LIMIT_S:g})")
    p.add_argument("--effects", type=int, default=3, metavar="N",
                   help="region effects (what editing each region of either face does to the "
                        "cosine; the words come from them) for the first N matches; every "
                        "pair with --against/--pairs unless 0 (default 3)")
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
    photo: np.ndarray | None = None  # the other original photo (--against, --pairs)
    alignment: object | None = None


@dataclass(frozen=True)
class _Query:
    crop: np.ndarray  # (H, W, 3) uint8 aligned
    photo: np.ndarray  # the original photo
    alignment: object | None


# One explained pair as the files are written from it: the match, explain_matches's maps of
# the pair and each method's maps presented (server.present: region summaries).
_Explained = tuple[_Match, Any, tuple[Any, ...]]


def _photo(embed, path: Path) -> _Query:
    """Decode a photo once and align its face (the explainer encodes the crop, once)."""
    photo, face = embed.pipeline.photo_face(path, aligned=embed.aligned)
    return _Query(face.crop, photo, face.alignment)


def _read_pairs(path: Path) -> list[tuple[Path, Path]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"query", "gallery"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path.name}: needs columns query,gallery; got {reader.fieldnames}")
        rows = [(r["query"].strip(), r["gallery"].strip()) for r in reader
                if (r["query"] or "").strip()]
    return [(path.parent / q, path.parent / g) for q, g in rows]


def run_explain(args: argparse.Namespace) -> int:
    from explain.attribution.catalogue import DEFAULT_METHODS, check_methods

    args.methods = list(check_methods(args.methods or DEFAULT_METHODS))
    if args.server:
        if args.pairs is not None:
            raise ValueError("--pairs runs locally; drop --server")
        from server.remote import remote_explain

        return remote_explain(args)
    if (args.image is None) == (args.pairs is None):
        raise ValueError("give a query IMAGE (with --gallery, --against or --server) or --pairs")
    if args.image is not None and args.gallery is None and args.against is None:
        raise ValueError("say what to explain against: --gallery PATH, --against PHOTO or --server HOST:PORT")
    if args.top < 1:
        raise ValueError("--top must be at least 1")
    from explain.attribution.engine import Explainer
    from server.commands.gallery import PipelineEmbedder
    from server.config import load_config

    config = load_config(args.config)
    embed = PipelineEmbedder(config, args)
    explainer = Explainer(embed.ensemble)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pairs is not None:
        for number, (q_path, g_path) in enumerate(_read_pairs(args.pairs), start=1):
            _explain_pair(args, embed, explainer, q_path, g_path,
                          {"query": str(q_path), "gallery": str(g_path)}, f"pair{number:03d}")
    elif args.gallery is not None:
        _explain_gallery(args, config, embed, explainer)
    else:
        _explain_pair(args, embed, explainer, args.image, args.against,
                      {"image": args.against.name}, None)
    return 0


def _explain_pair(args: argparse.Namespace, embed, explainer, q_path: Path, g_path: Path,
                  info: dict, prefix: str | None) -> None:
    """One pair of photos: both faces aligned, each encoded once (by explain_matches), region
    effects unless --effects 0; files and output."""
    from explain.attribution.matches import explain_matches
    from server.present import present_maps

    query, other = _photo(embed, q_path), _photo(embed, g_path)
    match = _Match(1, g_path.stem, other.crop, info, other.photo, other.alignment)
    (pair,) = explain_matches(explainer, query.crop, other.crop[None], args.methods,
                              budget=args.budget, time_limit=args.time_limit,
                              effects=min(args.effects, 1))
    _write(args, query, [(match, pair, present_maps(pair))], prefix)


def _explain_gallery(args: argparse.Namespace, config, embed, explainer) -> None:
    """The top matches of args.image in args.gallery, explained the way the server's Explain
    does (``server.application.explain_query``: one encode of the query for the search and
    the maps), with region effects for the first args.effects; hits whose gallery image
    has no stored crop are left out."""
    from dataclasses import replace

    from gallery import Gallery, SchemeMismatch
    from server.application import ExplainAsk, explain_query
    from server.backend import Backend
    from server.limits import RequestScope

    photo, face = embed.pipeline.photo_face(args.image, aligned=embed.aligned)
    index = args.index or config.gallery.index or "auto"
    with Gallery.open(args.gallery, index=index, create=False) as gallery:
        if gallery.view_scheme not in (None, embed.view_scheme):
            raise SchemeMismatch(
                f"the gallery holds {gallery.view_scheme!r} embeddings; this encoder gives "
                f"{embed.view_scheme!r} (pass --view-scheme/--encoder to match it)")
        limits = replace(config.explain, budget=args.budget, time_limit_s=args.time_limit)
        backend = Backend(replace(config, explain=limits), pipeline=embed.pipeline,
                          views=embed.ensemble, gallery=gallery, explainer=explainer,
                          encoder_id=embed.encoder_id, view_scheme=embed.view_scheme)
        scope = RequestScope()
        result = explain_query(backend, backend.query_of_face(face, scope, photo), ExplainAsk(
            tuple(args.methods), top_k=args.top, top_syndromes=0, top_genes=0,
            effects=args.effects, skip_uncropped=True), scope)
        _write(args, _Query(face.crop, photo, face.alignment),
               ((_gallery_match(p), p.pair, p.maps) for p in result.matches), None)


def _gallery_match(p) -> _Match:
    """A ``server.present.PresentedMatch`` as the files and the JSON name it."""
    hit = p.hit
    return _Match(p.rank, hit.syndrome_name or hit.syndrome_id, p.explained.gallery_crop,
                  {"gallery_id": hit.gallery_id, "image_id": hit.image_id,
                   "subject_id": hit.subject_id, "syndrome_id": hit.syndrome_id,
                   "syndrome_name": hit.syndrome_name, "gallery_score": hit.score,
                   "confidence": p.confidence.to_json()})


def _write(args: argparse.Namespace, query: _Query, explained: Iterable[_Explained],
           prefix: str | None) -> None:
    """Per explained match and method, the pair figure, the query map on the photo, the
    gallery overlay and the raw maps into args.out; a JSON line or a summary on stdout."""
    from explain.render import overlay_png, pair_figure, photo_overlay_png, symmetric_limit
    from server.present import drawn_maps

    for match, maps, presented in explained:
        doc = {"rank": match.rank, **match.info, "cosine": maps.cosine,
               "residual": maps.residual, "gallery_residual": maps.gallery_residual,
               "bias_share": maps.bias_share, "gallery_bias_share": maps.gallery_bias_share,
               "view_cosines": list(maps.view_cosines),
               "contrast_share": maps.contrast_share, "methods": {}}
        words = None
        if maps.effects is not None:
            doc["effects"] = {"query": maps.effects.query.to_json(),
                              "gallery": maps.effects.gallery.to_json()}
            words = (maps.effects.query.describe(), maps.effects.gallery.describe())
            doc["words"] = {"query": words[0], "gallery": words[1]}
        name = prefix or f"match{match.rank:02d}"
        for shown in presented:
            m = shown.source
            entry = {"query_sum": float(m.query.sum()), "gallery_sum": float(m.gallery.sum())}
            if not m.batched:
                entry.update(forward_passes=m.forward_passes, seconds=m.seconds)
            stem = f"{name}_{m.method}"
            drawn_q, drawn_g, note = drawn_maps(maps, m)
            limit = symmetric_limit(drawn_q, drawn_g)
            out = {
                "pair": args.out / f"{stem}_pair.png",
                "query_photo": args.out / f"{stem}_query_photo.png",
                "gallery_overlay": args.out / f"{stem}_gallery.png",
                "query_map": args.out / f"{stem}_query.npy",
                "gallery_map": args.out / f"{stem}_gallery.npy",
            }
            pair_figure(query.crop, match.crop, drawn_q, drawn_g, cosine=maps.cosine,
                        label=match.label, method=m.method, path=out["pair"], words=words,
                        note=note)
            photo_overlay_png(query.photo, drawn_q, query.alignment, out["query_photo"],
                              limit=limit)
            if match.photo is not None:
                photo_overlay_png(match.photo, drawn_g, match.alignment,
                                  out["gallery_overlay"], limit=limit)
            else:
                overlay_png(match.crop, drawn_g, out["gallery_overlay"], limit=limit)
            np.save(out["query_map"], m.query)
            np.save(out["gallery_map"], m.gallery)
            entry["files"] = {k: str(v) for k, v in out.items()}
            entry["regions"] = {"query": shown.query_regions.to_json(),
                                "gallery": shown.gallery_regions.to_json()}
            doc["methods"][m.method] = entry
        if args.json:
            print(json.dumps(doc, ensure_ascii=False), flush=True)
        else:
            p = match.info.get("confidence", {}).get("probability")
            print(f"#{match.rank}  cosine {maps.cosine:+.4f}  confidence "
                  f"{'–' if p is None else f'{100 * p:.0f}%'}  residual {maps.residual:+.1e}  "
                  f"{match.label}  -> {args.out}/{name}_*")
            if words is not None:
                print(f"    query:   {words[0]}\n    gallery: {words[1]}")
