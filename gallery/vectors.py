"""Per-view embeddings and the one search vector that stands for them (DESIGN.md §4).

A record's embedding is V per-view vectors ``e_v`` (sizes ``D_v`` may differ per
view). The search vector is ``concat_v(ê_v) / √V``, so the inner product of two
search vectors is the mean per-view cosine, GestaltMatcher-Arc's ensemble score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gallery.errors import DimensionMismatch, InvalidEmbedding

ViewsLike = np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[float]]


def as_views(views: ViewsLike) -> tuple[np.ndarray, ...]:
    """Per-view float32 vectors from a (V, D) array, a (D,) array (V=1) or a sequence of 1-D arrays."""
    if isinstance(views, np.ndarray):
        if views.ndim == 1:
            views = views[None, :]
        if views.ndim != 2:
            raise DimensionMismatch(f"expected (V, D) views, got an array of shape {views.shape}")
        out = tuple(np.ascontiguousarray(v, dtype=np.float32) for v in views)
    else:
        out = tuple(np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for v in views)
        if any(v.ndim != 1 for v in out):
            raise DimensionMismatch("every view must be a 1-D vector")
    if not out:
        raise DimensionMismatch("an embedding needs at least one view")
    for v in out:
        if v.size == 0 or not np.all(np.isfinite(v)):
            raise InvalidEmbedding("an embedding view is empty or has a non-finite value")
    return out


def dims_of(views: Sequence[np.ndarray]) -> tuple[int, ...]:
    return tuple(int(v.shape[0]) for v in views)


def check_dims(views: Sequence[np.ndarray], expected: Sequence[int]) -> None:
    got = dims_of(views)
    if tuple(expected) != got:
        raise DimensionMismatch(
            f"embedding has {len(got)} views of sizes {list(got)}; "
            f"the gallery holds {len(expected)} views of sizes {list(expected)}"
        )


def pack(views: Sequence[np.ndarray]) -> bytes:
    """Raw per-view vectors concatenated as little-endian float32 (the stored form)."""
    return np.concatenate(views).astype("<f4", copy=False).tobytes()


def unpack(blob: bytes, dims: Sequence[int]) -> tuple[np.ndarray, ...]:
    flat = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    if flat.shape[0] != sum(dims):
        raise DimensionMismatch(f"stored embedding has {flat.shape[0]} values, expected {sum(dims)}")
    return tuple(np.split(flat, np.cumsum(dims)[:-1]))


def search_matrix(flat: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """(N, ΣD) raw concatenated views -> (N, ΣD) float32 concat_v(ê_v)/√V, in one pass.

    Raises InvalidEmbedding when a view has zero length.
    """
    flat = np.asarray(flat, dtype=np.float32)
    if len(dims) == 1:  # one view: one pass, no copies per view
        norms = np.sqrt(np.einsum("nd,nd->n", flat, flat))[:, None]
        if not np.all(norms > 0) or not np.all(np.isfinite(norms)):  # NaN fails `> 0`
            raise InvalidEmbedding("an embedding view has zero length or a non-finite value")
        return flat / norms
    out = np.empty_like(flat)
    scale = np.float32(1.0 / np.sqrt(len(dims)))
    start = 0
    for d in dims:
        block = flat[:, start : start + d]
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        if np.any(norms == 0) or not np.all(np.isfinite(norms)):
            raise InvalidEmbedding("an embedding view has zero length or a non-finite value")
        out[:, start : start + d] = block * (scale / norms)
        start += d
    return out


def search_vector(views: Sequence[np.ndarray]) -> np.ndarray:
    """(ΣD,) float32 search vector of one embedding."""
    return search_matrix(np.concatenate(views)[None, :], dims_of(views))[0]


def query_matrix(queries: np.ndarray | Sequence[ViewsLike], dims: Sequence[int]) -> np.ndarray:
    """Search vectors (N, ΣD) for a batch: an (N, V, D) array, an (N, ΣD) array of
    concatenated raw views, or a sequence of per-query views."""
    if isinstance(queries, np.ndarray) and queries.ndim == 3:
        flat = queries.reshape(queries.shape[0], -1)
        if queries.shape[1] != len(dims) or any(d != queries.shape[2] for d in dims):
            raise DimensionMismatch(
                f"queries have shape {queries.shape}; the gallery holds views of sizes {list(dims)}"
            )
        return search_matrix(flat, dims)  # a non-finite value makes its view's norm non-finite
    rows = []
    for q in queries:
        views = as_views(q)
        check_dims(views, dims)
        rows.append(np.concatenate(views))
    if not rows:
        return np.zeros((0, sum(dims)), dtype=np.float32)
    return search_matrix(np.stack(rows), dims)
