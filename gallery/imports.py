"""Imports into a gallery: a folder tree, a CSV manifest, GestaltMatcher's formats.

Images are embedded by an injected ``embed(path) -> (views, aligned_crop)`` callable
(views: (V, D) or V vectors; crop: (H, W, 3) uint8, PNG bytes or None), so this
package never imports torch; the CLI wires in the encoder pipeline.

Re-importing is idempotent: a row whose image id is already stored with the same
labels and the same file bytes (sha256 in the record's provenance) is skipped
without embedding; same id with other content raises DuplicateId unless ``update``.

GestaltMatcher formats (DESIGN.md §4):
- split CSVs ``image_id, subject, label`` (label = syndrome id);
- ``gmdb_syndromes_vX.tsv`` (``syndrome_id, syndrome_name, ..., OMIM``);
- the metadata pickle ``{disorder_level_metadata, gene_level_metadata, gene_metadata,
  disorder_metadata}``: dicts keyed by image id / internal id as the GM service uses
  them (``patient_id``, ``disorder_internal_id``, ``gene_internal_id``, ``gene_name``,
  ``disorder_name``, ``omim_id``); pandas DataFrames in their place are read when
  pandas is importable;
- encodings tables ``img_name, model, flip, gray, class_conf, representations``
  (pickle or ``;``-separated CSV with JSON vectors), one row per view; rows are
  grouped by image (``img_name`` up to its first ``_``, as GM's ``prep_csv``) into
  views ordered by (model, flip, gray).

Pickles can run code when loaded: import only pickles you trust.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gallery.errors import GalleryError, ImportFormatError
from gallery.png import encode_png
from gallery.records import Entry
from gallery.store import Gallery
from gallery.vectors import ViewsLike

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

Embedder = Callable[[Path], tuple[ViewsLike, "np.ndarray | bytes | None"]]


@dataclass(frozen=True)
class ManifestRow:
    """One image to import: where it is and its labels."""

    path: Path
    image_id: str
    subject_id: str
    syndrome_id: str
    syndrome_name: str
    omim_id: str | None = None
    genes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImportFailure:
    """An item that was not imported: ``item`` names it for the operator, ``reason`` says why."""

    item: str
    reason: str


@dataclass(frozen=True)
class ImportReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: tuple[ImportFailure, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added, "updated": self.updated, "unchanged": self.unchanged,
            "failed": [{"item": f.item, "reason": f.reason} for f in self.failed],
        }


def _progress(items: Sequence, desc: str, progress: bool | None) -> Iterable:
    """tqdm on stderr when it is a terminal (or when asked), silent otherwise."""
    disable = not sys.stderr.isatty() if progress is None else not progress
    return tqdm(items, desc=desc, unit="img", disable=disable, file=sys.stderr)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _split_genes(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    for sep in (";", "|", ","):
        if sep in text:
            return tuple(g.strip() for g in text.split(sep) if g.strip())
    return (text.strip(),)


# -- sources --------------------------------------------------------------------------


def read_folder(root: str | Path) -> list[ManifestRow]:
    """``root/<label>/<image>``: label = syndrome id and name, image id = ``label/file``.

    The subject is unknown in a bare tree, so each image is its own subject.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImportFormatError(f"{root} is not a folder")
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(label_dir.iterdir()):
            if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES:
                image_id = f"{label_dir.name}/{image.name}"
                rows.append(ManifestRow(image, image_id, image_id, label_dir.name, label_dir.name))
    if not rows:
        raise ImportFormatError(f"no images found under {root}/<label>/")
    return rows


_MANIFEST_ALIASES = {
    "path": ("path", "file", "image_path"),
    "image_id": ("image_id", "image", "id"),
    "subject_id": ("subject_id", "subject", "patient_id"),
    "syndrome_id": ("syndrome_id", "label", "disorder_id"),
    "syndrome_name": ("syndrome_name", "syndrome", "disorder_name"),
    "omim_id": ("omim_id", "omim"),
    "genes": ("genes", "gene", "gene_names"),
}


