"""``--server HOST:PORT`` for the CLI: the same commands through the client library.

Other areas' commands call these when ``args.server`` is set::

    from server.remote import add_remote_arguments, remote_match
    add_remote_arguments(parser)                  # --server, --token, --tls-*
    ...
    if args.server:
        return remote_match(args)

Each ``remote_*`` returns the exit code and prints the same shapes the local
commands print with ``--json`` (a JSON object per line or one document).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from phenolens import TLS, Client, Filters, GalleryRecord, ImportItem
from phenolens.results import ExplainedMatch, MatchResult

TOKEN_ENV = "PHENOLENS_TOKEN"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --server, --token, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --timeout."""
    group = parser.add_argument_group("remote server")
    group.add_argument("--server", metavar="HOST:PORT",
                       help="go through a PhenoLens server instead of a local gallery")
    group.add_argument("--token", default=None,
                       help=f"bearer token (default: ${TOKEN_ENV})")
    group.add_argument("--tls-ca", type=Path, help="PEM of the CA that signed the server (TLS)")
    group.add_argument("--tls-cert", type=Path, help="client certificate PEM (mutual TLS)")
    group.add_argument("--tls-key", type=Path, help="client key PEM (mutual TLS)")
    group.add_argument("--tls-server-name", help="name to check on the server certificate")
    group.add_argument("--timeout", type=float, default=120.0, help="seconds per call")


def client_from_args(args: argparse.Namespace) -> Client:
    tls = None
    if getattr(args, "tls_ca", None) or getattr(args, "tls_cert", None):
        tls = TLS(ca=args.tls_ca, cert=getattr(args, "tls_cert", None),
                  key=getattr(args, "tls_key", None),
                  server_name=getattr(args, "tls_server_name", None))
    token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None
    return Client(args.server, token=token, tls=tls, timeout=getattr(args, "timeout", 120.0))


def match_json(result: MatchResult) -> dict[str, Any]:
    return {
        "encoder_id": result.encoder_id,
        "view_scheme": result.view_scheme,
        "gallery_version": result.gallery_version,
        "hits": [{"rank": h.rank, "gallery_id": h.gallery_id, "image_id": h.record.image_id,
                  "subject_id": h.record.subject_id, "syndrome_id": h.syndrome_id,
                  "syndrome_name": h.record.syndrome_name, "cosine": h.cosine,
                  "distance": h.distance} for h in result.hits],
        "syndromes": [{"rank": s.rank, "syndrome_id": s.syndrome_id,
                       "syndrome_name": s.syndrome_name, "cosine": s.cosine,
                       "nearest_gallery_id": s.nearest_gallery_id} for s in result.syndromes],
        "genes": [{"rank": g.rank, "gene": g.gene, "cosine": g.cosine} for g in result.genes],
    }


def explained_json(e: ExplainedMatch) -> dict[str, Any]:
    return {
        "rank": e.hit.rank, "gallery_id": e.hit.gallery_id, "image_id": e.hit.record.image_id,
        "syndrome_id": e.hit.syndrome_id, "cosine": e.hit.cosine, "residual": e.residual,
        "bias_share": e.bias_share, "methods": list(e.methods),
    }


def _filters(args: argparse.Namespace) -> Filters:
    exclude = getattr(args, "exclude_subject", None) or ()
    if isinstance(exclude, str):
        exclude = (exclude,)
    syndromes = getattr(args, "syndrome", None) or ()
    if isinstance(syndromes, str):
        syndromes = (syndromes,)
    return Filters(exclude_subjects=tuple(exclude),
                   same_patient_rule=bool(getattr(args, "same_patient", False)),
                   syndromes=tuple(syndromes))


def remote_match(args: argparse.Namespace) -> int:
    """``phenolens match IMAGE --server ...`` (reads args.image, args.top, args.json)."""
    with client_from_args(args) as client:
        result = client.match(args.image, top_k=getattr(args, "top", 10) or 10,
                              filters=_filters(args))
    if getattr(args, "json", False):
        print(json.dumps(match_json(result)))
    else:
        for h in result.hits:
            print(f"{h.rank:>3}  {h.cosine:+.4f}  {h.syndrome_id:<20} {h.record.image_id}")
    return 0


