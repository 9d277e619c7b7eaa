"""The gallery: SQLite records as the only durable truth, a FAISS index derived from them.

Files: ``PATH`` is the SQLite database (WAL journal), ``PATH.faiss`` the saved
index (a FAISS file, or for the exact index its ids and matrix as ``.npy``) and
``PATH.faiss.json`` its sidecar; ``PATH.features*`` the feature-map store
(``gallery.features``). Search and ranking live in ``gallery.search``.

Durability: WAL with ``synchronous=FULL`` fsyncs the WAL on every commit, so a
committed write survives a power cut, not only a killed process (NORMAL would
keep the database consistent but may lose the last commits on power loss). Imports
commit in batches, so the fsync costs little per record.

Erasure: deleting a record (``delete``, ``delete_images``) or replacing it (``add_many``
with ``update``) erases every copy this gallery keeps of its face data before the call
returns: SQLite runs with ``secure_delete`` on (freed cells and pages are overwritten
with zeros) and the WAL is checkpointed and truncated, the FAISS index drops the vector
in memory and is saved again, and the feature store zeroes the record's maps
(``gallery.features.erase_deleted``). Published snapshots are scrubbed by the next
publication (deploy/gallery_snapshot.py); exports and an operator's backups are not
(deploy/README.md, "Erasure").

Concurrency: searches share a readers-writer lock; a writer holds it exclusively
only while it mutates the in-memory index (after its SQLite commit). Writers are
serialised by one mutex. Every thread gets its own SQLite connection. Index
rebuilds are built beside the live index and swapped in, so searches continue.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from gallery import schema
from gallery._rwlock import ReadWriteLock
from gallery.errors import DuplicateId, SchemeMismatch, UnknownId
from gallery.features import erase_deleted
from gallery.index import AUTO, StaleIndex, VectorIndex
from gallery.records import (
    AddReport,
    Entry,
    GalleryStats,
    Record,
    RecordInfo,
    class_balance,
)
from gallery.search import Ranking
from gallery.vectors import check_dims, pack, search_matrix, unpack

log = logging.getLogger(__name__)

_INFO_COLUMNS = (
    "gallery_id, image_id, subject_id, syndrome_id, syndrome_name, omim_id, genes, source,"
    " encoder_id, view_scheme, created_at, updated_at, provenance"
)


def _info(row: Sequence) -> RecordInfo:
    return RecordInfo(
        gallery_id=int(row[0]), image_id=row[1], subject_id=row[2], syndrome_id=row[3],
        syndrome_name=row[4], omim_id=row[5], genes=tuple(json.loads(row[6])), source=row[7],
        encoder_id=row[8], view_scheme=row[9], created_at=row[10], updated_at=row[11],
        provenance=row[12],
    )


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class Gallery(Ranking):
    """A syndrome-labelled face gallery. Open with ``Gallery.open(path)``; thread-safe.

    Records and the index lifecycle live here; search and ranking in ``gallery.search``.
    """

    def __init__(
        self, path: Path, *, index: str = AUTO, nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.index_path = self.path.with_name(self.path.name + ".faiss")
        self.factory = index
        self._nprobe = nprobe
        self._ef_search = ef_search
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        self._writer = threading.RLock()
        self._rw = ReadWriteLock()
        self._index: VectorIndex | None = None
        self._index_version = -1
        self._saved_version = -1
        self._closed = False
        self._scheme_dims: tuple[str | None, tuple[int, ...]] | None = None
        self._forget_labels()

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        index: str = AUTO,
        encoder_id: str | None = None,
        view_scheme: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        create: bool = True,
    ) -> Gallery:
        """Open (or create) the gallery at ``path`` with FAISS index ``index`` (factory string).

        ``encoder_id``/``view_scheme``: the caller's encoder; a gallery built with
        another raises SchemeMismatch, a new gallery adopts them.
        """
        path = Path(path)
        if not create and not path.exists():
            raise FileNotFoundError(f"no gallery at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self = cls(path, index=index, nprobe=nprobe, ef_search=ef_search)
        schema.migrate(self._conn())
        self._adopt_scheme(encoder_id, view_scheme)
        self._load_or_rebuild_index()
        return self

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError("gallery is closed")
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=60, check_same_thread=False)
            # 16 KiB pages hold ~7 records of a 512-d embedding (4 KiB pages hold one, half
            # empty); only takes effect when the file is created.
            conn.execute("PRAGMA page_size=16384")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # a deleted or replaced record's bytes are overwritten, not only unlinked
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn = conn
            with self._conn_lock:
                self._connections.append(conn)
        return conn

    def _meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _adopt_scheme(self, encoder_id: str | None, view_scheme: str | None) -> None:
        with self._writer:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for key, wanted in (("encoder_id", encoder_id), ("view_scheme", view_scheme)):
                    have = self._meta(key)
                    if wanted is None:
                        continue
                    if have is None:
                        conn.execute("INSERT INTO meta VALUES (?, ?)", (key, wanted))
                    elif have != wanted:
                        raise SchemeMismatch(
                            f"gallery was built with {key.replace('_', ' ')} {have!r}, not {wanted!r}"
                        )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # -- properties ---------------------------------------------------------------

    @property
    def encoder_id(self) -> str | None:
        return self._meta("encoder_id")

    @property
    def view_scheme(self) -> str | None:
        return self._meta("view_scheme")

    @property
    def view_dims(self) -> tuple[int, ...]:
        raw = self._meta("view_dims")
        return tuple(json.loads(raw)) if raw else ()

    @property
    def version(self) -> int:
        """Monotonic gallery version, bumped by every write transaction."""
        return int(self._meta("gallery_version") or 0)

    @property
    def index_effective_factory(self) -> str:
        return self._index.effective_factory if self._index else self.factory

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM records").fetchone()[0])

    # -- index lifecycle ----------------------------------------------------------

    def _load_or_rebuild_index(self) -> None:
        dims = self.view_dims
        if not dims:
            self._index, self._index_version = None, self.version
            return
        try:
            index = VectorIndex.load(
                self.index_path, factory=self.factory, dim=sum(dims), gallery_version=self.version,
                count=len(self), nprobe=self._nprobe, ef_search=self._ef_search,
            )
        except StaleIndex as why:
            log.info("rebuilding the gallery index from SQLite (saved index %s)", why)
            self.rebuild_index()
            return
        with self._rw.write():
            self._index, self._index_version = index, self.version
        self._saved_version = self._index_version

    def rebuild_index(self, *, save: bool = True) -> None:
        """Rebuild the FAISS index from SQLite (beside the live one, then swapped in)."""
        with self._writer:
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                version = self.version
                index = self._build_index()
            finally:
                conn.execute("COMMIT")
            self._swap_in(index, version)
            if save:
                self.flush()

    def _build_index(self) -> VectorIndex:
        """A new index from the records this thread's connection sees (its own open
        transaction included)."""
        dims = self.view_dims
        count = len(self)
        ids = np.empty(count, dtype=np.int64)
        vectors = np.empty((count, sum(dims)), dtype=np.float32)
        cursor = self._conn().execute("SELECT gallery_id, embedding FROM records ORDER BY gallery_id")
        at = 0
        while rows := cursor.fetchmany(65_536):
            n = len(rows)
            ids[at : at + n] = [r[0] for r in rows]
            flat = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(n, -1)
            vectors[at : at + n] = search_matrix(flat, dims)
            at += n
        index = VectorIndex(self.factory, sum(dims), nprobe=self._nprobe, ef_search=self._ef_search)
        index.build(ids, vectors)
        return index

    def _swap_in(self, index: VectorIndex, version: int) -> None:
        with self._rw.write():
            self._index, self._index_version = index, version

    def refresh(self) -> None:
        """Catch up with writes made by another process (rebuilds when the version moved)."""
        if self.version != self._index_version:
            self._forget_labels()
            self._load_or_rebuild_index()

    def flush(self) -> None:
        """Save the index if it changed since the last save (atomic; see gallery.index)."""
        with self._writer:
            if self._index is None or self._saved_version == self._index_version:
                return
            with self._rw.read():
                self._index.save(self.index_path, self._index_version)
            self._saved_version = self._index_version

    def close(self, *, save_index: bool = True) -> None:
        """Save the index (unless ``save_index=False``: the next open rebuilds) and close."""
        if self._closed:
            return
        if save_index:
            self.flush()
        self._closed = True
        with self._conn_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # -- writes -------------------------------------------------------------------

    def add(self, entry: Entry, *, update: bool = False) -> int:
        """Add one image; returns its gallery id. Same image id with identical content is
        a no-op; with other content it raises DuplicateId unless ``update``."""
        report = self.add_many([entry], update=update)
        return (report.added + report.updated + report.unchanged)[0]

    def update(self, entry: Entry) -> int:
        """Replace the record with ``entry.image_id`` in place (same gallery id)."""
        report = self.update_many([entry])
        return (report.updated + report.unchanged)[0]

    def update_many(self, entries: Iterable[Entry]) -> AddReport:
        entries = list(entries)
        missing = [e.image_id for e in entries if not self._exists(e.image_id)]
        if missing:
            raise UnknownId(f"{len(missing)} image id(s) are not in the gallery")
        return self.add_many(entries, update=True)

    def _exists(self, image_id: str) -> bool:
        return self._conn().execute(
            "SELECT 1 FROM records WHERE image_id = ?", (str(image_id),)
        ).fetchone() is not None

    def add_many(
        self, entries: Iterable[Entry], *, update: bool = False, batch_size: int = 1000,
    ) -> AddReport:
        """Add entries, committing every ``batch_size`` (each batch is atomic)."""
        report = AddReport()
        for batch in _chunks(entries, batch_size):
            report = report + self._write_batch(batch, update)
        return report

    def _check_entry(self, entry: Entry, encoder_id: str | None, scheme: str | None, dims: tuple[int, ...]) -> None:
        if entry.encoder_id is not None and encoder_id is not None and entry.encoder_id != encoder_id:
            raise SchemeMismatch(f"entry encoder {entry.encoder_id!r} differs from the gallery's {encoder_id!r}")
        if entry.view_scheme is not None and scheme is not None and entry.view_scheme != scheme:
            raise SchemeMismatch(f"entry view scheme {entry.view_scheme!r} differs from the gallery's {scheme!r}")
        if dims:
            check_dims(entry.views, dims)

    def _write_batch(self, batch: list[Entry], update: bool) -> AddReport:
        with self._writer:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                encoder_id = self.encoder_id or next((e.encoder_id for e in batch if e.encoder_id), None)
                scheme = self.view_scheme or next((e.view_scheme for e in batch if e.view_scheme), None)
                dims = self.view_dims or tuple(int(v.shape[0]) for v in batch[0].views)
                encoder_id = encoder_id or "unknown"
                scheme = scheme or "unknown"
                for entry in batch:
                    self._check_entry(entry, encoder_id, scheme, dims)
                rows = {}
                for entry in batch:
                    blob = pack(entry.views)
                    digest = schema.content_hash(
                        entry.image_id, entry.subject_id, entry.syndrome_id, entry.syndrome_name,
                        entry.omim_id, entry.genes, encoder_id, scheme, blob,
                    )
                    if entry.image_id in rows and rows[entry.image_id][1] != digest:
                        raise DuplicateId("the same image id appears twice with different content")
                    rows[entry.image_id] = (entry, digest, blob)
                existing = {
                    image_id: (gid, digest)
                    for gid, image_id, digest in conn.execute(
                        "SELECT gallery_id, image_id, content_hash FROM records"
                        " WHERE image_id IN (SELECT value FROM json_each(?))",
                        (json.dumps(list(rows)),),
                    )
                }
                added, updated, unchanged = [], [], []
                conflicts = [i for i, (_, d, _) in rows.items() if i in existing and existing[i][1] != d]
                if conflicts and not update:
                    raise DuplicateId(
                        f"{len(conflicts)} image id(s) already in the gallery with different content"
                        " (use update to replace them)"
                    )
                now = time.time()
                dims_json = json.dumps(list(dims))
                inserts, updates, blobs = [], [], {}
                for image_id, (entry, digest, blob) in rows.items():
                    if image_id in existing and existing[image_id][1] == digest:
                        unchanged.append(existing[image_id][0])
                        continue
                    values = (
                        entry.subject_id, entry.syndrome_id, entry.syndrome_name, entry.omim_id,
                        json.dumps(list(entry.genes)) if entry.genes else "[]", entry.source,
                        encoder_id, scheme, dims_json, blob, entry.crop_png, now, digest,
                        json.dumps(entry.provenance, sort_keys=True, default=str) if entry.provenance else "{}",
                    )
                    if image_id in existing:
                        gid = existing[image_id][0]
                        updates.append((*values, gid))
                        updated.append(gid)
                        blobs[gid] = blob
                    else:
                        inserts.append((*values, image_id, now))
                conn.executemany(
                    "UPDATE records SET subject_id=?, syndrome_id=?, syndrome_name=?, omim_id=?,"
                    " genes=?, source=?, encoder_id=?, view_scheme=?, view_dims=?, embedding=?,"
                    " crop_png=?, updated_at=?, content_hash=?, provenance=? WHERE gallery_id=?",
                    updates,
                )
                conn.executemany(
                    "INSERT INTO records (subject_id, syndrome_id, syndrome_name, omim_id, genes,"
                    " source, encoder_id, view_scheme, view_dims, embedding, crop_png, updated_at,"
                    " content_hash, provenance, image_id, created_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    inserts,
                )
                if inserts:
                    new_ids = dict(conn.execute(
                        "SELECT image_id, gallery_id FROM records"
                        " WHERE image_id IN (SELECT value FROM json_each(?))",
                        (json.dumps([row[-2] for row in inserts]),),
                    ).fetchall())
                    for row in inserts:
                        gid = new_ids[row[-2]]
                        added.append(gid)
                        blobs[gid] = row[9]
                touched_vectors = [(gid, blobs[gid]) for gid in updated + added]
                if touched_vectors:
                    for key, value in (
                        ("encoder_id", encoder_id), ("view_scheme", scheme), ("view_dims", dims_json),
                    ):
                        conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
                    self._bump_version(conn)
                version = self.version
                replaced = set(updated)
                fresh = [t for t in touched_vectors if t[0] not in replaced]
                if replaced:
                    changed = [t for t in touched_vectors if t[0] in replaced]
                    if not self._replace_in_index(changed, dims, version, complete=not fresh):
                        self._swap_in(self._build_index(), version)
                        fresh = []
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                self._index_version = -1
                raise
            if updated:
                self._forget_labels()
            if fresh:
                self._add_to_index(fresh, dims, version)
            if self._index is not None and self._index.needs_training_rebuild(self._index.ntotal):
                self.rebuild_index(save=False)
            if updated:
                self._erase_copies()
            return AddReport(tuple(added), tuple(updated), tuple(unchanged))

    @staticmethod
    def _bump_version(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'gallery_version'"
        )

    def _add_to_index(self, touched: list[tuple[int, bytes]], dims: tuple[int, ...], version: int) -> None:
        """After the commit: new rows become searchable (never an index id without a row)."""
        if self._index is None or self._index_version != version - 1:
            self.rebuild_index(save=False)
            return
        ids = np.array([gid for gid, _ in touched], dtype=np.int64)
        flat = np.frombuffer(b"".join(blob for _, blob in touched), dtype="<f4").reshape(len(touched), -1)
        vectors = search_matrix(flat, dims)
        with self._rw.write():
            self._index.add(ids, vectors)
            self._index_version = version

    def _replace_in_index(
        self, changed: list[tuple[int, bytes]], dims: tuple[int, ...], version: int, *, complete: bool
    ) -> bool:
        """Before the commit of in-place updates: swap their vectors (their rows exist
        throughout). ``complete``: the batch has no new rows, so the index then reflects
        ``version``. False when the index cannot remove ids or is behind (the caller rebuilds)."""
        if self._index is None or self._index_version != version - 1:
            return False
        ids = np.array([gid for gid, _ in changed], dtype=np.int64)
        flat = np.frombuffer(b"".join(blob for _, blob in changed), dtype="<f4").reshape(len(changed), -1)
        vectors = search_matrix(flat, dims)
        with self._rw.write():
            if not self._index.remove(ids):
                return False
            self._index.add(ids, vectors)
            if complete:
                self._index_version = version
        return True

    def delete(self, gallery_ids: Iterable[int]) -> int:
        """Delete records by gallery id (all or none: an unknown id raises UnknownId)."""
        ids = sorted({int(g) for g in gallery_ids})
        return self._delete("gallery_id", ids)

    def delete_images(self, image_ids: Iterable[str]) -> int:
        """Delete records by image id (all or none: an unknown id raises UnknownId)."""
        return self._delete("image_id", sorted({str(i) for i in image_ids}))

    def _delete(self, column: str, keys: list) -> int:
        if not keys:
            return 0
        with self._writer:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = [
                    r[0] for r in conn.execute(
                        f"SELECT gallery_id FROM records WHERE {column} IN (SELECT value FROM json_each(?))",
                        (json.dumps(keys),),
                    )
                ]
                if len(found) != len(keys):
                    raise UnknownId(f"{len(keys) - len(found)} of {len(keys)} id(s) are not in the gallery")
                conn.execute(
                    "DELETE FROM records WHERE gallery_id IN (SELECT value FROM json_each(?))",
                    (json.dumps(found),),
                )
                self._bump_version(conn)
                version = self.version
                # Before the commit, so a search never meets an index id whose row is gone.
                removed = False
                if self._index is not None and self._index_version == version - 1:
                    with self._rw.write():
                        removed = self._index.remove(np.asarray(found, dtype=np.int64))
                        if removed:
                            self._index_version = version
                if not removed:
                    self._swap_in(self._build_index(), version)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                self._index_version = -1
                raise
            self._forget_labels()
            self._erase_copies()
            return len(found)

    def _erase_copies(self) -> None:
        """After records were deleted or replaced: no file beside the gallery keeps their
        old face data. The index file is saved again without their vectors, the feature
        store zeroes their maps, and the WAL (which holds the pages as they were written)
        is checkpointed into the secure-deleted database and truncated."""
        self.flush()
        try:
            erase_deleted(self.path)
        except OSError as exc:
            log.warning("feature store erasure failed (%s): deleted faces' maps may remain "
                        "until the next delete", type(exc).__name__)
        self.checkpoint()

    def checkpoint(self, attempts: int = 50) -> bool:
        """Copy the WAL into the database and truncate it to zero bytes; retried while a
        reader holds an old snapshot (True when the WAL was emptied)."""
        conn = self._conn()
        for _ in range(attempts):
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return True
            time.sleep(0.02)
        log.warning("the gallery's WAL could not be truncated (a reader held it): deleted "
                    "records' pages remain in it until the next checkpoint")
        return False

    # -- reads --------------------------------------------------------------------

    def get(self, gallery_id: int) -> Record:
        return self._get("gallery_id", int(gallery_id))

    def get_image(self, image_id: str) -> Record:
        return self._get("image_id", str(image_id))

    def _get(self, column: str, key: object) -> Record:
        row = self._conn().execute(
            f"SELECT {_INFO_COLUMNS}, view_dims, embedding, crop_png FROM records WHERE {column} = ?",
            (key,),
        ).fetchone()
        if row is None:
            raise UnknownId(f"{column.replace('_', ' ')} is not in the gallery")
        info = _info(row[:13])
        return Record(info=info, views=unpack(row[14], json.loads(row[13])), crop_png=row[15])

    def list(self, *, limit: int = 100, offset: int = 0, syndrome_id: str | None = None) -> list[RecordInfo]:
        """Records in gallery-id order, one page."""
        where, args = ("WHERE syndrome_id = ?", [syndrome_id]) if syndrome_id is not None else ("", [])
        rows = self._conn().execute(
            f"SELECT {_INFO_COLUMNS} FROM records {where} ORDER BY gallery_id LIMIT ? OFFSET ?",
            (*args, int(limit), int(offset)),
        )
        return [_info(r) for r in rows]

    def iter_records(self, *, batch: int = 1000) -> Iterator[Record]:
        """Every full record in gallery-id order (for exports)."""
        last = -1
        while True:
            rows = self._conn().execute(
                f"SELECT {_INFO_COLUMNS}, view_dims, embedding, crop_png FROM records"
                " WHERE gallery_id > ? ORDER BY gallery_id LIMIT ?",
                (last, batch),
            ).fetchall()
            if not rows:
                return
            for row in rows:
                yield Record(info=_info(row[:13]), views=unpack(row[14], json.loads(row[13])), crop_png=row[15])
            last = rows[-1][0]

    def find_images(self, image_ids: Iterable[str]) -> dict[str, RecordInfo]:
        """image id -> RecordInfo for those of ``image_ids`` in the gallery (absent ones left out)."""
        keys = sorted({str(i) for i in image_ids})
        if not keys:
            return {}
        rows = self._conn().execute(
            f"SELECT {_INFO_COLUMNS} FROM records WHERE image_id IN (SELECT value FROM json_each(?))",
            (json.dumps(keys),),
        )
        return {r[1]: _info(r) for r in rows}

    def _infos(self, ids: Iterable[int]) -> dict[int, RecordInfo]:
        """gallery id -> RecordInfo for those of ``ids`` still in the gallery."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        rows = self._conn().execute(
            f"SELECT {_INFO_COLUMNS} FROM records WHERE gallery_id IN (SELECT value FROM json_each(?))",
            (json.dumps(ids),),
        )
        return {int(r[0]): _info(r) for r in rows}

    def _search_dims(self) -> tuple[str | None, tuple[int, ...]]:
        """(view scheme, view dims): fixed once the first record is written, so cached then."""
        known = self._scheme_dims
        if known is not None:
            return known
        now = (self.view_scheme, self.view_dims)
        if now[1]:
            self._scheme_dims = now
        return now

    # -- statistics ---------------------------------------------------------------

    def stats(self) -> GalleryStats:
        conn = self._conn()
        per_syndrome = conn.execute(
            "SELECT syndrome_id, MAX(syndrome_name), COUNT(*), COUNT(DISTINCT subject_id)"
            " FROM records GROUP BY syndrome_id ORDER BY COUNT(*) DESC, syndrome_id"
        ).fetchall()
        per_subject = conn.execute(
            "SELECT subject_id, COUNT(*) FROM records GROUP BY subject_id ORDER BY COUNT(*) DESC, subject_id"
        ).fetchall()
        genes = conn.execute(
            "SELECT COUNT(DISTINCT value) FROM records, json_each(records.genes)"
        ).fetchone()[0]
        return GalleryStats(
            records=len(self),
            subjects=len(per_subject),
            syndromes=len(per_syndrome),
            genes=int(genes),
            encoder_id=self.encoder_id,
            view_scheme=self.view_scheme,
            view_dims=self.view_dims,
            gallery_version=self.version,
            schema_version=schema.schema_version(conn),
            index_factory=self.factory,
            index_effective_factory=self.index_effective_factory,
            images_per_syndrome={r[0]: r[2] for r in per_syndrome},
            subjects_per_syndrome={r[0]: r[3] for r in per_syndrome},
            syndrome_names={r[0]: r[1] for r in per_syndrome},
            images_per_subject={r[0]: r[1] for r in per_subject},
            syndrome_balance=class_balance([r[2] for r in per_syndrome]),
            subject_balance=class_balance([r[1] for r in per_subject]),
            syndromes_with_one_subject=sum(1 for r in per_syndrome if r[3] == 1),
        )