def read_manifest(csv_path: str | Path) -> list[ManifestRow]:
    """A CSV manifest with columns path, image_id, subject_id, syndrome_id, syndrome_name,
    omim_id, genes (``;``-separated); relative paths are relative to the CSV's folder."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = {h.strip().lower(): h for h in reader.fieldnames or ()}
        columns = {
            key: next((header[a] for a in aliases if a in header), None)
            for key, aliases in _MANIFEST_ALIASES.items()
        }
        missing = [k for k in ("path", "syndrome_id") if columns[k] is None]
        if missing:
            raise ImportFormatError(f"{csv_path.name} lacks column(s) {missing}")
        rows = []
        for line, raw in enumerate(reader, start=2):

            def get(key: str, raw: dict = raw) -> str:
                col = columns[key]
                return (raw.get(col) or "").strip() if col else ""

            path = Path(get("path"))
            if not get("path"):
                raise ImportFormatError(f"{csv_path.name} line {line}: empty path")
            path = path if path.is_absolute() else csv_path.parent / path
            image_id = get("image_id") or get("path")
            rows.append(ManifestRow(
                path=path, image_id=image_id, subject_id=get("subject_id") or image_id,
                syndrome_id=get("syndrome_id"), syndrome_name=get("syndrome_name") or get("syndrome_id"),
                omim_id=get("omim_id") or None, genes=_split_genes(get("genes")),
            ))
    return rows


@dataclass(frozen=True)
class GmLabels:
    """Labels from GestaltMatcher metadata: per image (subject, syndrome id, genes) and
    per syndrome (name, OMIM id)."""

    images: dict[str, tuple[str, str, tuple[str, ...]]]
    syndromes: dict[str, tuple[str, str | None]]

    def merged(self, other: GmLabels) -> GmLabels:
        images = dict(self.images)
        for key, (subject, syndrome, genes) in other.images.items():
            old = images.get(key)
            images[key] = (subject, syndrome, genes or (old[2] if old else ()))
        return GmLabels(images, {**self.syndromes, **other.syndromes})

    def row(self, image_key: str, path: Path) -> ManifestRow | None:
        found = self.images.get(image_key)
        if found is None:
            return None
        subject, syndrome_id, genes = found
        name, omim = self.syndromes.get(syndrome_id, (syndrome_id, None))
        return ManifestRow(path, image_key, subject, syndrome_id, name, omim, genes)


def _clean(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN from pandas
            return ""
        if value.is_integer():
            value = int(value)
    return str(value).strip()


def image_key(name: Any) -> str:
    """GM's image key: the file name up to its first ``_`` (and without extension)."""
    text = Path(_clean(name)).name
    return Path(text.split("_")[0]).stem if "_" in text else Path(text).stem


