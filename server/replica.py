"""A read replica that follows published gallery snapshots without restarting.

``deploy/gallery_snapshot.py publish`` writes ``SNAPSHOTS/<stamp>-v<version>/``
(``gallery.sqlite`` and its FAISS sidecar files) and repoints ``SNAPSHOTS/current``
atomically. With ``gallery.follow_snapshots`` set, the server checks ``current``
every ``gallery.follow_interval_s``; when it names a new snapshot, the snapshot is
copied beside the configured gallery path (``<path>.<snapshot name>``), opened, and
swapped into the backend. Calls in flight finish on the gallery they started with,
which is closed a grace period later (``RETIRE_AFTER_S``), and its private copy (the
SQLite file, index and feature store) is overwritten with zeros and deleted. The
feature cache forgets at once the faces the new snapshot no longer holds as they were,
so a record deleted on the writer leaves a replica by the next snapshot it loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

from gallery import Gallery, UnknownId
from server.logs import SERVER_LOGGER, log_event

log = logging.getLogger(SERVER_LOGGER)

CURRENT = "current"  # as deploy/gallery_snapshot.py writes them
DB_NAME = "gallery.sqlite"
RETIRE_AFTER_S = 60.0  # a replaced gallery stays open this long for calls in flight


class SnapshotFollower:
    """Polls ``snapshots/current`` and swaps newer snapshots into ``backend.gallery``."""

    def __init__(self, backend, snapshots: Path, interval_s: float) -> None:
        self.backend = backend
        self.snapshots = Path(snapshots)
        self.interval_s = interval_s
        self.loaded: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshot-follower", daemon=True)

    def start(self) -> SnapshotFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - keep serving the current gallery
                log_event(log, "snapshot not loaded", logging.WARNING,
                          error_type=type(exc).__name__)

    def poll(self) -> bool:
        """Load the current snapshot when it is new; True when the gallery was swapped."""
        current = self.snapshots / CURRENT
        if not (current / DB_NAME).is_file():
            return False
        source = current.resolve()
        if source.name == self.loaded:
            return False
        config = self.backend.config.gallery
        target = config.path.with_name(f"{config.path.name}.{source.name}")
        for item in source.iterdir():
            if item.name.startswith(DB_NAME):
                shutil.copyfile(item, target.with_name(target.name + item.name[len(DB_NAME):]))
        gallery = Gallery.open(target, encoder_id=self.backend.encoder_id,
                               view_scheme=self.backend.view_scheme, create=False,
                               **({"index": config.index} if config.index else {}))
        old, self.backend.gallery = self.backend.gallery, gallery
        self.loaded = source.name
        cache = getattr(self.backend, "feature_cache", None)
        if cache is not None:
            cache.retain(lambda gid, fingerprint: _holds(gallery, gid, fingerprint))
        log_event(log, "gallery snapshot loaded", snapshot=source.name,
                  gallery_version=gallery.version)
        timer = threading.Timer(RETIRE_AFTER_S, _retire, args=(old, old.path != config.path))
        timer.daemon = True
        timer.start()
        return True


def _holds(gallery: Gallery, gallery_id: int, fingerprint) -> bool:
    """True when ``gallery`` holds the record with the crop ``fingerprint`` was taken of."""
    try:
        crop = gallery.get(gallery_id).crop_png
    except UnknownId:
        return False
    return crop is not None and hashlib.sha256(crop).hexdigest() == fingerprint.crop_sha256


def _retire(gallery: Gallery, delete_copy: bool) -> None:
    """Close a replaced gallery; when its files are a follower's copy, overwrite them
    with zeros and delete them."""
    gallery.close(save_index=False)
    if delete_copy:
        for stale in gallery.path.parent.glob(gallery.path.name + "*"):
            _zero(stale)
            stale.unlink(missing_ok=True)


def _zero(path: Path) -> None:
    try:
        with open(path, "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            for at in range(0, size, 1 << 20):
                fh.write(bytes(min(1 << 20, size - at)))
            os.fsync(fh.fileno())
    except OSError:
        pass
