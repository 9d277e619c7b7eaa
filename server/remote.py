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
from phenolens.results import ExplainedMatch, MatchResult, percent

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


def _gid(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def match_json(result: MatchResult) -> dict[str, Any]:
    """The document ``phenolens match --json`` prints, from a server's MatchResult."""
    doc: dict[str, Any] = {
        "encoder_id": result.encoder_id,
        "view_scheme": result.view_scheme,
        "gallery_version": result.gallery_version,
    }
    if result.alignment is not None:
        doc["query"] = {"face_count": result.alignment.face_count,
                        "detection_score": result.alignment.detection_score}
    doc["hits"] = [{"rank": h.rank, "gallery_id": _gid(h.gallery_id),
                    "image_id": h.record.image_id, "subject_id": h.record.subject_id,
                    "syndrome_id": h.syndrome_id, "syndrome_name": h.record.syndrome_name,
                    "omim_id": h.record.omim or None, "genes": list(h.record.genes),
                    "cosine": h.cosine, "distance": h.distance,
                    "confidence": h.confidence.to_json()} for h in result.hits]
    doc["syndromes"] = [{"rank": s.rank, "syndrome_id": s.syndrome_id,
                         "syndrome_name": s.syndrome_name, "omim_id": s.omim or None,
                         "cosine": s.cosine, "distance": 1.0 - s.cosine,
                         "nearest_gallery_id": _gid(s.nearest_gallery_id),
                         "nearest_image_id": s.nearest_image_id,
                         "confidence": s.confidence.to_json()} for s in result.syndromes]
    doc["genes"] = [{"rank": g.rank, "gene": g.gene, "cosine": g.cosine,
                     "distance": 1.0 - g.cosine, "nearest_gallery_id": _gid(g.nearest_gallery_id),
                     "confidence": g.confidence.to_json()} for g in result.genes]
    return doc


def explained_json(e: ExplainedMatch) -> dict[str, Any]:
    return {
        "rank": e.hit.rank, "gallery_id": _gid(e.hit.gallery_id),
        "image_id": e.hit.record.image_id, "syndrome_id": e.hit.syndrome_id,
        "cosine": e.hit.cosine, "confidence": e.hit.confidence.to_json(),
        "residual": e.residual, "bias_share": e.bias_share, "methods": list(e.methods),
        "contrast_share": e.contrast_share,
    }


def _filters(args: argparse.Namespace) -> Filters:
    exclude = getattr(args, "exclude_subject", None) or ()
    if isinstance(exclude, str):
        exclude = (exclude,)
    syndromes = getattr(args, "syndrome", None) or ()
    if isinstance(syndromes, str):
        syndromes = (syndromes,)
    distance = getattr(args, "same_patient_distance", None)
    return Filters(exclude_subjects=tuple(exclude),
                   same_patient_rule=bool(getattr(args, "same_patient", False) or distance),
                   same_patient_distance=float(distance or 0.0),
                   syndromes=tuple(syndromes))


def remote_match(args: argparse.Namespace) -> int:
    """``phenolens match IMAGE --server ...``: reads args.image, top, top_syndromes,
    top_genes, exclude_subject, syndrome, same_patient(_distance), aligned, json."""
    with client_from_args(args) as client:
        result = client.match(args.image, aligned=bool(getattr(args, "aligned", False)),
                              top_k=getattr(args, "top", None) or 10,
                              top_syndromes=getattr(args, "top_syndromes", None) or 10,
                              top_genes=getattr(args, "top_genes", None) or 10,
                              filters=_filters(args))
    doc = match_json(result)
    return print_match(doc, as_json=bool(getattr(args, "json", False)))


def print_match(doc: dict, *, as_json: bool) -> int:
    """Prints a match document (``match_json``'s shape) as JSON or as two tables; exit code 0."""
    if as_json:
        print(json.dumps(doc, ensure_ascii=False))
        return 0
    print(f"{'rank':>4}  {'cosine':>7}  {'conf.':>5}  {'syndrome':<20} {'subject':<16} image")
    for h in doc["hits"]:
        print(f"{h['rank']:>4}  {h['cosine']:+.4f}  {_percent(h.get('confidence')):>5}  "
              f"{h['syndrome_id']:<20} {h['subject_id']:<16} {h['image_id']}")
    print(f"\n{'rank':>4}  {'cosine':>7}  {'conf.':>5}  syndrome (nearest image)")
    for s in doc["syndromes"][:10]:
        print(f"{s['rank']:>4}  {s['cosine']:+.4f}  {_percent(s.get('confidence')):>5}  "
              f"{s['syndrome_name']} ({s['nearest_image_id']})")
    note = calibration_note([s.get("confidence") for s in doc["syndromes"]])
    if note:
        print(f"\n{note}")
    return 0


def _percent(confidence: dict | None) -> str:
    if not confidence or confidence.get("probability") is None:
        return "–"
    return percent(confidence["probability"]).replace(" ", "")


def calibration_note(confidences: list[dict | None]) -> str:
    """One line on what the confidences rest on (or why they are missing)."""
    for c in confidences:
        if c and c.get("probability") is not None:
            return (f"conf.: P(query has the syndrome), {c['method']} calibration on "
                    f"{c['samples']} leave-one-subject-out gallery scores, calibration error "
                    f"{100 * c['calibration_error']:.1f} points (gallery version "
                    f"{c['gallery_version']})")
    reasons = sorted({c["reason"] for c in confidences if c and c.get("reason")})
    return f"conf. not calibrated: {reasons[0]}" + (f" (+{len(reasons) - 1} more)"
                                                    if len(reasons) > 1 else "") if reasons else ""


def remote_explain(args: argparse.Namespace) -> int:
    """``phenolens explain IMAGE --server ... --out DIR``: reads args.image, top, methods,
    out, json, aligned and writes the files the local command writes, per match and method:
    ``match{rank:02d}_{method}_pair.png``, ``_query_photo.png``, ``_gallery.png``,
    ``_query.npy`` and ``_gallery.npy`` (feature-resolution maps where the method has them)."""
    import numpy as np

    methods = getattr(args, "methods", None) or ()
    if isinstance(methods, str):
        methods = tuple(m for m in methods.split(",") if m)
    out = Path(getattr(args, "out", None) or "explain-output")
    out.mkdir(parents=True, exist_ok=True)
    with client_from_args(args) as client:
        result = client.explain(args.image, aligned=bool(getattr(args, "aligned", False)),
                                top_k=getattr(args, "top", None) or 5, methods=methods,
                                feature_maps=True, filters=_filters(args),
                                effects=getattr(args, "effects", 0) or 0)
    for e in result.explanations:
        doc = explained_json(e)
        if e.effects:
            doc["effects"] = {fe.side: fe.to_json() for fe in e.effects}
            doc["words"] = {side: e.describe(side) for side in ("query", "gallery")}
        doc["methods"] = {}
        for method in e.methods:
            q, g = e.map(method, "query"), e.map(method, "gallery")
            q_map = q.feature if q.feature is not None else q.aligned
            g_map = g.feature if g.feature is not None else g.aligned
            stem = f"match{e.hit.rank:02d}_{method}"
            files = {"query_map": out / f"{stem}_query.npy",
                     "gallery_map": out / f"{stem}_gallery.npy"}
            np.save(files["query_map"], q_map)
            np.save(files["gallery_map"], g_map)
            try:
                files["pair"] = e.save_overlay(out / f"{stem}_pair.png", method, "both")
                files["gallery_overlay"] = e.save_overlay(out / f"{stem}_gallery.png", method,
                                                          "gallery")
                if e.query_photo is not None:
                    files["query_photo"] = e.save_overlay(out / f"{stem}_query_photo.png",
                                                          method, "query", coords="photo")
            except ImportError:
                pass  # without Pillow the maps are saved, the overlays are not
            doc["methods"][method] = {"query_sum": float(q_map.sum()),
                                      "gallery_sum": float(g_map.sum()),
                                      "regions": {"query": q.regions_json(),
                                                  "gallery": g.regions_json()},
                                      "files": {k: str(v) for k, v in files.items()}}
        if getattr(args, "json", False):
            print(json.dumps(doc, ensure_ascii=False))
        else:
            print(f"#{e.hit.rank}  cosine {e.hit.cosine:+.4f}  confidence "
                  f"{e.hit.confidence.describe()}  residual {e.residual:+.1e}  "
                  f"{e.hit.syndrome_id}  -> {out}/match{e.hit.rank:02d}_*")
            print(f"    query:   {e.describe('query')}\n    gallery: {e.describe('gallery')}")
    return 0


def remote_report(args: argparse.Namespace) -> int:
    """``phenolens report IMAGE --server ... --out report.html``: reads args.image, out, top,
    title, aligned, exclude_subject; the server's default explanation methods."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with client_from_args(args) as client:
        client.report(args.image, args.out, aligned=bool(getattr(args, "aligned", False)),
                      top_k=getattr(args, "top", None) or 3, title=getattr(args, "title", ""),
                      filters=_filters(args))
    print(f"wrote {args.out}")
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
            offset = int(getattr(args, "offset", 0) or 0)
            limit = int(getattr(args, "limit", 100) or 100)
            records = client.iter_images(syndrome_id=getattr(args, "syndrome", None) or "")
            for i, r in enumerate(records):
                if i >= offset + limit:
                    break
                if i >= offset:
                    print(json.dumps(r.__dict__) if as_json else
                          f"{r.gallery_id:>8}  {r.syndrome_id:<20} {r.image_id}")
        elif action == "delete":
            ids = [str(i) for i in (getattr(args, "ids", None) or [])]
            by_gallery_id = getattr(args, "gallery_ids", False) is True
            deleted = client.delete_images(ids if by_gallery_id else (),
                                           image_ids=() if by_gallery_id else ids)
            print(json.dumps({"deleted": deleted}) if as_json else f"deleted {deleted}")
        elif action == "add":
            genes = getattr(args, "genes", None) or ()
            if isinstance(genes, str):
                genes = tuple(g.strip() for g in genes.split(",") if g.strip())
            record = client.add_image(
                args.image, aligned=bool(getattr(args, "aligned", False)),
                image_id=getattr(args, "image_id", None) or Path(args.image).stem,
                subject_id=getattr(args, "subject", None) or "",
                syndrome_id=getattr(args, "syndrome", None) or "",
                syndrome_name=getattr(args, "syndrome_name", None) or "",
                omim=getattr(args, "omim", None) or "", genes=tuple(genes))
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