def read_gm_split(csv_path: str | Path) -> GmLabels:
    """A GM split CSV ``image_id, subject, label``."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        sample = fh.read(4096)
        fh.seek(0)
        delimiter = ";" if sample.count(";") > sample.count(",") else ","
        reader = csv.DictReader(fh, delimiter=delimiter)
        need = {"image_id", "subject", "label"}
        if not need <= set(reader.fieldnames or ()):
            raise ImportFormatError(f"{csv_path.name} needs columns {sorted(need)}")
        images = {
            image_key(r["image_id"]): (_clean(r["subject"]), _clean(r["label"]), ())
            for r in reader
        }
    return GmLabels(images, {})


def read_gm_syndromes(tsv_path: str | Path) -> dict[str, tuple[str, str | None]]:
    """``gmdb_syndromes_vX.tsv`` -> syndrome id -> (name, OMIM id)."""
    tsv_path = Path(tsv_path)
    with open(tsv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        if not {"syndrome_id", "syndrome_name"} <= set(reader.fieldnames or ()):
            raise ImportFormatError(f"{tsv_path.name} needs columns syndrome_id, syndrome_name")
        return {
            _clean(r["syndrome_id"]): (_clean(r["syndrome_name"]), _clean(r.get("OMIM")) or None)
            for r in reader
        }


def _as_mapping(table: Any, key_column: str | None = None) -> dict[Any, Any]:
    """A GM metadata table as a dict: dicts stay, DataFrames (pandas) become dicts of rows."""
    if isinstance(table, Mapping):
        return dict(table)
    if hasattr(table, "to_dict") and hasattr(table, "columns"):
        if key_column and key_column in table.columns:
            rows = table.to_dict("records")
            out: dict[Any, Any] = {}
            for row in rows:
                out.setdefault(row[key_column], []).append(row)
            return {k: v[0] if len(v) == 1 else v for k, v in out.items()}
        return table.to_dict("index")
    raise ImportFormatError(f"unsupported GM metadata table type {type(table).__name__}")


def read_gm_metadata(pickle_path: str | Path) -> GmLabels:
    """GM's image/gene/syndrome metadata pickle (trusted files only: pickles run code)."""
    with open(pickle_path, "rb") as fh:
        data = pickle.load(fh)  # noqa: S301 (GM's own format; documented as trusted-only)
    keys = ("disorder_level_metadata", "gene_level_metadata", "gene_metadata", "disorder_metadata")
    if not isinstance(data, Mapping) or not all(k in data for k in keys):
        raise ImportFormatError(f"GM metadata pickle needs the tables {list(keys)}")
    per_image = _as_mapping(data["disorder_level_metadata"], "image_id")
    gene_rows = _as_mapping(data["gene_level_metadata"], "image_id")
    gene_meta = _as_mapping(data["gene_metadata"], "gene_internal_id")
    disorders = _as_mapping(data["disorder_metadata"], "disorder_internal_id")
    syndromes = {
        _clean(k): (_clean(v.get("disorder_name")) or _clean(k), _clean(v.get("omim_id")) or None)
        for k, v in disorders.items()
    }
    images = {}
    for image_id, row in per_image.items():
        if isinstance(row, list):
            row = row[0]
        genes: list[str] = []
        entries = gene_rows.get(image_id, [])
        for gene in entries if isinstance(entries, list) else [entries]:
            name = _clean(gene.get("gene_name"))
            if not name and "gene_internal_id" in gene:
                name = _clean(gene_meta.get(gene["gene_internal_id"], {}).get("gene_name"))
            if name and name not in genes:
                genes.append(name)
        images[_clean(image_id)] = (
            _clean(row.get("patient_id", row.get("subject"))),
            _clean(row.get("disorder_internal_id", row.get("label"))),
            tuple(genes),
        )
    return GmLabels(images, syndromes)


@dataclass(frozen=True)
class GmEncodings:
    """Per-image views from a GM encodings table, and the view scheme they follow."""

    views: dict[str, list[np.ndarray]]
    view_names: tuple[str, ...]
    encoder_id: str

    @property
    def view_scheme(self) -> str:
        return ",".join(self.view_names)


def gm_view_name(model: str, flip: bool, gray: bool) -> str:
    """``model:orig``, ``model:orig+gray``, ``model:flip``, ``model:flip+gray`` (``encoder.views.View.id``)."""
    return f"{model}:{'flip' if flip else 'orig'}{'+gray' if gray else ''}"


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "t")
    return bool(value)


def _encoding_rows(path: Path) -> Iterator[Mapping[str, Any]]:
    if path.suffix.lower() in (".pkl", ".p", ".pickle"):
        with open(path, "rb") as fh:
            table = pickle.load(fh)  # noqa: S301 (GM's own format; trusted files only)
        if hasattr(table, "to_dict") and hasattr(table, "columns"):
            yield from table.to_dict("records")
        elif isinstance(table, Mapping):
            columns = list(table)
            yield from (dict(zip(columns, values, strict=True)) for values in zip(*table.values(), strict=True))
        else:
            yield from table
        return
    with open(path, newline="", encoding="utf-8-sig") as fh:
        sample = fh.readline()
        fh.seek(0)
        delimiter = ";" if ";" in sample else ","
        for row in csv.DictReader(fh, delimiter=delimiter):
            row = dict(row)
            row["representations"] = json.loads(row["representations"])
            yield row


