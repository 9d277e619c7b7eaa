#!/usr/bin/env python3
"""Publish and restore read-only gallery snapshots for PhenoLens read replicas.

The gallery's SQLite file is the only durable truth and one process (the
writer) owns it. Read replicas serve a snapshot instead:

``publish GALLERY SNAPSHOTS [--keep N]``
    Copies the live gallery with SQLite's online backup (consistent while the
    writer keeps writing) into ``SNAPSHOTS/<UTC time>-v<version>/`` together
    with its FAISS sidecar files, then repoints ``SNAPSHOTS/current`` atomically and
    keeps the newest N snapshots. The older ones it keeps are scrubbed: every record
    the new snapshot no longer holds as it was (deleted, or replaced by an import) is
    deleted from them with SQLite's secure_delete, and their FAISS sidecars are
    removed (a replica rebuilds the index from SQLite). So after the next publication
    no snapshot holds a deleted face (see deploy/README.md, "Erasure").
``restore SNAPSHOTS TARGET``
    Copies ``SNAPSHOTS/current`` to TARGET (the replica's private gallery path)
    and its sidecar beside it. The server rebuilds the FAISS index from SQLite
    when the sidecar is missing or older than the snapshot.

Standard library only, so it runs in the image (``phenolens-snapshot``) and on
any host with Python 3.11.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

CURRENT = "current"
SIDE_CAR = ".faiss"  # gallery.sqlite -> gallery.sqlite.faiss, .faiss.json (gallery.index)
DB_NAME = "gallery.sqlite"


class SnapshotError(RuntimeError):
    """A snapshot cannot be published or restored (says what is missing)."""


def _sidecars(db: Path) -> list[Path]:
    """The derived FAISS index files beside ``db`` (gallery.sqlite.faiss, .faiss.json, ...)."""
    return sorted(p for p in db.parent.glob(db.name + SIDE_CAR + "*") if p.is_file())


def _version(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'gallery_version'").fetchone()
    except sqlite3.Error:
        row = None
    finally:
        conn.close()
    return str(row[0]) if row else "0"


def publish(gallery: Path, snapshots: Path, keep: int = 3) -> Path:
    """Snapshot ``gallery`` into a new folder under ``snapshots``; returns that folder."""
    if not gallery.is_file():
        raise SnapshotError(f"no gallery at {gallery}")
    snapshots.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    staging = snapshots / f".staging-{stamp}-{os.getpid()}"
    staging.mkdir()
    try:
        src = sqlite3.connect(f"file:{gallery}?mode=ro", uri=True)
        dst = sqlite3.connect(staging / DB_NAME)
        try:
            src.backup(dst)
            # a snapshot is one self-contained file: no -wal/-shm beside it
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
            src.close()
        for sidecar in _sidecars(gallery):
            shutil.copy2(sidecar, staging / (DB_NAME + sidecar.name[len(gallery.name):]))
        final = snapshots / f"{stamp}-v{_version(staging / DB_NAME)}"
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    link = snapshots / f".{CURRENT}.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    link.replace(snapshots / CURRENT)
    published = sorted(p for p in snapshots.iterdir()
                       if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    for old in published[: max(len(published) - keep, 0)]:
        if old != final:
            _remove(old)
    for old in published[max(len(published) - keep, 0):]:
        if old != final:
            scrub(old / DB_NAME, final / DB_NAME)
    return final


def _remove(folder: Path) -> None:
    """Delete an old snapshot, its files overwritten with zeros first."""
    for item in folder.iterdir():
        if item.is_file() and not item.is_symlink():
            _zero(item)
    shutil.rmtree(folder, ignore_errors=True)


def _zero(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        for at in range(0, size, 1 << 20):
            fh.write(bytes(min(1 << 20, size - at)))
        fh.flush()
        os.fsync(fh.fileno())


def scrub(old: Path, newest: Path) -> int:
    """Delete from the snapshot ``old`` every record that ``newest`` does not hold with
    the same content (secure_delete: the freed bytes are zeroed) and drop its FAISS
    sidecars when any was deleted; returns how many records were deleted."""
    if not old.is_file():
        return 0
    conn = sqlite3.connect(f"file:{old}", uri=True)
    try:
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("ATTACH DATABASE ? AS newest", (f"file:{newest}?mode=ro",))
        with conn:
            gone = conn.execute(
                "DELETE FROM main.records WHERE NOT EXISTS (SELECT 1 FROM newest.records n"
                " WHERE n.gallery_id = main.records.gallery_id"
                " AND n.content_hash IS main.records.content_hash)").rowcount
        conn.execute("DETACH DATABASE newest")
        if gone:
            conn.execute("VACUUM")
    finally:
        conn.close()
    if gone:
        for sidecar in _sidecars(old):
            _zero(sidecar)
            sidecar.unlink()
    return gone


def restore(snapshots: Path, target: Path) -> Path:
    """Copy the current snapshot to ``target`` (and its sidecar); returns the snapshot folder."""
    current = snapshots / CURRENT
    db = current / DB_NAME
    if not db.is_file():
        raise SnapshotError(
            f"no published gallery snapshot at {db}: run `phenolens-snapshot publish` on the writer"
        )
    source = current.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".restoring")
    shutil.copyfile(source / DB_NAME, tmp)
    tmp.replace(target)
    for stale in (target.with_name(target.name + "-wal"), target.with_name(target.name + "-shm")):
        stale.unlink(missing_ok=True)
    for stale in _sidecars(target):
        stale.unlink()
    for sidecar in _sidecars(source / DB_NAME):
        shutil.copyfile(sidecar, target.with_name(target.name + sidecar.name[len(DB_NAME):]))
    return source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="phenolens-snapshot", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="snapshot the live gallery for the read replicas")
    pub.add_argument("gallery", type=Path)
    pub.add_argument("snapshots", type=Path)
    pub.add_argument("--keep", type=int, default=3, help="snapshots to keep (default 3)")
    res = sub.add_parser("restore", help="copy the current snapshot to a replica's gallery path")
    res.add_argument("snapshots", type=Path)
    res.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "publish":
            print(f"published {publish(args.gallery, args.snapshots, max(args.keep, 1))}")
        else:
            print(f"restored {restore(args.snapshots, args.target)} to {args.target}")
    except (SnapshotError, sqlite3.Error, OSError) as exc:
        print(f"phenolens-snapshot: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
