"""Search and ranking over a gallery: nearest images, GestaltMatcher syndrome and gene
ranking, and the one filter type they all take (``SearchFilter``).

``Ranking`` is the search half of ``gallery.store.Gallery`` (which mixes it in): it
reads the store only through ``_rw`` (the readers-writer lock), ``_index``,
``_search_dims()`` and ``_infos()``, and never writes.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from gallery.errors import SchemeMismatch
from gallery.records import GeneHit, Hit, RecordInfo, SyndromeHit
from gallery.vectors import ViewsLike, query_matrix, search_matrix

if TYPE_CHECKING:
    from gallery._rwlock import ReadWriteLock
    from gallery.index import VectorIndex

# Below this many eligible records a filtered search on an approximate index that came
# back short is redone exactly from SQLite.
_EXACT_FALLBACK_LIMIT = 200_000
# Labels of this many recent hits stay in memory (cleared by every write).
_LABEL_CACHE_SIZE = 65_536
_HIT_LABELS = ("gallery_id", "image_id", "subject_id", "syndrome_id", "syndrome_name", "omim_id", "genes")
# Extra candidates fetched when the same-patient rule may drop some (approximate index).
_SAME_PATIENT_SLACK = 16


@dataclass(frozen=True)
class SearchFilter:
    """Which gallery images a search may return.

    ``exclude_subjects``: subject ids left out (the query's own patient).
    ``same_patient_distance``: drop hits at mean cosine distance ≤ this (GestaltMatcher's
    "likely the same patient" rule, e.g. 0.4); None: off.
    ``syndromes``: keep only these syndrome ids; None: every syndrome.
    Filtered searches still return ``k`` hits when the gallery has them.
    """

    exclude_subjects: tuple[str, ...] = ()
    same_patient_distance: float | None = None
    syndromes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude_subjects", tuple(sorted({str(s) for s in self.exclude_subjects})))
        if self.syndromes is not None:
            object.__setattr__(self, "syndromes", tuple(sorted({str(s) for s in self.syndromes})))
        if self.same_patient_distance is not None:
            object.__setattr__(self, "same_patient_distance", float(self.same_patient_distance))

    @classmethod
    def of(cls, base: SearchFilter | None = None, **fields: object) -> SearchFilter:
        """``base`` (or no filter) with ``fields`` (SearchFilter's own keywords) replaced."""
        if not fields:
            return base or _NO_FILTER
        return replace(base or _NO_FILTER, **fields)

    @property
    def max_score(self) -> float | None:
        """The highest score a hit may have (the same-patient rule as a score bound)."""
        return None if self.same_patient_distance is None else 1.0 - self.same_patient_distance

    def eligible(self, conn: sqlite3.Connection) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(allowed gallery ids or None: all, excluded gallery ids or None: none) from SQLite."""
        excluded = json.dumps(list(self.exclude_subjects))
        if self.syndromes is not None:
            allowed = conn.execute(
                "SELECT gallery_id FROM records WHERE syndrome_id IN (SELECT value FROM json_each(?))"
                " AND subject_id NOT IN (SELECT value FROM json_each(?))",
                (json.dumps(list(self.syndromes)), excluded),
            )
            return np.fromiter((r[0] for r in allowed), dtype=np.int64), None
        if self.exclude_subjects:
            dropped = conn.execute(
                "SELECT gallery_id FROM records WHERE subject_id IN (SELECT value FROM json_each(?))",
                (excluded,),
            )
            ids = np.fromiter((r[0] for r in dropped), dtype=np.int64)
            return None, (ids if len(ids) else None)
        return None, None


_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.float32))


class Ranking:
    """Search and ranking methods of the gallery (mixed into ``Gallery``).

    Each public method takes a ``SearchFilter`` as ``filter`` and/or its fields as
    keywords (``exclude_subjects=``, ``same_patient_distance=``, ``syndromes=``);
    keywords override the filter's fields.
    """

    _rw: ReadWriteLock
    _index: VectorIndex | None
    _label_cache: dict[int, tuple[RecordInfo, dict]]

    if TYPE_CHECKING:  # provided by the store (gallery.store.Gallery)
        def _conn(self) -> sqlite3.Connection: ...
        def _search_dims(self) -> tuple[str | None, tuple[int, ...]]: ...
        def _infos(self, ids: Iterable[int]) -> dict[int, RecordInfo]: ...

    def search(
        self, query_views: ViewsLike, k: int = 10, filter: SearchFilter | None = None, *,
        view_scheme: str | None = None, **filters: object,
    ) -> list[Hit]:
        """The ``k`` nearest gallery images to one query (V views, (V, D) or a sequence of (D_v,))."""
        if isinstance(query_views, np.ndarray) and query_views.ndim in (1, 2):  # a batch of one, no copy
            batch = query_views[None, None] if query_views.ndim == 1 else query_views[None]
        else:
            batch = [query_views]
        chosen = _NO_FILTER if filter is None and not filters else SearchFilter.of(filter, **filters)
        return _hit_rows(*self._found(batch, k, chosen, view_scheme))[0]

    def search_batch(
        self, queries: np.ndarray | Sequence[ViewsLike], k: int = 10, filter: SearchFilter | None = None,
        *, view_scheme: str | None = None, **filters: object,
    ) -> list[list[Hit]]:
        """``search`` for N queries: an (N, V, D) array or a sequence of per-query views.

        The list's ``Hit`` objects are made when it is first read (see ``PendingHits``):
        for a small gallery making them costs more than finding them.
        """
        chosen = _NO_FILTER if filter is None and not filters else SearchFilter.of(filter, **filters)
        return PendingHits(*self._found(queries, k, chosen, view_scheme))

    def _found(
        self, queries, k: int, chosen: SearchFilter, view_scheme: str | None,
    ) -> tuple[list[tuple[list[int], list[float]]], dict[int, tuple[RecordInfo, dict]]]:
        """(per query (gallery ids, scores) best first, labels of at least every id there).

        The labels dictionary is only ever added to (see ``_labels``), so Hits made from it
        later carry the labels the search found.
        """
        index = self._index
        if index is not None and index.exact:
            # No lock: the exact index searches a state no writer changes (gallery.index._Rows).
            # A record deleted after that state was taken has no labels any more; then the
            # search is redone under the lock, so it never comes back short.
            if chosen is _NO_FILTER and k > 0 and len(queries):  # the common case, lean
                q = self._query_matrix(queries, view_scheme)
                if q is None:
                    return [([], [])] * len(queries), {}
                if len(q) == 1:
                    scores, ids = index.search_one(q[0], k)
                    flat = ids.tolist()
                    if flat[-1] < 0:  # fewer records than k (+1): ids -1 pad the row
                        keep = ids >= 0
                        flat, scores = ids[keep].tolist(), scores[keep]
                    ranked = [(flat, scores.tolist())]
                else:
                    scores, ids = index.search(q, k)
                    if ids[:, -1].min() < 0:  # fewer records than k
                        ranked = [(i[i >= 0].tolist(), s[i >= 0].tolist()) for i, s in zip(ids, scores, strict=True)]
                        flat = [gid for row, _ in ranked for gid in row]
                    else:
                        flat = ids.ravel().tolist()
                        ranked = _FullRows(flat, scores)
            else:
                ranked = [(i.tolist(), s.tolist()) for i, s in self._ranked(queries, k, chosen, view_scheme, index)]
                flat = [gid for row, _ in ranked for gid in row]
            cache = self._label_cache
            if all(map(cache.__contains__, flat)):  # every label cached: done
                return ranked, cache
            labels = self._labels(flat)
            if len(labels) == len(set(flat)):
                return ranked, labels
        with self._rw.read():  # ids and their rows read under one lock: deletes cannot slip between
            ranked = [(ids.tolist(), scores.tolist()) for ids, scores in self._ranked(queries, k, chosen, view_scheme)]
            labels = self._labels([gid for ids, _ in ranked for gid in ids])
        return ranked, labels

    def _labels(self, ids: list[int]) -> dict[int, tuple[RecordInfo, dict]]:
        """gallery id -> (RecordInfo, its Hit fields) for those of ``ids`` still in the gallery."""
        cache = self._label_cache
        out = {}
        missing = []
        for gid in ids:
            found = cache.get(gid)
            if found is None:
                missing.append(gid)
            else:
                out[gid] = found
        if missing:
            fetched = {
                gid: (info, {name: getattr(info, name) for name in _HIT_LABELS})
                for gid, info in self._infos(missing).items()
            }
            if len(cache) + len(fetched) > _LABEL_CACHE_SIZE:
                # a new dictionary, not cleared: results not yet read still make Hits from the old one
                cache = self._label_cache = {}
            cache.update(fetched)
            out.update(fetched)
        return out

    def _forget_labels(self) -> None:
        """Drop cached labels: called after every committed write (a search racing the
        write may have cached a row's old labels into the dictionary this replaces)."""
        self._label_cache = {}

    def rank_syndromes(
        self, query_views: ViewsLike, top: int | None = 30, filter: SearchFilter | None = None, *,
        view_scheme: str | None = None, **filters: object,
    ) -> list[SyndromeHit]:
        """Syndromes ranked by their nearest gallery image (GestaltMatcher); ``top=None``: all."""
        out: list[SyndromeHit] = []
        chosen = SearchFilter.of(filter, **filters)
        for gid, score, info in self._walk(query_views, top, lambda i: [i.syndrome_id], chosen, view_scheme):
            if top is not None and len(out) >= top:
                break
            out.append(SyndromeHit(
                syndrome_id=info.syndrome_id, syndrome_name=info.syndrome_name, omim_id=info.omim_id,
                score=score, gallery_id=gid, image_id=info.image_id, subject_id=info.subject_id,
            ))
        return out

    def rank_genes(
        self, query_views: ViewsLike, top: int | None = 30, filter: SearchFilter | None = None, *,
        view_scheme: str | None = None, **filters: object,
    ) -> list[GeneHit]:
        """Genes ranked by the nearest gallery image that carries them; ``top=None``: all."""
        out: list[GeneHit] = []
        seen_gene: set[str] = set()
        chosen = SearchFilter.of(filter, **filters)
        for gid, score, info in self._walk(query_views, top, lambda i: list(i.genes), chosen, view_scheme):
            for gene in info.genes:
                if gene not in seen_gene and (top is None or len(out) < top):
                    seen_gene.add(gene)
                    out.append(GeneHit(
                        gene=gene, score=score, gallery_id=gid, image_id=info.image_id,
                        subject_id=info.subject_id, syndrome_id=info.syndrome_id,
                    ))
        return out

    # -- internals ----------------------------------------------------------------

    def _query_matrix(self, queries, view_scheme: str | None) -> np.ndarray | None:
        scheme, dims = self._search_dims()
        if view_scheme is not None and scheme is not None and view_scheme != scheme:
            raise SchemeMismatch(f"query view scheme {view_scheme!r} differs from the gallery's {scheme!r}")
        if not dims:
            return None
        if len(dims) == 1 and isinstance(queries, np.ndarray) and queries.dtype == np.float32 and (
            (queries.ndim == 3 and queries.shape[1] == 1) or queries.ndim == 2
        ) and queries.shape[-1] == dims[0] and len(queries):
            # One view, a float32 array: what ``query_matrix`` computes (to the last bit or
            # so: one query's norm is a dot product), without its general checks' fixed cost.
            flat = queries.reshape(len(queries), dims[0])
            if len(flat) == 1:
                square = float(np.dot(flat[0], flat[0]))
                if 0.0 < square < math.inf:  # else query_matrix raises the error that says why
                    return flat / np.float32(math.sqrt(square))
            else:
                norms = np.sqrt(np.einsum("nd,nd->n", flat, flat))
                if norms.min() > 0 and norms.max() < np.inf:
                    return flat / norms[:, None]
        return query_matrix(queries, dims)

    def _ranked(
        self, queries, k: int, chosen: SearchFilter, view_scheme: str | None,
        index: VectorIndex | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query (gallery ids, scores) best first, at most ``k``, filters applied.

        The caller holds the read lock, or passes the exact ``index`` it read (which needs none).
        """
        q = self._query_matrix(queries, view_scheme)
        if q is None:
            return [_EMPTY] * len(queries)
        if k <= 0:
            raise ValueError("k must be positive")
        if index is None:
            index = self._index
        if index is None or index.ntotal == 0:
            return [_EMPTY] * len(q)
        allowed, excluded = (None, None) if chosen is _NO_FILTER else chosen.eligible(self._conn())
        if allowed is not None and len(allowed) == 0:
            return [_EMPTY] * len(q)
        max_score = chosen.max_score
        if index.exact:  # every filter applied inside the scan: one pass
            scores, ids = index.search(q, k, allowed=allowed, excluded=excluded, max_score=max_score)
            if (ids[0, -1] >= 0 if len(ids) == 1 else ids[:, -1].min() >= 0):  # every row full: no masks
                return list(zip(ids, scores, strict=True))
            return [(row_ids[row_ids >= 0], row_scores[row_ids >= 0])
                    for row_ids, row_scores in zip(ids, scores, strict=True)]
        if allowed is not None and not index.filters_inside and len(allowed) <= _EXACT_FALLBACK_LIMIT:
            # The index can only filter its results, and a few allowed records may lie far down them.
            return self._exact_scan(q, allowed, k, max_score)
        total = index.ntotal if allowed is None else min(index.ntotal, len(allowed))
        fetch = min(total, k if max_score is None else k + _SAME_PATIENT_SLACK)
        inside = index.filters_inside
        while True:
            scores, ids = index.search(q, fetch, allowed=allowed, excluded=excluded)
            results = []
            short = False
            for row_ids, row_scores in zip(ids, scores, strict=True):
                keep = row_ids >= 0
                # a short row: nothing else passes, unless the index filtered its results after the scan
                exhausted = keep.sum() < fetch if inside else fetch >= total
                if max_score is not None:
                    keep &= row_scores <= max_score
                results.append((row_ids[keep][:k], row_scores[keep][:k]))
                if keep.sum() < k and not exhausted:
                    short = True
            if not short or fetch >= total:
                break
            fetch = min(total, fetch * 4)
        if allowed is not None and len(allowed) <= _EXACT_FALLBACK_LIMIT:
            want = min(k, len(allowed))
            if any(len(r[0]) < want for r in results):
                results = self._exact_scan(q, allowed, k, max_score)
        return results

    def _exact_scan(
        self, q: np.ndarray, ids: np.ndarray, k: int, max_score: float | None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Brute force over ``ids`` from SQLite, for filters an approximate index serves poorly."""
        rows = self._conn().execute(
            "SELECT gallery_id, embedding FROM records WHERE gallery_id IN (SELECT value FROM json_each(?))",
            (json.dumps(ids.tolist()),),
        ).fetchall()
        gids = np.array([r[0] for r in rows], dtype=np.int64)
        flat = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
        scores = q @ search_matrix(flat, self._search_dims()[1]).T
        out = []
        for row in scores:
            order = np.argsort(-row, kind="stable")
            if max_score is not None:
                order = order[row[order] <= max_score]
            order = order[:k]
            out.append((gids[order], row[order].astype(np.float32)))
        return out

    def _walk(
        self, query_views, top: int | None, keys_of, chosen: SearchFilter, view_scheme: str | None,
    ) -> Iterator[tuple[int, float, RecordInfo]]:
        """Yield (gallery id, score, info) for each image that is the first to carry a new key,
        widening the candidate list until ``top`` keys are found or the gallery is exhausted."""
        index = self._index
        total = index.ntotal if index is not None else 0
        if total == 0:
            return
        fetch = total if top is None else min(total, max(64, 8 * top))
        while True:
            with self._rw.read():
                ids, scores = self._ranked([query_views], fetch, chosen, view_scheme)[0]
                labels = self._labels(ids.tolist())
            seen: set[str] = set()
            found = []
            for gid, score in zip(ids.tolist(), scores.tolist(), strict=True):
                if gid not in labels:
                    continue
                info = labels[gid][0]
                new = [key for key in keys_of(info) if key not in seen]
                if new:
                    seen.update(new)
                    found.append((gid, score, info))
            if (top is not None and len(seen) >= top) or len(ids) < fetch or fetch >= total:
                break
            fetch = min(total, fetch * 4)
        yield from found


class _FullRows:
    """Per query (gallery ids, scores) of a batch whose rows all hold ``k`` hits, as
    ``_found`` returns them, from the flat ids list and the (N, k) scores array."""

    __slots__ = ("ids", "scores")

    def __init__(self, ids: list[int], scores: np.ndarray) -> None:
        self.ids, self.scores = ids, scores

    def __iter__(self) -> Iterator[tuple[list[int], list[float]]]:
        ids, k = self.ids, self.scores.shape[1]
        for row, scores in enumerate(self.scores.tolist()):
            yield ids[row * k : (row + 1) * k], scores


def _hit_rows(
    ranked: Iterable[tuple[list[int], list[float]]], labels: dict[int, tuple[RecordInfo, dict]],
) -> list[list[Hit]]:
    """``Hit`` lists from per-query (gallery ids, scores); ids without labels (deleted
    between the search and the label lookup under the lock) are left out."""
    new = object.__new__
    get = labels.get
    out = []
    for ids, scores in ranked:
        hits = []
        for gid, score in zip(ids, scores, strict=True):
            found = get(gid)
            if found is None:
                continue
            # Hit's own fields, set as its frozen __init__ would, without its per-field
            # calls: thousands of hits per batch made them cost more than the search.
            hit = new(Hit)
            fields = hit.__dict__
            fields.update(found[1])
            fields["score"] = score
            hits.append(hit)
        out.append(hits)
    return out


class HitLists(list):
    """``list[list[Hit]]``: ``search_batch``'s result once read (a plain list otherwise)."""

    __slots__ = ("_ranked", "_labels")


class PendingHits(HitLists):
    """``search_batch``'s result before its first read: the found ids, scores and labels,
    whose ``Hit`` lists are made by whatever reads it first (any list operation), after
    which it is a ``HitLists``, read at list speed. Making 64 × 10 Hits takes longer than
    a 64-query search of a thousand records; a caller that never reads them (or reads
    them later, on another thread) does not pay for them inside the search.
    """

    __slots__ = ()

    def __init__(self, ranked: Iterable[tuple[list[int], list[float]]],
                 labels: dict[int, tuple[RecordInfo, dict]]) -> None:
        self._ranked, self._labels = ranked, labels

    def _fill(self) -> None:
        with _FILLING:
            if type(self) is PendingHits:
                list.extend(self, _hit_rows(self._ranked, self._labels))
                self._ranked = self._labels = None
                self.__class__ = HitLists

    def __reduce_ex__(self, protocol: int) -> tuple:
        self._fill()
        return list, (list(self),)

    def __radd__(self, other: object) -> object:
        self._fill()
        return NotImplemented  # then the left operand's own concatenation, now of the filled list


_FILLING = threading.Lock()


def _filling(name: str):
    method = getattr(list, name)

    def call(self, *args, **kwargs):
        self._fill()
        for other in args:  # list's C methods read a list operand's items directly
            if type(other) is PendingHits:
                other._fill()
        return method(self, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


for _name in ("__getitem__", "__iter__", "__len__", "__contains__", "__reversed__", "__repr__",
              "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__add__", "__mul__",
              "__rmul__", "__iadd__", "__imul__", "__setitem__", "__delitem__", "__sizeof__",
              "append", "extend", "insert", "pop", "remove", "index", "count", "copy", "sort",
              "reverse", "clear"):
    setattr(PendingHits, _name, _filling(_name))
del _name


_NO_FILTER = SearchFilter()
