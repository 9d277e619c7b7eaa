"""``phenolens gallery {import,stats,add,delete,list,export,features}`` and ``phenolens match``.

Local commands work on a gallery file without a server; with ``--server`` the
same commands go through the client library (``server.remote``). Images are
embedded with the same encoder settings the server uses (``--config`` and
``PHENOLENS_*``, overridden by ``--encoder``/``--flip``/``--view-scheme``), so
a gallery built here is served as is.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

FORMATS = ("auto", "folder", "csv", "gm-split", "gm-encodings", "export")


# -- parsers ----------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, remote: bool = True) -> None:
    parser.add_argument("--gallery", type=Path, help="gallery file (default: the configured one)")
    parser.add_argument("--config", type=Path, help="PhenoLens configuration file (YAML or TOML)")
    parser.add_argument("--index", help="FAISS factory string, e.g. Flat, IVF1024,Flat, HNSW32")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    if remote:
        from server.remote import add_remote_arguments

        add_remote_arguments(parser)


def _encoder_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("encoder (defaults: the configuration's)")
    group.add_argument("--encoder", help="encoder name, e.g. sface, iresnet50")
    group.add_argument("--weights", type=Path, help="checkpoint for the encoder")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="add the mirrored view (GestaltMatcher test-time flip)")
    group.add_argument("--view-scheme", help='explicit views, e.g. "sface:orig,sface:flip"')
    group.add_argument("--aligned", action="store_true",
                       help="images are already aligned crops (skip detection)")
    group.add_argument("--detector", help="face detector, e.g. yunet, mtcnn")


def register(subparsers: argparse._SubParsersAction) -> None:
    gallery = subparsers.add_parser(
        "gallery", help="build and inspect a local gallery",
        description="Manage a gallery file: SQLite records plus a derived FAISS index.")
    sub = gallery.add_subparsers(dest="gallery_command", metavar="ACTION", required=True)

    imp = sub.add_parser("import", help="import a folder tree, CSV manifest, GM files or an export")
    imp.add_argument("source", type=Path, help="folder <label>/<images>, CSV, GM file or export")
    imp.add_argument("--format", choices=FORMATS, default="auto")
    imp.add_argument("--images", type=Path, help="image folder for --format gm-split")
    imp.add_argument("--gm-split", type=Path, help="GM split CSV with the labels (gm-encodings)")
    imp.add_argument("--gm-syndromes", type=Path, help="gmdb_syndromes_vX.tsv (names, OMIM)")
    imp.add_argument("--gm-metadata", type=Path, help="GM metadata pickle (trusted files only)")
    imp.add_argument("--update", action="store_true", help="replace records whose content changed")
    imp.add_argument("--batch-size", type=int, default=32, help="images per committed batch")
    _common(imp)
    _encoder_options(imp)
    imp.set_defaults(func=run_gallery)

    stats = sub.add_parser("stats", help="counts per syndrome and subject, class imbalance")
    _common(stats)
    stats.set_defaults(func=run_gallery)

    add = sub.add_parser("add", help="add one photo")
    add.add_argument("image", type=Path)
    add.add_argument("--image-id", required=True)
    add.add_argument("--subject", required=True, help="subject (patient) id")
    add.add_argument("--syndrome-id", dest="syndrome", required=True)
    add.add_argument("--syndrome-name", default=None)
    add.add_argument("--omim", default=None)
    add.add_argument("--genes", default="", help="comma-separated gene symbols")
    add.add_argument("--update", action="store_true")
    _common(add)
    _encoder_options(add)
    add.set_defaults(func=run_gallery)

    delete = sub.add_parser("delete", help="delete records by image id (or --gallery-ids)")
    delete.add_argument("ids", nargs="+")
    delete.add_argument("--gallery-ids", action="store_true", help="the ids are gallery ids")
    _common(delete)
    delete.set_defaults(func=run_gallery)

    features = sub.add_parser("features", help="fill the feature store Explain reads (the "
                              "server also fills it as images are added and explained)")
    _common(features, remote=False)
    features.set_defaults(func=run_gallery)

    listing = sub.add_parser("list", help="list records, one page")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--offset", type=int, default=0)
    listing.add_argument("--syndrome", help="only this syndrome id")
    _common(listing)
    listing.set_defaults(func=run_gallery)

    export = sub.add_parser("export", help="write a portable file (tar: JSONL + npy + crops)")
    export.add_argument("out", type=Path)
    _common(export, remote=False)
    export.set_defaults(func=run_gallery)

    match = subparsers.add_parser(
        "match", help="match a photo against a gallery",
        description="Nearest gallery images and the syndrome ranking (GestaltMatcher: the "
                    "nearest image per syndrome) for the face in IMAGE.")
    match.add_argument("image", type=Path)
    match.add_argument("--top", type=int, default=10, help="image hits")
    match.add_argument("--top-syndromes", type=int, default=30)
    match.add_argument("--top-genes", type=int, default=30)
    match.add_argument("--exclude-subject", action="append", default=[], metavar="ID")
    match.add_argument("--syndrome", "--syndromes", dest="syndrome", nargs="+", action="extend",
                       default=None, metavar="ID", help="only these syndrome ids")
    match.add_argument("--same-patient", action="store_true",
                       help="drop hits within cosine distance 0.4 (GestaltMatcher's rule)")
    match.add_argument("--same-patient-distance", type=float, default=None)
    _common(match)
    _encoder_options(match)
    match.set_defaults(func=run_match)


# -- wiring -------------------------------------------------------------------------------


def _config(args: argparse.Namespace):
    from server.config import load_config

    return load_config(getattr(args, "config", None))


def _open_gallery(args: argparse.Namespace, config, *, encoder_id: str | None = None,
                  view_scheme: str | None = None, create: bool = True):
    from gallery import Gallery

    path = args.gallery or config.gallery.path
    index = getattr(args, "index", None) or config.gallery.index or "auto"
    return Gallery.open(path, index=index, encoder_id=encoder_id, view_scheme=view_scheme,
                        create=create)


class PipelineEmbedder:
    """``embed(path) -> (V per-view vectors (D_v,), aligned crop (H, W, 3) uint8)`` for imports."""

    def __init__(self, config, args: argparse.Namespace) -> None:
        from encoder import views as ev
        from encoder.pipeline import FacePipeline

        overrides: dict[str, Any] = {}
        if getattr(args, "encoder", None):
            overrides.update(name=args.encoder, view_scheme="")
        if getattr(args, "flip", None) is not None:
            overrides.update(flip=args.flip, view_scheme="")
        if getattr(args, "view_scheme", None):
            overrides["view_scheme"] = args.view_scheme
        enc = replace(config.encoder, **overrides)
        weights = getattr(args, "weights", None) or enc.weights
        self.ensemble = ev.configured_ensemble(enc.name, enc.scheme_id(), weights)
        self.view_scheme = self.ensemble.scheme.id
        self.encoder_id = self.ensemble.encoder_id
        self.pipeline = FacePipeline(getattr(args, "detector", None) or enc.detector,
                                     template=self.ensemble.alignment)
        self.aligned = bool(getattr(args, "aligned", False))
        self.last_face = None

    def __call__(self, path: Path):
        face = self.pipeline.face(Path(path), aligned=self.aligned)
        self.last_face = face
        views = [v[0] for v in self.ensemble.embed_views(face.crop[None])]  # V x (D_v,)
        return views, face.crop


def _detect_format(source: Path) -> str:
    from gallery.exchange import is_export

    if source.is_dir():
        return "folder"
    if is_export(source):
        return "export"
    if source.suffix.lower() in (".pkl", ".p", ".pickle"):
        return "gm-encodings"
    with open(source, newline="", encoding="utf-8-sig") as fh:
        header = fh.readline().replace(";", ",").strip().lower()
    columns = {c.strip() for c in next(csv.reader([header]), [])}
    if {"img_name", "representations"} <= columns:
        return "gm-encodings"
    if {"image_id", "subject", "label"} <= columns and "path" not in columns:
        return "gm-split"
    return "csv"


def _emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, ensure_ascii=False) if args.json else text)


def run_gallery(args: argparse.Namespace) -> int:
    if getattr(args, "server", None):
        from server.remote import remote_gallery

        return remote_gallery(args)
    action = args.gallery_command
    config = _config(args)
    if action == "import":
        return _run_import(args, config)
    if action == "add":
        return _run_add(args, config)
    if action == "features":
        from server.backend import Backend

        if args.gallery:
            config = replace(config, gallery=replace(config.gallery, path=args.gallery))
        backend = Backend.from_config(config)
        try:
            n = backend.fill_feature_store()
            _emit(args, {"stored": n, "images": len(backend.feature_store)},
                  f"stored features of {n} images ({len(backend.feature_store)} in the store)")
        finally:
            backend.close()
        return 0
    with _open_gallery(args, config, create=False) as gallery:
        if action == "stats":
            return _run_stats(args, gallery)
        if action == "list":
            records = gallery.list(limit=args.limit, offset=args.offset, syndrome_id=args.syndrome)
            if args.json:
                for r in records:
                    print(json.dumps(_record_json(r), ensure_ascii=False))
            else:
                for r in records:
                    print(f"{r.gallery_id:>8}  {r.syndrome_id:<20} {r.subject_id:<16} {r.image_id}")
            return 0
        if action == "delete":
            ids = [int(i) for i in args.ids] if args.gallery_ids else args.ids
            n = gallery.delete(ids) if args.gallery_ids else gallery.delete_images(ids)
            _emit(args, {"deleted": n}, f"deleted {n}")
            return 0
        if action == "export":
            from gallery.exchange import export_gallery

            n = export_gallery(gallery, args.out)
            _emit(args, {"exported": n, "path": str(args.out)}, f"exported {n} records to {args.out}")
            return 0
    raise AssertionError(action)


def _run_import(args: argparse.Namespace, config) -> int:
    from gallery import imports
    from gallery.exchange import import_export

    fmt = _detect_format(args.source) if args.format == "auto" else args.format
    if fmt in ("gm-encodings", "export"):
        with _open_gallery(args, config) as gallery:
            if fmt == "export":
                r = import_export(gallery, args.source, update=args.update)
                report = imports.ImportReport(len(r.added), len(r.updated), len(r.unchanged))
            else:
                report = imports.import_gm_encodings(
                    gallery, args.source, split_csv=args.gm_split, syndromes_tsv=args.gm_syndromes,
                    metadata=args.gm_metadata, update=args.update)
            gallery.flush()
    else:
        embed = PipelineEmbedder(config, args)
        with _open_gallery(args, config, encoder_id=embed.encoder_id,
                           view_scheme=embed.view_scheme) as gallery:
            options = {"update": args.update, "batch_size": args.batch_size}
            if fmt == "folder":
                report = imports.import_folder(gallery, args.source, embed, **options)
            elif fmt == "csv":
                report = imports.import_manifest(gallery, args.source, embed, **options)
            elif fmt == "gm-split":
                if args.images is None:
                    print("phenolens: --format gm-split needs --images DIR", file=sys.stderr)
                    return 2
                report = imports.import_gm_split(
                    gallery, args.source, args.images, embed, syndromes_tsv=args.gm_syndromes,
                    metadata=args.gm_metadata, **options)
            else:
                raise AssertionError(fmt)
            gallery.flush()
    doc = {"format": fmt, **report.as_dict()}
    text = f"{fmt}: added {report.added}, updated {report.updated}, unchanged {report.unchanged}"
    if report.failed:
        text += f", failed {len(report.failed)}:\n" + "\n".join(
            f"  {f.item}: {f.reason}" for f in report.failed)
    _emit(args, doc, text)
    return 0


def _run_add(args: argparse.Namespace, config) -> int:
    from gallery import Entry
    from gallery.imports import file_sha256
    from gallery.png import encode_png

    embed = PipelineEmbedder(config, args)
    views, crop = embed(args.image)

    entry = Entry(
        image_id=args.image_id, subject_id=args.subject, syndrome_id=args.syndrome,
        syndrome_name=args.syndrome_name or args.syndrome, omim_id=args.omim,
        genes=tuple(g.strip() for g in args.genes.split(",") if g.strip()), views=views,
        source="cli", crop_png=encode_png(crop),
        provenance={"file_sha256": file_sha256(args.image), "file_name": args.image.name},
    )
    with _open_gallery(args, config, encoder_id=embed.encoder_id,
                       view_scheme=embed.view_scheme) as gallery:
        gallery_id = gallery.add(entry, update=args.update)
    _emit(args, {"gallery_id": gallery_id, "image_id": entry.image_id}, str(gallery_id))
    return 0


def _record_json(info) -> dict[str, Any]:
    doc = asdict(info)
    doc["genes"] = list(info.genes)
    doc["provenance"] = json.loads(info.provenance)
    return doc


def _run_stats(args: argparse.Namespace, gallery) -> int:
    st = gallery.stats()
    doc = asdict(st)
    doc.update(images=st.records, imbalance=st.syndrome_balance.max_min_ratio,
               per_syndrome=st.images_per_syndrome, view_dims=list(st.view_dims))
    if args.json:
        print(json.dumps(doc, ensure_ascii=False))
        return 0
    b = st.syndrome_balance
    lines = [
        f"records: {st.records}   subjects: {st.subjects}   syndromes: {st.syndromes}   genes: {st.genes}",
        f"encoder: {st.encoder_id}   views: {st.view_scheme} {list(st.view_dims)}",
        f"gallery version: {st.gallery_version}   schema: {st.schema_version}   "
        f"index: {st.index_effective_factory}"
        + ("" if st.index_factory == st.index_effective_factory else f" (wanted {st.index_factory})"),
        f"images per syndrome: min {b.min_count}, max {b.max_count}, max/min {b.max_min_ratio:.2f}, "
        f"Gini {b.gini:.3f}, single-image syndromes {b.singletons}, "
        f"single-subject syndromes {st.syndromes_with_one_subject}",
        "",
        f"{'syndrome':<24} {'images':>7} {'subjects':>8}  name",
    ]
    for sid, n in list(st.images_per_syndrome.items())[:30]:
        lines.append(f"{sid:<24} {n:>7} {st.subjects_per_syndrome[sid]:>8}  {st.syndrome_names[sid]}")
    if st.syndromes > 30:
        lines.append(f"... {st.syndromes - 30} more (use --json)")
    print("\n".join(lines))
    return 0


def run_match(args: argparse.Namespace) -> int:
    if getattr(args, "server", None):
        from server.remote import remote_match

        return remote_match(args)
    config = _config(args)
    with _open_gallery(args, config, create=False) as gallery:
        embed = PipelineEmbedder(config, args)
        if gallery.view_scheme not in (None, embed.view_scheme):
            from gallery import SchemeMismatch

            raise SchemeMismatch(
                f"the gallery holds {gallery.view_scheme!r} embeddings; this encoder gives "
                f"{embed.view_scheme!r} (pass --view-scheme/--encoder to match it)")
        views, _ = embed(args.image)
        distance = args.same_patient_distance
        if distance is None and args.same_patient:
            distance = 0.4
        filters = {"exclude_subjects": args.exclude_subject, "same_patient_distance": distance,
                   "syndromes": args.syndrome, "view_scheme": embed.view_scheme}
        hits = gallery.search(views, args.top, **filters)
        syndromes = gallery.rank_syndromes(views, args.top_syndromes, **filters)
        genes = gallery.rank_genes(views, args.top_genes, **filters) if args.top_genes else []
        face = embed.last_face
        from gallery.calibration import calibrate_gallery

        calibration = calibrate_gallery(gallery)
        doc = {
            "encoder_id": gallery.encoder_id, "view_scheme": gallery.view_scheme,
            "gallery_version": gallery.version,
            "query": {"face_count": face.face_count, "detection_score": face.score},
            "hits": [{"rank": i + 1, "gallery_id": h.gallery_id, "image_id": h.image_id,
                      "subject_id": h.subject_id, "syndrome_id": h.syndrome_id,
                      "syndrome_name": h.syndrome_name, "omim_id": h.omim_id, "genes": list(h.genes),
                      "cosine": h.score, "distance": h.distance, "confidence": calibration
                      .hit_confidence(h.syndrome_id, h.score).to_json()} for i, h in enumerate(hits)],
            "syndromes": [{"rank": i + 1, "syndrome_id": s.syndrome_id,
                           "syndrome_name": s.syndrome_name, "omim_id": s.omim_id,
                           "cosine": s.score, "distance": s.distance,
                           "nearest_gallery_id": s.gallery_id, "nearest_image_id": s.image_id,
                           "confidence": calibration.syndrome_confidence(s.syndrome_id, s.score)
                           .to_json()}
                          for i, s in enumerate(syndromes)],
            "genes": [{"rank": i + 1, "gene": g.gene, "cosine": g.score, "distance": g.distance,
                       "nearest_gallery_id": g.gallery_id, "confidence": calibration
                       .gene_confidence(g.gene, g.score).to_json()} for i, g in enumerate(genes)],
        }
    from server.remote import print_match

    return print_match(doc, as_json=args.json)
