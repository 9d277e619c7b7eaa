"""Export a gallery to one portable file and import it back.

The file is a tar archive (readable anywhere, no pickles):
``manifest.json`` (format, encoder id, view scheme, view sizes, count),
``records.jsonl`` (one JSON object of labels and provenance per record, in
gallery-id order), ``embeddings.npy`` ((N, ΣD) float32 raw per-view vectors,
concatenated) and ``crops/<n>.png`` (the aligned crops that exist).
Gallery ids are not exported: they belong to one gallery; image ids carry identity.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np

from gallery.errors import ImportFormatError
from gallery.records import AddReport, Entry
from gallery.store import Gallery
from gallery.vectors import unpack

FORMAT = "phenolens-gallery-export"
FORMAT_VERSION = 1


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def export_gallery(gallery: Gallery, out: str | Path) -> int:
    """Write every record to ``out`` (atomically); returns the record count."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    dims = gallery.view_dims
    count = len(gallery)
    embeddings = np.zeros((count, sum(dims)), dtype=np.float32)
    lines = []
    with tarfile.open(tmp, "w") as tar:
        n = 0
        for n, record in enumerate(gallery.iter_records()):
            if n >= count:
                raise RuntimeError("gallery grew during export; retry")
            info = record.info
            embeddings[n] = np.concatenate(record.views)
            crop = None
            if record.crop_png:
                crop = f"crops/{n}.png"
                _add_bytes(tar, crop, record.crop_png)
            lines.append(json.dumps({
                "image_id": info.image_id, "subject_id": info.subject_id,
                "syndrome_id": info.syndrome_id, "syndrome_name": info.syndrome_name,
                "omim_id": info.omim_id, "genes": list(info.genes), "source": info.source,
                "provenance": json.loads(info.provenance), "crop": crop,
            }, ensure_ascii=False))
        written = len(lines)
        buf = io.BytesIO()
        np.save(buf, embeddings[:written], allow_pickle=False)
        _add_bytes(tar, "embeddings.npy", buf.getvalue())
        _add_bytes(tar, "records.jsonl", ("\n".join(lines) + "\n").encode() if lines else b"")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "encoder_id": gallery.encoder_id,
            "view_scheme": gallery.view_scheme, "view_dims": list(dims), "count": written,
            "exported_at": time.time(),
        }
        _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return written


def is_export(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file() or not tarfile.is_tarfile(path):
        return False
    with tarfile.open(path) as tar:
        return "manifest.json" in tar.getnames()


def import_export(
    gallery: Gallery, path: str | Path, *, update: bool = False, batch_size: int = 1000
) -> AddReport:
    """Add the records of an export file (idempotent; DuplicateId on conflicts unless ``update``)."""
    with tarfile.open(path) as tar:
        def read(name: str) -> bytes:
            try:
                member = tar.extractfile(name)
            except KeyError as exc:
                raise ImportFormatError(f"export file lacks {name}") from exc
            if member is None:
                raise ImportFormatError(f"export member {name} is not a file")
            return member.read()

        manifest = json.loads(read("manifest.json"))
        if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ImportFormatError("not a PhenoLens gallery export this version can read")
        dims = manifest["view_dims"]
        embeddings = np.load(io.BytesIO(read("embeddings.npy")), allow_pickle=False)
        records = [json.loads(line) for line in read("records.jsonl").decode().splitlines() if line]
        if len(records) != embeddings.shape[0] or (records and embeddings.shape[1] != sum(dims)):
            raise ImportFormatError("export file records and embeddings disagree")
        entries = []
        for rec, flat in zip(records, embeddings, strict=True):
            entries.append(Entry(
                image_id=rec["image_id"], subject_id=rec["subject_id"], syndrome_id=rec["syndrome_id"],
                syndrome_name=rec["syndrome_name"], omim_id=rec["omim_id"], genes=tuple(rec["genes"]),
                views=unpack(flat.astype("<f4").tobytes(), dims), source=rec["source"],
                crop_png=read(rec["crop"]) if rec.get("crop") else None,
                encoder_id=manifest["encoder_id"], view_scheme=manifest["view_scheme"],
                provenance=rec.get("provenance") or {},
            ))
    return gallery.add_many(entries, update=update, batch_size=batch_size)