def read_gm_encodings(path: str | Path) -> GmEncodings:
    """A GM encodings table (pickle or CSV) grouped into per-image views."""
    path = Path(path)
    grouped: dict[str, list[tuple[tuple, np.ndarray]]] = {}
    for row in _encoding_rows(path):
        missing = {"img_name", "model", "flip", "gray", "representations"} - set(row)
        if missing:
            raise ImportFormatError(f"{path.name} lacks column(s) {sorted(missing)}")
        order = (_clean(row["model"]), _as_bool(row["flip"]), _as_bool(row["gray"]))
        vector = np.asarray(row["representations"], dtype=np.float32).reshape(-1)
        grouped.setdefault(image_key(row["img_name"]), []).append((order, vector))
    if not grouped:
        raise ImportFormatError(f"{path.name} has no encodings")
    schemes = set()
    views = {}
    for key, items in grouped.items():
        items.sort(key=lambda item: item[0])
        schemes.add(tuple(o for o, _ in items))
        views[key] = [v for _, v in items]
    if len(schemes) != 1:
        raise ImportFormatError(f"{path.name}: images have different sets of (model, flip, gray) views")
    scheme = schemes.pop()
    names = tuple(gm_view_name(*o) for o in scheme)
    models = "+".join(dict.fromkeys(o[0] for o in scheme))
    return GmEncodings(views, names, models)


# -- importers ------------------------------------------------------------------------


def import_rows(
    gallery: Gallery,
    rows: Sequence[ManifestRow],
    embed: Embedder,
    *,
    source: str,
    update: bool = False,
    batch_size: int = 32,
    progress: bool | None = None,
) -> ImportReport:
    """Embed and add ``rows``; commits every ``batch_size`` images. Images whose
    embedding fails (no face, unreadable) are reported, not fatal."""
    added = updated = unchanged = 0
    failed: list[ImportFailure] = []
    pending: list[Entry] = []

    def commit() -> None:
        nonlocal added, updated, unchanged
        if pending:
            report = gallery.add_many(pending, update=update, batch_size=len(pending))
            added += len(report.added)
            updated += len(report.updated)
            unchanged += len(report.unchanged)
            pending.clear()

    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        known = gallery.find_images(r.image_id for r in chunk)
        for row in _progress(chunk, "import", progress) if len(rows) > batch_size else chunk:
            try:
                digest = file_sha256(row.path)
            except OSError as exc:
                failed.append(ImportFailure(str(row.path), type(exc).__name__))
                continue
            info = known.get(row.image_id)
            if info is not None and _same_labels(info, row) and json.loads(info.provenance).get("file_sha256") == digest:
                unchanged += 1
                continue
            try:
                views, crop = embed(row.path)
            except GalleryError:
                raise
            except Exception as exc:  # one bad photo must not abort a long import; it is reported
                failed.append(ImportFailure(str(row.path), f"{type(exc).__name__}: {exc}"))
                continue
            pending.append(Entry(
                image_id=row.image_id, subject_id=row.subject_id, syndrome_id=row.syndrome_id,
                syndrome_name=row.syndrome_name, omim_id=row.omim_id, genes=row.genes, views=views,
                source=source, crop_png=_crop_png(crop),
                provenance={"file_sha256": digest, "file_name": row.path.name},
            ))
        commit()
    if failed:
        log.info("import finished with %d image(s) not imported", len(failed))
    return ImportReport(added, updated, unchanged, tuple(failed))


def _same_labels(info: Any, row: ManifestRow) -> bool:
    return (info.subject_id, info.syndrome_id, info.syndrome_name, info.omim_id, info.genes) == (
        row.subject_id, row.syndrome_id, row.syndrome_name, row.omim_id, row.genes
    )


