"""The feature-map store beside the gallery: per gallery image, the explainer's CAM-layer
feature maps and embeddings of each view, so Explain reuses them instead of encoding hits.

Files next to the SQLite file ``PATH``:

- ``PATH.features``: the manifest. One JSON line (format, encoder id, view scheme,
  layout, data file, the gallery version it was checked against, a checksum) and then
  the entry table (gallery id, slot, content hash of the record it was computed from).
- ``PATH.features.<generation>.f16``: the data, one fixed-size float16 slot per image
  (per view its map (C, h, w), then its embedding (D,)), memory-mapped for reads.

SQLite stays the truth. An entry is valid only while the record's ``content_hash``
still matches; entries of deleted or changed records are dropped when the gallery
version moves, and a store built for another encoder, view scheme or layout is
reported as all missing and replaced by the next ``put``.

Erasure: a record's features never outlive it. ``discard`` (and ``purge``, which finds the
entries of records deleted or replaced since) takes the entries out of the manifest and
then overwrites their slots with zeros (fsynced), and ``purge`` zeroes every slot the
manifest does not reference (a writer killed between the two steps, entries dropped in
memory by a reader); free slots are reused by later ``put``s and a file that is mostly
free is compacted into a new generation. ``erase_deleted(gallery_path)`` does this for
whatever store lies beside a gallery (``gallery.store.Gallery`` calls it after every
delete and replacing import, whichever process made them).

Crash safety: the manifest is the only thing a reader trusts, and it is replaced
atomically (temp file, fsync, rename) only after the slots it references were written
and fsynced. A writer never overwrites a slot the current manifest references, so a
killed writer leaves the old manifest describing intact data. Writers take a lock per
store, in the process and across processes (``flock`` on ``PATH.features.lock``), so
the server and a CLI deleting records may both write; readers in other processes
reload when the manifest changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from gallery.errors import DimensionMismatch
from gallery.index import fsync_dir

log = logging.getLogger(__name__)

FORMAT = 1
COMPACT_SHARE = 0.5  # a data file with more free slots than this share is rewritten
_ENTRY = np.dtype([("gallery_id", "<i8"), ("slot", "<i8"), ("content", "<u8")])


@dataclass(frozen=True)
class FeatureLayout:
    """Per image: V views, each a feature map ``map_shapes[v]`` (C, h, w) and an
    embedding of ``embedding_dims[v]`` values."""

    map_shapes: tuple[tuple[int, int, int], ...]
    embedding_dims: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "map_shapes", tuple(tuple(int(d) for d in s) for s in self.map_shapes))
        object.__setattr__(self, "embedding_dims", tuple(int(d) for d in self.embedding_dims))
        if len(self.map_shapes) != len(self.embedding_dims) or not self.map_shapes:
            raise DimensionMismatch("a feature layout needs one map shape and one embedding size per view")
        if any(len(s) != 3 for s in self.map_shapes):
            raise DimensionMismatch("feature maps must be (C, h, w) per image")

    @classmethod
    def of(cls, maps: Sequence[np.ndarray], embeddings: Sequence[np.ndarray]) -> FeatureLayout:
        """The layout of a batch: per view maps (N, C, h, w) and embeddings (N, D)."""
        return cls(tuple(m.shape[1:] for m in maps), tuple(e.shape[1] for e in embeddings))

    @property
    def values_per_image(self) -> int:
        return sum(int(np.prod(s)) for s in self.map_shapes) + sum(self.embedding_dims)

    @property
    def bytes_per_image(self) -> int:
        """Stored size of one image (float16), e.g. SFace 1024×7×7 + 128 per view: 100,608 B."""
        return 2 * self.values_per_image


@dataclass(frozen=True, eq=False)
class StoredFeatures:
    """Features of the found images, in the order asked (missing ones left out).

    ``maps[v]``: (N, C, h, w); ``embeddings[v]``: (N, D); float16 as stored unless asked
    otherwise (numpy's float16 → float32 cast costs more than the read; torch's is cheap);
    ``missing``: the asked ids that have no valid features (compute and ``put`` them).
    """

    gallery_ids: tuple[int, ...]
    maps: tuple[np.ndarray, ...]
    embeddings: tuple[np.ndarray, ...]
    missing: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class _Snapshot:
    """What readers see: one manifest and the mapped data it describes."""

    layout: FeatureLayout | None
    data_name: str | None
    slots: dict[int, tuple[int, int]]  # gallery id -> (slot, 64-bit key of the record's content hash)
    gallery_version: int
    data: np.ndarray | None = None  # (capacity, values_per_image) float16, memory-mapped
    manifest_stamp: tuple = field(default=())


class FeatureStore:
    """Feature maps and embeddings per gallery image. Open with ``FeatureStore.open``;
    thread-safe (one writer at a time, readers never wait for it)."""

    def __init__(self, gallery_path: Path, encoder_id: str, view_scheme: str) -> None:
        self.gallery_path = Path(gallery_path)
        self.path = self.gallery_path.with_name(self.gallery_path.name + ".features")
        self.encoder_id = encoder_id
        self.view_scheme = view_scheme
        self.stale_reason: str | None = None
        self._write = _writer_lock(self.path)
        self._swap = threading.Lock()
        self._sql = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._snap = _Snapshot(None, None, {}, -1)

    @classmethod
    def open(cls, gallery_path: str | Path, encoder_id: str, view_scheme: str) -> FeatureStore:
        """The store beside the gallery at ``gallery_path`` for this encoder and view scheme
        (an absent, unreadable or other-encoder store opens empty; see ``stale_reason``)."""
        if not Path(gallery_path).exists():
            raise FileNotFoundError(f"no gallery at {gallery_path}")
        self = cls(Path(gallery_path), encoder_id, view_scheme)
        self._snap = self._load()
        self._sync()
        return self

    def close(self) -> None:
        with self._sql:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads ----------------------------------------------------------------------

    @property
    def layout(self) -> FeatureLayout | None:
        return self._snap.layout

    def __len__(self) -> int:
        return len(self._current().slots)

    def missing(self, gallery_ids: Iterable[int]) -> list[int]:
        """Those of ``gallery_ids`` without valid features (in the order given)."""
        slots = self._current().slots
        return [int(g) for g in gallery_ids if int(g) not in slots]

    def get(self, gallery_ids: Iterable[int], dtype: DTypeLike = np.float16) -> StoredFeatures:
        """Features of ``gallery_ids`` as ``dtype``; the ones without valid features are
        listed in ``missing``."""
        snap = self._current()
        ids = [int(g) for g in gallery_ids]
        found = [g for g in ids if g in snap.slots]
        missing = tuple(g for g in ids if g not in snap.slots)
        layout = snap.layout
        if layout is None or not found:
            return StoredFeatures((), (), (), missing or tuple(ids))
        rows = np.asarray(snap.data[[snap.slots[g][0] for g in found]]).astype(dtype, copy=False)
        maps, embeddings = [], []
        at = 0
        for shape, dim in zip(layout.map_shapes, layout.embedding_dims, strict=True):
            size = int(np.prod(shape))
            maps.append(rows[:, at : at + size].reshape(len(found), *shape))
            embeddings.append(rows[:, at + size : at + size + dim])
            at += size + dim
        return StoredFeatures(tuple(found), tuple(maps), tuple(embeddings), missing)

    # -- writes ---------------------------------------------------------------------

    def put(self, gallery_ids: Sequence[int], maps: Sequence[np.ndarray], embeddings: Sequence[np.ndarray]) -> list[int]:
        """Store features of ``gallery_ids``: per view ``maps[v]`` (N, C, h, w) and
        ``embeddings[v]`` (N, D). Ids no longer in the gallery are skipped; returns the
        ids stored. Durable when it returns."""
        ids = [int(g) for g in gallery_ids]
        layout = FeatureLayout.of(maps, embeddings)
        if any(len(a) != len(ids) for a in (*maps, *embeddings)):
            raise DimensionMismatch("every view needs one map and one embedding per gallery id")
        with self._writing():
            snap = self._current()
            if snap.layout is not None and snap.layout != layout:
                raise DimensionMismatch(f"feature layout {layout} differs from the store's {snap.layout}")
            hashes = self._content_hashes(ids)
            keep = [i for i, g in enumerate(ids) if g in hashes]
            if not keep:
                return []
            rows = np.concatenate(
                [np.concatenate([m.reshape(len(ids), -1), e], axis=1) for m, e in zip(maps, embeddings, strict=True)],
                axis=1,
            )[keep].astype(np.float16)
            stored = [ids[i] for i in keep]
            if snap.layout is None or snap.data_name is None:
                # new or stale store, or its data file is gone: a fresh data file (a new
                # generation: never one the manifest names), old ones dropped on commit
                data_name = self._data_name(self._next_generation())
                snap = _Snapshot(None, None, {}, snap.gallery_version)
            else:
                data_name = snap.data_name
            used = {slot for slot, _ in snap.slots.values()}
            slots = _free_slots(used, len(stored))
            self._write_rows(data_name, slots, rows, layout)
            table = dict(snap.slots)
            for g, slot in zip(stored, slots, strict=True):
                table[g] = (slot, hashes[g])
            self._commit(layout, data_name, table, snap.gallery_version)
            return stored

    def discard(self, gallery_ids: Iterable[int]) -> int:
        """Erase the features of ``gallery_ids`` (deleted or replaced images): out of the
        manifest, then their slots zeroed on disk. Returns how many there were."""
        with self._writing():
            snap = self._current()
            gone = {int(g) for g in gallery_ids} & set(snap.slots)
            if gone:
                table = {g: v for g, v in snap.slots.items() if g not in gone}
                self._commit(snap.layout, snap.data_name, table, snap.gallery_version)
                self._zero_free()
            return len(gone)

    def purge(self) -> int:
        """Erase what the store holds of records deleted or replaced since it was written
        (checked against SQLite), zero every slot the manifest does not reference, and
        compact a mostly free data file. Returns how many entries were erased."""
        with self._writing():
            snap = self._load()
            with self._swap:
                self._snap = snap
            if snap.layout is None or snap.data_name is None:
                self._drop_unreferenced_data(snap.data_name)
                return 0
            now = self._content_hashes(list(snap.slots)) if snap.slots else {}
            table = {g: v for g, v in snap.slots.items() if now.get(g) == v[1]}
            erased = len(snap.slots) - len(table)
            if erased:
                self._commit(snap.layout, snap.data_name, table, self._gallery_version())
            self._zero_free()
            return erased

    def compact(self) -> None:
        """Rewrite the data file without the slots of discarded entries (a new generation)."""
        with self._writing():
            self._compact()

    def _compact(self) -> None:
        snap = self._current()
        if snap.layout is None or snap.data_name is None:
            return
        ids = sorted(snap.slots)
        rows = np.asarray(snap.data[[snap.slots[g][0] for g in ids]]) if ids else None
        name = self._data_name(_generation(snap.data_name) + 1)
        slots = list(range(len(ids)))
        self._write_rows(name, slots, rows, snap.layout)
        table = {g: (s, snap.slots[g][1]) for g, s in zip(ids, slots, strict=True)}
        self._commit(snap.layout, name, table, snap.gallery_version)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """This store's writer lock: the process's, then the file lock other processes take."""
        with self._write, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _zero_free(self) -> None:
        """Overwrite with zeros every slot of the data file the manifest does not reference
        (the features of discarded entries), cut free slots off its end, and compact it
        when most of it is free. Called with the writer lock held, after a commit."""
        snap = self._snap
        if snap.layout is None or snap.data_name is None:
            return
        path = self.path.with_name(snap.data_name)
        size = snap.layout.bytes_per_image
        used = {slot for slot, _ in snap.slots.values()}
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            capacity = os.fstat(fd).st_size // size
            end = max(used, default=-1) + 1
            zeros = bytes(size)
            for slot in range(end):
                if slot not in used:
                    os.pwrite(fd, zeros, slot * size)
            for slot in range(end, capacity):  # zeroed before the cut: freed blocks hold no data
                os.pwrite(fd, zeros, slot * size)
            os.fsync(fd)
            if capacity > end:
                os.ftruncate(fd, end * size)
                os.fsync(fd)
        finally:
            os.close(fd)
        if end and (end - len(used)) > COMPACT_SHARE * end:
            self._compact()

    def _drop_unreferenced_data(self, keep: str | None) -> None:
        """Unlink data files the manifest does not name (an empty, stale or torn store)."""
        for other in self.path.parent.glob(f"{self.path.name}.*.f16"):
            if other.name != keep or not self._snap.slots:
                _zero_file(other)
                other.unlink(missing_ok=True)

    # -- internals ------------------------------------------------------------------

    def _data_name(self, generation: int) -> str:
        return f"{self.path.name}.{generation}.f16"

    def _next_generation(self) -> int:
        """One above every data file beside the manifest (a torn manifest names none)."""
        found = []
        for other in self.path.parent.glob(f"{self.path.name}.*.f16"):
            try:
                found.append(_generation(other.name))
            except ValueError:
                pass
        return max(found, default=0) + 1

    def _write_rows(self, data_name: str, slots: list[int], rows: np.ndarray | None, layout: FeatureLayout) -> None:
        """Write ``rows`` (M, values) float16 into ``slots`` of the data file, then fsync."""
        path = self.path.with_name(data_name)
        size = 2 * layout.values_per_image
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            need = (max(slots) + 1) * size if slots else 0
            if os.fstat(fd).st_size < need:
                os.ftruncate(fd, need)
            if rows is not None:
                for slot, row in zip(slots, rows, strict=True):
                    os.pwrite(fd, row.astype("<f2", copy=False).tobytes(), slot * size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _commit(self, layout: FeatureLayout | None, data_name: str | None,
                table: dict[int, tuple[int, int]], gallery_version: int) -> None:
        """Write the manifest atomically, then let readers see it."""
        entries = np.array([(g, s, h) for g, (s, h) in sorted(table.items())], dtype=_ENTRY)
        body = entries.tobytes()
        header = {
            "format": FORMAT, "encoder_id": self.encoder_id, "view_scheme": self.view_scheme,
            "map_shapes": [list(s) for s in layout.map_shapes] if layout else None,
            "embedding_dims": list(layout.embedding_dims) if layout else None,
            "data": data_name, "gallery_version": gallery_version, "entries": len(entries),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(header).encode() + b"\n" + body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        with self._swap:
            self._snap = self._load()
        for other in self.path.parent.glob(f"{self.path.name}.*.f16"):  # older generations
            if other.name != data_name:
                _zero_file(other)
                other.unlink(missing_ok=True)

    def _load(self) -> _Snapshot:
        """The snapshot the manifest on disk describes (empty when absent, torn or stale)."""
        empty = _Snapshot(None, None, {}, -1)
        try:
            stat = self.path.stat()
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self.stale_reason = "missing"
            return empty
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        try:
            line, _, body = raw.partition(b"\n")
            header = json.loads(line)
            if header.get("format") != FORMAT or hashlib.sha256(body).hexdigest() != header["sha256"]:
                raise ValueError("format or checksum")
            entries = np.frombuffer(body, dtype=_ENTRY)
            if len(entries) != header["entries"]:
                raise ValueError("entry count")
        except (ValueError, KeyError, TypeError):
            self.stale_reason = "unreadable manifest"
            log.warning("feature store %s is unreadable: treating every image as missing", self.path.name)
            return _Snapshot(None, None, {}, -1, None, stamp)
        if header["encoder_id"] != self.encoder_id or header["view_scheme"] != self.view_scheme:
            self.stale_reason = "built for another encoder or view scheme"
            log.info("feature store %s: %s; it will be rebuilt", self.path.name, self.stale_reason)
            return _Snapshot(None, header.get("data"), {}, -1, None, stamp)
        layout = None
        data = None
        if header["map_shapes"] is not None:
            layout = FeatureLayout(tuple(map(tuple, header["map_shapes"])), tuple(header["embedding_dims"]))
        data_path = self.path.with_name(header["data"]) if header["data"] else None
        if layout is not None and data_path is not None and len(entries):
            try:
                rows = data_path.stat().st_size // layout.bytes_per_image
                data = np.memmap(data_path, dtype="<f2", mode="r", shape=(rows, layout.values_per_image))
            except (FileNotFoundError, ValueError):
                self.stale_reason = "data file missing"
                return _Snapshot(layout, None, {}, -1, None, stamp)
            if len(entries) and int(entries["slot"].max()) >= rows:
                self.stale_reason = "data file shorter than its manifest"
                return _Snapshot(layout, None, {}, -1, None, stamp)
        self.stale_reason = None
        slots = {int(g): (int(s), int(h)) for g, s, h in entries}
        return _Snapshot(layout, header["data"], slots, int(header["gallery_version"]), data, stamp)

    def _current(self) -> _Snapshot:
        """The snapshot, reloaded when another process rewrote the manifest and
        re-checked against SQLite when the gallery version moved."""
        snap = self._snap
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            stamp = ()
        if stamp != snap.manifest_stamp:
            snap = self._replace(snap, self._load())
        if self._gallery_version() != snap.gallery_version:
            snap = self._sync()
        return snap

    def _replace(self, old: _Snapshot, new: _Snapshot) -> _Snapshot:
        """Install ``new`` unless a writer installed another snapshot since ``old`` was read."""
        with self._swap:
            if self._snap is old:
                self._snap = new
            return self._snap

    def _sync(self) -> _Snapshot:
        """Drop entries whose record is gone or changed (in memory; the next write persists it)."""
        snap = self._snap
        version = self._gallery_version()
        now = self._content_hashes(list(snap.slots)) if snap.slots else {}
        slots = {g: v for g, v in snap.slots.items() if now.get(g) == v[1]}
        return self._replace(snap, _Snapshot(snap.layout, snap.data_name, slots, version, snap.data,
                                             snap.manifest_stamp))

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.gallery_path, isolation_level=None, timeout=60, check_same_thread=False)
        return self._db

    def _gallery_version(self) -> int:
        with self._sql:
            row = self._conn().execute("SELECT value FROM meta WHERE key = 'gallery_version'").fetchone()
        return int(row[0]) if row else 0

    def _content_hashes(self, ids: list[int]) -> dict[int, int]:
        """gallery id -> a 64-bit key of its record's content hash (present ids only)."""
        with self._sql:
            rows = self._conn().execute(
                "SELECT gallery_id, content_hash FROM records WHERE gallery_id IN (SELECT value FROM json_each(?))",
                (json.dumps(ids),),
            ).fetchall()
        return {int(g): _hash_key(h) for g, h in rows}


