"""The FAISS index derived from the SQLite records, named by a factory string.

``"Flat"`` is exact inner product; ``"IVF1024,Flat"``, ``"HNSW32"`` or
``"IVF4096,PQ64"`` are approximate indexes for large galleries. The index maps
gallery ids (SQLite primary keys) through ``IndexIDMap2``, so ids survive
rebuilds. It is saved atomically with a sidecar that records the gallery
version it reflects, its record count and a checksum; anything that does not
match on load makes the caller rebuild from SQLite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

# faiss-cpu keeps queries off BLAS below this many (default 20; DESIGN.md §4). At 1M records
# one query through BLAS took half the time of FAISS's own loop (bench_gallery), so always BLAS.
faiss.cvar.distance_compute_blas_threshold = 1

EXACT = "Flat"
# FAISS's own defaults (nprobe 1, efSearch 16) trade too much recall away for a clinical ranking.
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
_IVF = re.compile(r"IVF(\d+)")
_PQ = re.compile(r"PQ(\d+)(?:x(\d+))?")
_HNSW = re.compile(r"HNSW(\d+)")


def min_training_vectors(factory: str) -> int:
    """How many vectors ``factory`` needs before it can be trained well (0: no training).

    FAISS k-means wants about 39 points per centroid; below that we keep the
    exact index rather than train a poor quantizer.
    """
    need = 0
    if m := _IVF.search(factory):
        need = max(need, 39 * int(m.group(1)))
    if m := _PQ.search(factory):
        nbits = int(m.group(2) or 8)
        need = max(need, 39 * (1 << nbits))
    return need


def training_sample_size(factory: str) -> int:
    """Vectors drawn to train ``factory``: 64 per centroid (FAISS wants 39 to 256), which
    keeps k-means on a 1M gallery to seconds rather than minutes."""
    centroids = 256
    if m := _IVF.search(factory):
        centroids = max(centroids, int(m.group(1)))
    return max(min_training_vectors(factory), 64 * centroids)


@dataclass(frozen=True)
class Sidecar:
    """What a saved index file reflects; stored next to it as JSON."""

    factory: str
    effective_factory: str
    dim: int
    gallery_version: int
    count: int
    sha256: str
    faiss_version: str


class VectorIndex:
    """One FAISS index over search vectors (N, dim), keyed by gallery id.

    Not thread-safe on its own: the gallery guards it with a readers-writer lock.
    """

    def __init__(self, factory: str, dim: int, *, nprobe: int | None = None, ef_search: int | None = None):
        self.factory = factory
        self.dim = dim
        self.nprobe = nprobe or DEFAULT_NPROBE
        self.ef_search = ef_search or DEFAULT_EF_SEARCH
        self.effective_factory = factory
        self._index = self._new(factory)

    def _new(self, factory: str) -> faiss.IndexIDMap2:
        base = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIDMap2(base)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def exact(self) -> bool:
        return self.effective_factory == EXACT

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with ``vectors`` (N, dim) under ``ids`` (N,), training if needed."""
        need = min_training_vectors(self.factory)
        if self.factory != EXACT and len(ids) < need:
            log.info(
                "index %s needs %d vectors to train, gallery has %d: using exact Flat until then",
                self.factory, need, len(ids),
            )
            self.effective_factory = EXACT
        else:
            self.effective_factory = self.factory
        index = self._new(self.effective_factory)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            take = min(len(ids), training_sample_size(self.factory))
            sample = vectors if take == len(ids) else vectors[rng.choice(len(ids), take, replace=False)]
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        self._apply_params(index)
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        self._index = index

    def needs_training_rebuild(self, count: int) -> bool:
        """True when running on the exact fallback and ``count`` is now enough to train."""
        return self.effective_factory != self.factory and count >= min_training_vectors(self.factory)

    def _apply_params(self, index: faiss.IndexIDMap2) -> None:
        inner = faiss.downcast_index(index.index)
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None and self.nprobe:
            ivf.nprobe = self.nprobe
        if hasattr(inner, "hnsw") and self.ef_search:
            inner.hnsw.efSearch = self.ef_search

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ``ids``; False when this index type cannot remove (the caller rebuilds)."""
        try:
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))
        except RuntimeError:
            return False
        return True

    def search(
        self, queries: np.ndarray, k: int, selector: faiss.IDSelector | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N, k), gallery ids (N, k)); missing results have id -1."""
        k = max(1, min(k, max(self.ntotal, 1)))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if selector is None:
            return self._index.search(queries, k)
        return self._index.search(queries, k, params=self._params(selector))

    def _params(self, selector: faiss.IDSelector) -> faiss.SearchParameters:
        inner = faiss.downcast_index(self._index.index)
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None:
            return faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nprobe))
        if hasattr(inner, "hnsw"):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=int(inner.hnsw.efSearch))
        return faiss.SearchParameters(sel=selector)

    # -- persistence ---------------------------------------------------------------

    def save(self, path: Path, gallery_version: int) -> Sidecar:
        """Write the index and its sidecar atomically (temp file, fsync, rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self._index, str(tmp))
        digest = _sha256(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        sidecar = Sidecar(
            factory=self.factory,
            effective_factory=self.effective_factory,
            dim=self.dim,
            gallery_version=gallery_version,
            count=self.ntotal,
            sha256=digest,
            faiss_version=faiss.__version__,
        )
        side = sidecar_path(path)
        side_tmp = side.with_name(side.name + ".tmp")
        side_tmp.write_text(json.dumps(asdict(sidecar), indent=1))
        _fsync_file(side_tmp)
        os.replace(side_tmp, side)
        _fsync_dir(path.parent)
        return sidecar

    @classmethod
    def load(
        cls, path: Path, *, factory: str, dim: int, gallery_version: int, count: int,
        nprobe: int | None = None, ef_search: int | None = None,
    ) -> VectorIndex:
        """Load a saved index; raises StaleIndex saying why it cannot be used."""
        path = Path(path)
        side = sidecar_path(path)
        if not path.exists() or not side.exists():
            raise StaleIndex("missing")
        try:
            sidecar = Sidecar(**json.loads(side.read_text()))
        except (ValueError, TypeError) as exc:
            raise StaleIndex("unreadable sidecar") from exc
        if sidecar.factory != factory or sidecar.dim != dim:
            raise StaleIndex("built with another factory or dimension")
        if sidecar.gallery_version != gallery_version or sidecar.count != count:
            raise StaleIndex("stale")
        if _sha256(path) != sidecar.sha256:
            raise StaleIndex("checksum mismatch")
        try:
            raw = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise StaleIndex("unreadable") from exc
        if raw.ntotal != count or raw.d != dim:
            raise StaleIndex("count or dimension differs")
        self = cls(factory, dim, nprobe=nprobe, ef_search=ef_search)
        self._index = _as_idmap2(raw)
        self._owner = raw  # the downcast proxy does not own the C++ index; this one does
        self.effective_factory = sidecar.effective_factory
        self._apply_params(self._index)
        return self


class StaleIndex(Exception):
    """A saved index that cannot be used as is (the gallery rebuilds it)."""


def sidecar_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".json")


def _as_idmap2(raw: faiss.Index) -> faiss.IndexIDMap2:
    idx = faiss.downcast_index(raw)
    if not isinstance(idx, faiss.IndexIDMap2):
        raise StaleIndex("not an id-mapped index")
    return idx


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