def _crop_png(crop: np.ndarray | bytes | None) -> bytes | None:
    if crop is None or isinstance(crop, bytes):
        return crop
    return encode_png(np.asarray(crop))


def import_folder(gallery: Gallery, root: str | Path, embed: Embedder, **kwargs: Any) -> ImportReport:
    """Import a ``<label>/<images>`` tree (see ``read_folder``)."""
    return import_rows(gallery, read_folder(root), embed, source="folder", **kwargs)


def import_manifest(gallery: Gallery, csv_path: str | Path, embed: Embedder, **kwargs: Any) -> ImportReport:
    """Import the images a CSV manifest lists (see ``read_manifest``)."""
    return import_rows(gallery, read_manifest(csv_path), embed, source="csv", **kwargs)


def gm_labels(
    *, split_csv: str | Path | None = None, syndromes_tsv: str | Path | None = None,
    metadata: str | Path | None = None,
) -> GmLabels:
    """Labels from any combination of GM metadata files (later ones fill gaps)."""
    labels = GmLabels({}, {})
    if metadata is not None:
        labels = labels.merged(read_gm_metadata(metadata))
    if split_csv is not None:
        labels = labels.merged(read_gm_split(split_csv))
    if syndromes_tsv is not None:
        labels = labels.merged(GmLabels({}, read_gm_syndromes(syndromes_tsv)))
    if not labels.images:
        raise ImportFormatError("GM import needs a split CSV or a metadata pickle for the labels")
    return labels


def import_gm_split(
    gallery: Gallery, split_csv: str | Path, images_dir: str | Path, embed: Embedder, *,
    syndromes_tsv: str | Path | None = None, metadata: str | Path | None = None, **kwargs: Any,
) -> ImportReport:
    """Import the images of a GM split CSV found in ``images_dir`` (file stem or
    ``<image_id>_...`` names), labelled by the split (+ syndromes TSV / metadata)."""
    labels = gm_labels(split_csv=split_csv, syndromes_tsv=syndromes_tsv, metadata=metadata)
    split_ids = read_gm_split(split_csv).images
    files = {image_key(p.name): p for p in sorted(Path(images_dir).iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES}
    rows, failed = [], []
    for key in split_ids:
        path = files.get(key)
        if path is None:
            failed.append(ImportFailure(key, "image file not found"))
            continue
        rows.append(labels.row(key, path))
    report = import_rows(gallery, rows, embed, source="gm-split", **kwargs)
    return ImportReport(report.added, report.updated, report.unchanged, tuple(failed) + report.failed)


def import_gm_encodings(
    gallery: Gallery, encodings: str | Path, *, split_csv: str | Path | None = None,
    syndromes_tsv: str | Path | None = None, metadata: str | Path | None = None,
    update: bool = False, batch_size: int = 1000, progress: bool | None = None,
) -> ImportReport:
    """Import precomputed GM encodings (no model needed), labelled from GM metadata.
    Images without labels are reported and skipped."""
    table = read_gm_encodings(encodings)
    labels = gm_labels(split_csv=split_csv, syndromes_tsv=syndromes_tsv, metadata=metadata)
    entries, failed = [], []
    keys = sorted(table.views, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    for key in _progress(keys, "gm-encodings", progress):
        row = labels.row(key, Path(key))
        if row is None:
            failed.append(ImportFailure(key, "no labels for this image"))
            continue
        entries.append(Entry(
            image_id=row.image_id, subject_id=row.subject_id, syndrome_id=row.syndrome_id,
            syndrome_name=row.syndrome_name, omim_id=row.omim_id, genes=row.genes,
            views=table.views[key], source="gm-encodings", encoder_id=table.encoder_id,
            view_scheme=table.view_scheme,
        ))
    report = gallery.add_many(entries, update=update, batch_size=batch_size)
    return ImportReport(len(report.added), len(report.updated), len(report.unchanged), tuple(failed))
