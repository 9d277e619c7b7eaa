"""The search index derived from the SQLite records, named by a factory string.

``"auto"`` (the default) picks by gallery size: the exact index below
``AUTO_EXACT_LIMIT`` records, ``PQ64x4fs,RFlat`` above (a flat scan of 4-bit
product-quantised codes in SIMD registers, then the best ``k_factor · k`` re-ranked
exactly on the stored float32 vectors; bench/bench_gallery.py measures it beside
HNSW and IVF). ``"Flat"`` is exact inner product, kept as one contiguous float32
matrix and searched with a numpy matrix product without a lock, so it is as fast
as brute force and returns numpy's top-k exactly (one query over 8k to 262k records
first scans a bfloat16 copy, half the bytes, and rescores its best 64 exactly; it
falls back to the full scan when they cannot prove the top k). Other factory strings
(``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF4096,PQ64"``) are FAISS approximate
indexes mapped to gallery ids through ``IndexIDMap2``, so ids survive rebuilds.
An index is saved atomically with a sidecar that records the gallery version it
reflects, its record count and a checksum; anything that does not match on load
makes the caller rebuild from SQLite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
AUTO = "auto"
# "auto": exact below this many records (the numpy scan of 128-d float32 stays a few ms per
# query up to here), AUTO_APPROXIMATE above; both measured in bench/bench_gallery.py.
AUTO_EXACT_LIMIT = 200_000
# FAISS's own defaults (nprobe 1, efSearch 16) trade too much recall away for a clinical ranking.
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
# The approximate index "auto" builds past AUTO_EXACT_LIMIT, chosen on face-like synthetic data
# at 1M records (bench/bench_gallery.py --ann 1000000: one thread, one query, CPU time per
# query; the wall time on the shared 2-core machine is higher and moves with its load):
# - PQ64x4fs,RFlat (this): recall@10 0.945 at k_factor 8, 0.986 at 16, 1.000 at 32, all about
#   2.5-3.5 ms; built in ~20 s (train on 16k vectors, encode 1M).
# - PQ32x4fs,RFlat: 0.81 at k_factor 32, 0.947 at 200 (2.2 ms): half the code, too coarse.
# - IVF1024,Flat: 0.55 / 0.80 / 0.90 at nprobe 16 / 64 / 128 (1.4 / 4.4 / 8.2 ms): the true
#   top 10 beyond a subject's own images are impostors from the far tail, spread over many lists.
# - SQ8 scan: 0.992 at 35 ms. HNSW32 (efConstruction 40): 0.84 at efSearch 256 (7.5 ms), 0.92 at
#   512 (12 ms), and a build of many minutes on two cores (issue 22's figures; --hnsw repeats it).
# Neither HNSW nor this index can remove vectors: a delete or in-place update rebuilds it
# (seconds for this one at 1M records, beside reading the records from SQLite).
AUTO_APPROXIMATE = "PQ64x4fs,RFlat"  # for 128 dimensions: one 4-bit code per 2 dimensions
DEFAULT_K_FACTOR = 32
AUTO_EF_SEARCH = 256
_IVF = re.compile(r"IVF(\d+)")
_PQ = re.compile(r"PQ(\d+)(?:x(\d+))?")
_HNSW = re.compile(r"HNSW(\d+)")


def auto_factory(count: int, dim: int = 128) -> str:
    """The factory ``"auto"`` resolves to for ``count`` records of ``dim`` dimensions: exact,
    or ``AUTO_APPROXIMATE`` (its code, one sub-quantiser per 2 dimensions, scaled to ``dim``;
    ``HNSW32`` for an odd ``dim``, which product quantisation cannot split)."""
    if count < AUTO_EXACT_LIMIT:
        return EXACT
    return f"PQ{dim // 2}x4fs,RFlat" if dim % 2 == 0 else "HNSW32"


def ivf_factory(count: int) -> str:
    """``IVF<about √N lists>,Flat`` (a power of two; 4·√N lists took minutes of k-means at
    1M on two cores and needed a far larger nprobe for the same recall)."""
    return f"IVF{min(8192, 2 ** round(math.log2(math.sqrt(max(count, 1)))))},Flat"


def resolve_factory(factory: str, count: int, dim: int = 128) -> str:
    """The factory to build for ``count`` records: ``auto`` by size, an untrainable
    approximate factory falls back to exact."""
    if factory == AUTO:
        return auto_factory(count, dim)
    if factory != EXACT and count < min_training_vectors(factory):
        return EXACT
    return factory


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


class _Rows:
    """One published state of an ``ExactMatrix``: (n, dim) vectors and their (n,) ids.

    Writers never change the rows a published state covers: an add writes past its end
    and publishes a longer state, a remove publishes copies. So a search works on the
    state it picked up, without a lock, whatever writers do meanwhile.
    """

    __slots__ = ("x", "ids", "_sorted", "_coarse")

    def __init__(self, x: np.ndarray, ids: np.ndarray) -> None:
        self.x, self.ids = x, ids
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # (ids sorted, their rows)
        self._coarse: tuple[faiss.IndexScalarQuantizer, float] | None = None

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows holding ``ids`` (absent ids left out)."""
        known = self._sorted
        if known is None:  # two threads may both compute it: the same value either way
            order = np.argsort(self.ids, kind="stable")
            known = self._sorted = (self.ids[order], order)
        keys, order = known
        ids = np.asarray(ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, ids), max(len(keys) - 1, 0))
        found = keys[at] == ids if len(keys) else np.zeros(len(ids), dtype=bool)
        return order[at[found]]

    def coarse(self) -> tuple[faiss.IndexScalarQuantizer, float]:
        """(the rows as bfloat16 in a FAISS scan, the largest row norm), made on first use
        (0.5 ms at 10k rows, 12 ms at 100k); two threads may both make it, alike."""
        known = self._coarse
        if known is None:
            index = faiss.IndexScalarQuantizer(self.x.shape[1], faiss.ScalarQuantizer.QT_bf16,
                                               faiss.METRIC_INNER_PRODUCT)
            index.add(self.x)
            norm = float(np.sqrt(np.einsum("nd,nd->n", self.x, self.x).max()))
            known = self._coarse = (index, norm)
        return known

    def forget_coarse(self, rows: np.ndarray) -> None:
        """Zero ``rows`` of the bfloat16 copy (removed records: no copy of them stays behind;
        a search still on this state scores them about 0, as the zeroed float32 rows)."""
        known = self._coarse
        if known is not None and len(rows):
            index = known[0]
            codes = faiss.rev_swig_ptr(index.codes.data(), index.ntotal * index.code_size)
            codes.reshape(index.ntotal, index.code_size)[rows] = 0


