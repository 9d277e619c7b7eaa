"""``phenolens report``: one self-contained HTML page of a match, for a clinician.

    phenolens report IMAGE --gallery PATH --out report.html [--top 3] [--title TEXT]
    phenolens report IMAGE --server HOST:PORT --out report.html

The page holds the query photo and its detected face, the syndrome and gene
rankings with calibrated confidence, and for each top match the pair figure of
the default explanation, its region summary in words and the cosine (see
``phenolens.report``). Images are inlined; the file needs no network and no
JavaScript. Nothing about the patient is written beyond the photo and --title.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="a self-contained HTML match report",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", type=Path, help="query photo")
    p.add_argument("--gallery", type=Path, help="gallery file (local; or --server)")
    p.add_argument("--out", type=Path, required=True, help="HTML file to write")
    p.add_argument("--top", type=int, default=3, help="matches to explain (default 3)")
    p.add_argument("--title", default="", help="shown in the page title, e.g. a case number")
    p.add_argument("--exclude-subject", action="append", default=[], metavar="ID",
                   help="never match images of this gallery subject")
    p.add_argument("--aligned", action="store_true", help="the image is an aligned crop")
    p.add_argument("--config", type=Path, help="PhenoLens configuration file (YAML or TOML)")
    from server.remote import add_remote_arguments

    add_remote_arguments(p)
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError("--top must be at least 1")
    if args.server:
        from server.remote import remote_report

        return remote_report(args)
    if args.gallery is None:
        raise ValueError("say which gallery: --gallery PATH or --server HOST:PORT")
    if not args.gallery.exists():
        raise FileNotFoundError(f"no gallery file at {args.gallery}")
    from phenolens.report import render_report

    result, photo = local_explain_result(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_report(result, photo, title=args.title), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def local_explain_result(args: argparse.Namespace) -> tuple[Any, Any]:
    """(phenolens ExplainResult, (H, W, 3) photo) of args.image against args.gallery, through
    the server's Explain (``server.application.explain_query`` and its message conversion)
    with pair figures, gallery crops, region effects for every hit and the server's
    default explanation methods (``ExplainConfig.methods``)."""
    from phenolens.results import ExplainResult

    from gallery import Gallery, SearchFilter
    from server import convert
    from server.application import ExplainAsk, explain_query
    from server.backend import Backend
    from server.config import load_config
    from server.limits import RequestScope
    from server.present import Presentation

    with Gallery.open(args.gallery, create=False) as gallery:
        scheme = gallery.view_scheme  # embed the query the way the gallery was embedded
    config = load_config(args.config, gallery={"path": str(args.gallery)},
                         **({"encoder": {"view_scheme": scheme}} if scheme else {}))
    backend = Backend.from_config(config)
    try:
        scope = RequestScope()
        query = backend.query_of_image(args.image.read_bytes(), aligned=args.aligned,
                                       scope=scope)
        ask = ExplainAsk(config.explain.methods, top_k=args.top,
                         filters=SearchFilter(tuple(args.exclude_subject)), effects=args.top,
                         presentation=Presentation(gallery_crops=True, pair_figures=True))
        response = convert.explain_result(explain_query(backend, query, ask, scope),
                                          backend.encoder_id, backend.view_scheme,
                                          detected=not args.aligned)
    finally:
        backend.close()
    return ExplainResult.from_proto(response), query.photo