_WRITERS: dict[str, threading.Lock] = {}
_WRITERS_LOCK = threading.Lock()


def _writer_lock(manifest: Path) -> threading.Lock:
    """One lock per store in this process, shared by every FeatureStore opened on it."""
    key = str(manifest.resolve())
    with _WRITERS_LOCK:
        return _WRITERS.setdefault(key, threading.Lock())


def _zero_file(path: Path) -> None:
    """Overwrite a data file with zeros (fsynced) before it is unlinked, so the blocks the
    filesystem frees hold no features (on filesystems that write in place)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        length = os.fstat(fd).st_size
        chunk = bytes(min(length, 1 << 20))
        for at in range(0, length, len(chunk) or 1):
            os.pwrite(fd, chunk[: length - at], at)
        os.fsync(fd)
    finally:
        os.close(fd)


def erase_deleted(gallery_path: str | Path) -> int:
    """Erase from the feature store beside ``gallery_path`` (whatever encoder built it)
    the features of records deleted or replaced since; returns how many were erased
    (0 when there is no store)."""
    gallery_path = Path(gallery_path)
    manifest = gallery_path.with_name(gallery_path.name + ".features")
    if not manifest.exists() and not any(manifest.parent.glob(f"{manifest.name}.*.f16")):
        return 0
    try:
        header = json.loads(manifest.read_bytes().partition(b"\n")[0])
        encoder_id, view_scheme = str(header["encoder_id"]), str(header["view_scheme"])
    except (OSError, ValueError, KeyError, TypeError):
        encoder_id = view_scheme = ""  # absent or torn: nothing in it is trusted, all erased
    with FeatureStore(gallery_path, encoder_id, view_scheme) as store:
        return store.purge()


def _hash_key(content_hash: str) -> int:
    return int.from_bytes(hashlib.sha256(content_hash.encode()).digest()[:8], "little")


def _free_slots(used: set[int], count: int) -> list[int]:
    """``count`` slots that the current manifest does not reference, lowest first."""
    out = []
    slot = 0
    while len(out) < count:
        if slot not in used:
            out.append(slot)
        slot += 1
    return out


def _generation(data_name: str) -> int:
    return int(data_name.rsplit(".", 2)[-2])