class ExactMatrix:
    """Exact inner-product search over one contiguous float32 matrix (N, dim) in memory.

    Scores are numpy matrix products (BLAS), so the top-k equals a brute-force
    ``q @ X.T`` + ``argpartition``; the scan runs in row chunks that keep the score
    block in cache, and each chunk's top-k comes from block maxima rather than a
    full ``argpartition`` over every score.

    Reads need no lock (see ``_Rows``); writes must not run concurrently with each
    other (the gallery serialises them).
    """

    _BLOCK = 32  # rows per block whose maximum stands for them in the first top-k pass

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._x = np.empty((0, dim), dtype=np.float32)  # capacity; rows past the state are free
        self._ids = np.empty(0, dtype=np.int64)
        self._rows = _Rows(self._x, self._ids)

    @classmethod
    def of(cls, ids: np.ndarray, vectors: np.ndarray) -> ExactMatrix:
        """An index holding ``vectors`` (N, dim) float32 C-contiguous under ``ids`` (N,),
        adopted without a copy (a 1M-record gallery would otherwise hold two)."""
        self = cls(vectors.shape[1])
        self._x, self._ids = vectors, ids
        self._rows = _Rows(vectors, ids)
        return self

    @property
    def ntotal(self) -> int:
        return len(self._rows.ids)

    @property
    def vectors(self) -> np.ndarray:
        """(N, dim) the stored vectors (a view; do not modify)."""
        return self._rows.x

    @property
    def ids(self) -> np.ndarray:
        """(N,) gallery ids of the rows of ``vectors`` (a view)."""
        return self._rows.ids

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        n, m = self.ntotal, len(ids)
        if n + m > len(self._x):
            capacity = max(n + m, 2 * len(self._x), 1024)
            x = np.empty((capacity, self.dim), dtype=np.float32)
            x[:n] = self._x[:n]
            new_ids = np.empty(capacity, dtype=np.int64)
            new_ids[:n] = self._ids[:n]
            self._x, self._ids = x, new_ids
        self._x[n : n + m] = vectors  # past the published state: no reader sees these rows yet
        self._ids[n : n + m] = ids
        self._rows = _Rows(self._x[: n + m], self._ids[: n + m])

    def remove(self, ids: np.ndarray) -> None:
        """Remove ``ids`` into fresh arrays (searches in flight keep the old ones), then
        zero the removed rows of the old arrays: no copy of a deleted vector stays behind."""
        old = self._rows
        rows = old.rows_of(ids)
        if not len(rows):
            return
        keep = np.ones(len(old.ids), dtype=bool)
        keep[rows] = False
        left = len(old.ids) - len(rows)
        x = np.empty((max(left, 1024), self.dim), dtype=np.float32)
        new_ids = np.empty(len(x), dtype=np.int64)
        np.compress(keep, old.x, axis=0, out=x[:left])
        np.compress(keep, old.ids, out=new_ids[:left])
        old_x = self._x
        self._x, self._ids = x, new_ids
        self._rows = _Rows(x[:left], new_ids[:left])
        # A search still on the old state scores these rows 0; the gallery drops hits
        # whose record is gone.
        old_x[rows] = 0.0
        old.forget_coarse(rows)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows holding ``ids`` (absent ids left out)."""
        return self._rows.rows_of(ids)

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
        excluded: np.ndarray | None = None, max_score: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N, k), gallery ids (N, k)) best first over the rows that pass the
        filters (``allowed``/``excluded`` ids, scores ≤ ``max_score``); id -1 where fewer pass."""
        state = self._rows
        x, ids = state.x, state.ids
        nq = len(queries)
        if allowed is None and excluded is None and max_score is None and len(ids) > k:
            if nq == 1:
                top, found = self.search_one(queries[0], k)
                return top[None], found[None]
            if nq > 1:
                return _search_many(x, ids, queries, k)
        if allowed is not None:
            rows = np.sort(state.rows_of(allowed))
            x, ids = x[rows], ids[rows]
        masked = None
        if excluded is not None and len(excluded):
            masked = np.zeros(len(ids), dtype=bool)
            sub = ExactMatrix._rows_in(ids, excluded) if allowed is not None else state.rows_of(excluded)
            masked[sub] = True
        if not len(ids):
            return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
        # About 4 MiB of scores per chunk: one query scans the whole matrix in one product.
        chunk = max(4096, (1 << 20) // nq)
        best_s = best_r = None
        for start in range(0, len(ids), chunk):
            block = x[start : start + chunk]
            scores = (block @ queries[0])[None, :] if nq == 1 else queries @ block.T
            if masked is not None:
                scores[:, masked[start : start + chunk]] = -np.inf
            if max_score is not None:
                scores[scores > max_score] = -np.inf
            s, r = _top_k(scores, k, self._BLOCK)
            _prefer_earlier_ties(scores, s, r)
            if best_s is None:
                best_s, best_r = s, r
            else:
                both_s = np.concatenate([best_s, s], axis=1)
                both_r = np.concatenate([best_r, r + start], axis=1)
                pick = np.argsort(-both_s, axis=1, kind="stable")[:, :k]  # ties: earlier chunk
                rows = np.arange(nq)[:, None]
                best_s, best_r = both_s[rows, pick], both_r[rows, pick]
        order = np.lexsort((best_r, -best_s), axis=1)  # ties: the earlier row (older record) first
        rows = np.arange(nq)[:, None]
        best_s, best_r = best_s[rows, order], ids[best_r[rows, order]]
        if masked is not None or max_score is not None or len(ids) < k:
            best_r[~np.isfinite(best_s)] = -1
        return best_s, best_r

    def search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (k,), gallery ids (k,)) of one query (D,) float32 without filters, best
        first; ``k`` below ``ntotal`` of the state it reads, else rows -1 padded (the
        general path)."""
        state = self._rows
        n = len(state.ids)
        if COARSE_MIN_ROWS <= n <= COARSE_MAX_ROWS and k <= COARSE_CANDIDATES // 2:
            found = _search_one_coarse(state, query, k)
            if found is not None:
                return found
        if n > k:
            return _search_one(state.x, state.ids, query, k, self._BLOCK)
        s, i = self.search(query[None, :], k)
        return s[0], i[0]

    @staticmethod
    def _rows_in(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(ids, wanted))


def _search_one(
    x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, block: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``ExactMatrix.search`` of one query (D,) without filters over more than ``k`` rows:
    the same result as the general path, with a fraction of its fixed cost (one
    product, one partition, one small sort)."""
    scores = x @ q
    m = len(scores)
    if m <= _PLAIN_TOP_K:
        # The k-th best score, then every row at or above it in row order: more than k
        # rows only on a tie at the k-th score, which the stable sort gives to the earlier rows.
        cols = np.flatnonzero(scores >= np.partition(scores, m - k)[m - k])
        top = scores[cols]
    else:
        top, cols = _top_k(scores[None, :], k, block)
        top, cols = top[0], cols[0]
        if np.count_nonzero(scores >= top.min()) > k:  # a tie at the k-th score: earliest rows win
            cols = np.argsort(-scores, kind="stable")[:k]
            top = scores[cols]
        order = np.argsort(cols)
        cols, top = cols[order], top[order]
    order = np.argsort(-top, kind="stable")[:k]  # ties: the earlier row (older record) first
    return top[order], ids[cols[order]]