def remote_explain(args: argparse.Namespace) -> int:
    """``phenolens explain IMAGE --server ... --out DIR`` (args.image, args.top, args.methods,
    args.out, args.json): writes overlays and .npy maps per match, like the local command."""
    methods = getattr(args, "methods", None) or ()
    if isinstance(methods, str):
        methods = tuple(m for m in methods.split(",") if m)
    out = Path(getattr(args, "out", None) or "explain-output")
    out.mkdir(parents=True, exist_ok=True)
    with client_from_args(args) as client:
        result = client.explain(args.image, top_k=getattr(args, "top", 3) or 3,
                                methods=methods, filters=_filters(args))
    import numpy as np

    for e in result.explanations:
        stem = f"match_{e.hit.rank:02d}"
        for method in e.methods:
            for side in ("query", "gallery"):
                np.save(out / f"{stem}_{method}_{side}.npy", e.map(method, side).aligned)
            try:
                e.save_overlay(out / f"{stem}_{method}.png", method)
            except ImportError:
                pass  # Pillow absent: maps are saved, overlays are not
        line = explained_json(e)
        if getattr(args, "json", False):
            print(json.dumps(line))
        else:
            print(f"{line['rank']:>3}  {line['cosine']:+.4f}  {line['syndrome_id']:<20} "
                  f"residual {line['residual']:+.2e}  -> {out / stem}_*")
    return 0


def _iter_images(folder: Path) -> list[tuple[str, Path]]:
    """(label, path) for a ``<label>/<images>`` tree."""
    return [(p.parent.name, p) for p in sorted(folder.rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES and p.parent != folder]


def remote_gallery(args: argparse.Namespace) -> int:
    """``phenolens gallery {import,stats,list,add,delete} ... --server``; reads
    args.gallery_command (or args.action) and the usual fields of each subcommand."""
    action = getattr(args, "gallery_command", None) or getattr(args, "action", None)
    as_json = getattr(args, "json", False)
    with client_from_args(args) as client:
        if action == "stats":
            s = client.gallery_stats()
            doc = {"images": s.images, "subjects": s.subjects, "syndromes": s.syndromes,
                   "imbalance": s.imbalance, "gallery_version": s.gallery_version,
                   "per_syndrome": {c.syndrome_id: c.images for c in s.per_syndrome}}
            print(json.dumps(doc) if as_json else "\n".join(f"{k}: {v}" for k, v in doc.items()))
        elif action == "list":
            for r in client.iter_images(syndrome_id=getattr(args, "syndrome", None) or ""):
                print(json.dumps(r.__dict__) if as_json else
                      f"{r.gallery_id:>8}  {r.syndrome_id:<20} {r.image_id}")
        elif action == "delete":
            ids = getattr(args, "ids", None) or getattr(args, "gallery_ids", None) or []
            print(client.delete_images([str(i) for i in ids]))
        elif action == "add":
            record = client.add_image(
                args.image, image_id=getattr(args, "image_id", None) or Path(args.image).stem,
                subject_id=getattr(args, "subject", None) or "",
                syndrome_id=getattr(args, "syndrome", None) or "",
                syndrome_name=getattr(args, "syndrome_name", None) or "")
            print(json.dumps(record.__dict__) if as_json else record.gallery_id)
        elif action == "import":
            source = Path(getattr(args, "source", None) or args.path)
            if not source.is_dir():
                print("phenolens: --server import takes a <label>/<images> folder",
                      file=sys.stderr)
                return 2
            items = (ImportItem(GalleryRecord("", image_id=f"{label}/{path.name}",
                                              subject_id=f"{label}/{path.stem}",
                                              syndrome_id=label, syndrome_name=label,
                                              source=str(path)), image=path)
                     for label, path in _iter_images(source))
            summary = client.import_gallery(items)
            print(json.dumps(summary.__dict__) if as_json else
                  f"received {summary.received}, added {summary.added}, "
                  f"unchanged {summary.unchanged}")
        else:
            print(f"phenolens: gallery {action} has no --server form", file=sys.stderr)
            return 2
    return 0