# One query over COARSE_MIN_ROWS to COARSE_MAX_ROWS rows first scans a bfloat16 copy of them
# (half the bytes of the float32 scan, which past the L2 cache waits on memory: 10k rows
# 175 vs 300 us, 100k 1.4 vs 3.1 ms on a loaded 2-core machine), then scores its best
# COARSE_CANDIDATES exactly. Below, the float32 matrix sits in the cache and the scan is no
# faster; above, the copy (half the matrix again) costs more memory than it saves time.
COARSE_MIN_ROWS = 8192
COARSE_MAX_ROWS = 262_144
COARSE_CANDIDATES = 64
# bfloat16 keeps 8 significant bits: each element within 2^-7 of its float32 value (rounded
# or cut), so a row's coarse score is within 2^-7 · |q| · |x| of its exact one.
_BF16_ERROR = 2.0**-7


def _search_one_coarse(state: _Rows, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``_search_one`` through the bfloat16 copy: its best COARSE_CANDIDATES rows scored
    exactly, (scores (k,), ids (k,)) best first, ties to the earlier row. None when the
    candidates cannot prove the result (a row outside them might still score above the
    k-th: many rows within the coarse error of each other); then the exact scan decides."""
    index, norm = state.coarse()
    q = np.ascontiguousarray(q, dtype=np.float32)
    m = COARSE_CANDIDATES
    coarse = np.empty((1, m), np.float32)
    rows = np.empty((1, m), np.int64)
    index.search_c(1, faiss.swig_ptr(q), m, faiss.swig_ptr(coarse), faiss.swig_ptr(rows))
    rows = rows[0]
    if rows[-1] < 0:
        return None
    exact = state.x[rows] @ q
    order = np.lexsort((rows, -exact))[:k]  # ties: the earlier row (older record) first
    # every row outside the candidates scores at most the last candidate's coarse score
    # plus the error: below the k-th exact score, it cannot be among the top k
    bound = float(coarse[0, -1]) + _BF16_ERROR * norm * math.sqrt(float(np.dot(q, q))) + 1e-5
    if bound >= exact[order[-1]]:
        return None
    return exact[order], state.ids[rows[order]]


def _prefer_earlier_ties(scores: np.ndarray, top_s: np.ndarray, top_c: np.ndarray) -> None:
    """Where the k-th best score of a row is tied beyond the top k, replace that row's
    top k (in place) by the earliest columns, as a stable sort would choose (duplicate
    records: the older one wins, whatever order partitioning left them in)."""
    n, k = top_s.shape
    at_least = scores >= top_s.min(axis=1, keepdims=True)
    if np.count_nonzero(at_least) == n * k:  # no row has a tie beyond its k (the usual case)
        return
    for row in np.flatnonzero(at_least.sum(axis=1) > k):
        cols = np.argsort(-scores[row], kind="stable")[:k]
        top_c[row], top_s[row] = cols, scores[row, cols]


def _search_many(x: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``ExactMatrix.search`` of several queries without filters over more than ``k`` rows:
    FAISS's brute force (BLAS products in blocks, each block's scores into a per-query heap:
    2-3x numpy's product + ``argpartition``). A query whose k-th and (k+1)-th scores tie is
    redone by the numpy path, which gives the tie to the earlier row."""
    scores, rows = faiss.knn(queries, x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    tied = np.flatnonzero(scores[:, k - 1] == scores[:, k])
    scores, rows = scores[:, :k], rows[:, :k]
    order = np.lexsort((rows, -scores), axis=1)  # ties within the top k: the earlier row first
    scores, rows = np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
    for q in tied:
        full = x @ queries[q]
        cols = np.argsort(-full, kind="stable")[:k]
        scores[q], rows[q] = full[cols], cols
    return scores, ids[rows]


# Up to this many scores one argpartition beats the block maxima (bench: one query over 10k).
_PLAIN_TOP_K = 16_384


def _top_k(scores: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, columns) of the ``k`` largest per row of ``scores`` (N, M), unordered;
    -inf/-1 padded when M < k.

    Exact: columns ``j, j+b, j+2b, …`` (b = M // block) form a block; the k largest
    scores lie in the k blocks with the largest maxima, so only those ``k·block``
    candidates (plus the ragged tail) are partitioned. The block maxima are an
    elementwise maximum of ``block`` contiguous rows, which vectorises well.
    """
    n, m = scores.shape
    if m < k:
        pad = k - m
        return (np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf),
                np.pad(np.broadcast_to(np.arange(m), (n, m)), ((0, 0), (0, pad)), constant_values=-1))
    stride = m // block
    rows = np.arange(n)[:, None]
    if stride <= 4 * k or n * m <= _PLAIN_TOP_K:
        cols = np.argpartition(scores, m - k, axis=1)[:, m - k :]
        return scores[rows, cols], cols
    maxima = scores[:, : stride * block].reshape(n, block, stride).max(axis=1)
    top_blocks = np.argpartition(maxima, stride - k, axis=1)[:, stride - k :]
    cols = (top_blocks[:, :, None] + stride * np.arange(block)).reshape(n, k * block)
    if stride * block < m:
        tail = np.broadcast_to(np.arange(stride * block, m), (n, m - stride * block))
        cols = np.concatenate([cols, tail], axis=1)
    cand = scores[rows, cols]
    pick = np.argpartition(cand, cand.shape[1] - k, axis=1)[:, cand.shape[1] - k :]
    return cand[rows, pick], cols[rows, pick]


class VectorIndex:
    """One search index over search vectors (N, dim), keyed by gallery id: an
    ``ExactMatrix`` when the effective factory is exact, else a FAISS index.

    Not thread-safe on its own: the gallery guards it with a readers-writer lock.
    """

    def __init__(self, factory: str, dim: int, *, nprobe: int | None = None, ef_search: int | None = None):
        self.factory = factory
        self.dim = dim
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.effective_factory = resolve_factory(factory, 0, dim)
        self._exact: ExactMatrix | None = ExactMatrix(dim)
        self._index: faiss.IndexIDMap2 | None = None

    def _new_faiss(self, factory: str) -> faiss.IndexIDMap2:
        base = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIDMap2(base)

    @property
    def ntotal(self) -> int:
        return self._exact.ntotal if self._exact is not None else int(self._index.ntotal)

    @property
    def exact(self) -> bool:
        return self._exact is not None

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with ``vectors`` (N, dim) under ``ids`` (N,), training if needed."""
        self.effective_factory = resolve_factory(self.factory, len(ids), self.dim)
        if self.effective_factory != self.factory and self.factory != AUTO:
            log.info(
                "index %s needs %d vectors to train, gallery has %d: using exact Flat until then",
                self.factory, min_training_vectors(self.factory), len(ids),
            )
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if self.effective_factory == EXACT:
            self._exact, self._index = ExactMatrix.of(ids, vectors), None
            return
        index = self._new_faiss(self.effective_factory)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            take = min(len(ids), training_sample_size(self.effective_factory))
            sample = vectors if take == len(ids) else vectors[np.sort(rng.choice(len(ids), take, replace=False))]
            index.train(np.ascontiguousarray(sample))
        self._apply_params(index)
        if len(ids):
            index.add_with_ids(vectors, ids)
        self._exact, self._index = None, index

    def needs_training_rebuild(self, count: int) -> bool:
        """True when ``count`` records call for another index than the one built: an
        exact fallback that can now train, or ``auto`` grown past its size limit."""
        want = resolve_factory(self.factory, count, self.dim)
        if want == self.effective_factory:
            return False
        return self.factory == AUTO or self.effective_factory == EXACT

    def _apply_params(self, index: faiss.IndexIDMap2) -> None:
        inner = faiss.downcast_index(index.index)
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None:
            ivf.nprobe = self.nprobe or DEFAULT_NPROBE
        if hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = self.ef_search or (AUTO_EF_SEARCH if self.factory == AUTO else DEFAULT_EF_SEARCH)
        if isinstance(inner, faiss.IndexRefine):
            inner.k_factor = DEFAULT_K_FACTOR

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if self._exact is not None:
            self._exact.add(ids, vectors)
        else:
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ``ids``; False when this index type cannot remove (the caller rebuilds)."""
        if self._exact is not None:
            self._exact.remove(np.asarray(ids, dtype=np.int64))
            return True
        try:
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))
        except RuntimeError:
            return False
        return True

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
        excluded: np.ndarray | None = None, max_score: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N, k), gallery ids (N, k)) best first; missing results have id -1.

        ``allowed``/``excluded``: gallery ids to restrict to / leave out; ``max_score``:
        drop results scoring above it. The exact index applies every filter inside the
        scan (a short row means nothing else passes); an approximate one may come back
        short, and the caller widens ``k``.
        """
        k = max(1, min(k, max(self.ntotal, 1)))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._exact is not None:
            return self._exact.search(queries, k, allowed=allowed, excluded=excluded, max_score=max_score)
        if not self.filters_inside and (allowed is not None or excluded is not None):
            scores, ids = self._index.search(queries, k)
            scores, ids = _keep_only(scores, ids, allowed, excluded)
        else:
            selector, _keep = _selector(allowed, excluded)
            if selector is None:
                scores, ids = self._index.search(queries, k)
            else:
                scores, ids = self._index.search(queries, k, params=self._params(selector))
        if max_score is not None:
            ids = np.where(scores > max_score, -1, ids)
        return scores, ids

    @property
    def filters_inside(self) -> bool:
        """Whether ``allowed``/``excluded`` restrict the search itself (exact, IVF, HNSW);
        else (a PQ fast scan) they filter its results, which may then come back short."""
        if self._index is None:
            return True
        inner = faiss.downcast_index(self._index.index)
        return not isinstance(inner, (faiss.IndexRefine, faiss.IndexFastScan))

    def search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (k,), gallery ids (k,)) of one query (D,) float32 C-contiguous, no filters,
        0 < k; the exact index without its batch wrappers (what one search costs is mostly them)."""
        if self._exact is not None:
            return self._exact.search_one(query, k)
        s, i = self.search(query[None, :], k)
        return s[0], i[0]

    def _params(self, selector: faiss.IDSelector) -> faiss.SearchParameters:
        inner = faiss.downcast_index(self._index.index)
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None:
            return faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nprobe))
        if hasattr(inner, "hnsw"):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=int(inner.hnsw.efSearch))
        return faiss.SearchParameters(sel=selector)

    def vectors_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids present, their vectors (M, dim)) from the exact index; None for FAISS."""
        if self._exact is None:
            return None
        rows = np.sort(self._exact.rows_of(ids))
        return self._exact.ids[rows], self._exact.vectors[rows]

    # -- persistence ---------------------------------------------------------------

    def save(self, path: Path, gallery_version: int) -> Sidecar:
        """Write the index and its sidecar atomically (temp file, fsync, rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if self._exact is not None:
            with open(tmp, "wb") as fh:
                np.save(fh, self._exact.ids)
                np.save(fh, self._exact.vectors)
        else:
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
        fsync_dir(path.parent)
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
        self = cls(factory, dim, nprobe=nprobe, ef_search=ef_search)
        self.effective_factory = sidecar.effective_factory
        if sidecar.effective_factory == EXACT:
            try:
                with open(path, "rb") as fh:
                    ids, vectors = np.load(fh), np.load(fh)
            except (ValueError, OSError) as exc:
                raise StaleIndex("unreadable") from exc
            if len(ids) != count or vectors.shape != (count, dim):
                raise StaleIndex("count or dimension differs")
            self._exact = ExactMatrix.of(np.ascontiguousarray(ids, dtype=np.int64),
                                         np.ascontiguousarray(vectors, dtype=np.float32))
            return self
        try:
            raw = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise StaleIndex("unreadable") from exc
        if raw.ntotal != count or raw.d != dim:
            raise StaleIndex("count or dimension differs")
        self._exact = None
        self._index = _as_idmap2(raw)
        self._owner = raw  # the downcast proxy does not own the C++ index; this one does
        self._apply_params(self._index)
        return self


def _selector(allowed: np.ndarray | None, excluded: np.ndarray | None) -> tuple[faiss.IDSelector | None, list]:
    """(FAISS selector, objects it needs kept alive)."""
    if allowed is not None:
        ids = np.asarray(allowed, dtype=np.int64)
        if excluded is not None and len(excluded):
            ids = np.setdiff1d(ids, excluded)
        selector = faiss.IDSelectorBatch(ids)
        return selector, [selector, ids]
    if excluded is not None and len(excluded):
        ids = np.asarray(excluded, dtype=np.int64)
        inner = faiss.IDSelectorBatch(ids)
        selector = faiss.IDSelectorNot(inner)
        return selector, [selector, inner, ids]
    return None, []


def _keep_only(
    scores: np.ndarray, ids: np.ndarray, allowed: np.ndarray | None, excluded: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) with the results the filters reject moved out: each row keeps its order,
    padded with -inf / -1."""
    keep = ids >= 0
    if allowed is not None:
        keep &= np.isin(ids, allowed)
    if excluded is not None and len(excluded):
        keep &= ~np.isin(ids, excluded)
    order = np.argsort(~keep, axis=1, kind="stable")
    scores, ids, keep = (np.take_along_axis(a, order, axis=1) for a in (scores, ids, keep))
    return np.where(keep, scores, -np.inf).astype(np.float32), np.where(keep, ids, -1)


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


def fsync_dir(path: Path) -> None:
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
