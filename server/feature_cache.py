"""A bounded, thread-safe LRU of the explain engine's features of gallery faces.

Explain runs the query through the model once and, without this cache, every
hit's stored crop again on every call. Features depend only on the crop's
pixels and the model, so an entry is stored under the record's gallery id with
a fingerprint of exactly those: the sha256 of the stored crop PNG, the encoder
id and the view scheme. A lookup whose fingerprint differs from the stored one
(the record's crop was replaced) drops the old entry and misses, so an updated
record never gets stale features. Deleting or replacing a record drops its entry at
once (``discard``, called by the server's gallery writes), and a replica that swaps
in a snapshot drops the faces the snapshot no longer holds as they were (``retain``). Label-only updates keep the crop and so
keep valid features.

The cache holds torch tensors of features and embeddings only: no image bytes,
no labels. It never logs. Memory per face is ``FaceFeatures`` of one face,
``sum over views of (C*h*w + C_f*h_f*w_f + D)*4`` bytes plus its crop (SFace with two
views: 7x7x1024 CAM maps, 14x14x512 contrast-layer maps, 128-d embeddings: about 1.2 MB;
see ``FeatureCache.stats().bytes``).

Below the cache sits the on-disk ``gallery.features.FeatureStore`` (filled when images
are added); ``to_stored``/``from_stored`` convert between the two.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from explain.attribution.engine import FaceFeatures
from gallery.features import StoredFeatures


@dataclass(frozen=True)
class Fingerprint:
    """What a face's features depend on: its crop (sha256 of the PNG) and the model."""

    crop_sha256: str
    encoder_id: str
    view_scheme: str

    @classmethod
    def of(cls, crop_png: bytes, encoder_id: str, view_scheme: str) -> Fingerprint:
        return cls(hashlib.sha256(crop_png).hexdigest(), encoder_id, view_scheme)


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made; ``bytes`` is the tensors currently held."""

    capacity: int
    size: int
    bytes: int
    hits: int
    misses: int
    stale: int  # lookups that found an entry for an older crop of the record
    evictions: int


def _nbytes(features: FaceFeatures) -> int:
    crops = 0 if features.crops is None else features.crops.nbytes
    return crops + sum(t.numel() * t.element_size()
                       for t in (*features.feature_maps, *features.embeddings,
                                 *(features.fine_maps or ())))


def _own(features: FaceFeatures) -> FaceFeatures:
    """One face's features (crop and contrast-layer maps included) in arrays of their own
    (not views into a batch)."""
    return FaceFeatures(
        tuple(f.detach().clone() for f in features.feature_maps),
        tuple(e.detach().clone() for e in features.embeddings),
        features.encoders, features.flipped, features.crop_size,
        None if features.crops is None else features.crops.copy(),
        None if features.fine_maps is None else tuple(f.detach().clone()
                                                      for f in features.fine_maps),
    )


# -- the on-disk store's layout (gallery.features) ------------------------------------
#
# The store keeps per view one map and one embedding; a face here has three arrays per
# view (the CAM layer's map, the contrast layer's, and its region effects' neutral edits:
# (R, D) unit embeddings of the face with each region of ``explain.effects.EFFECT_REGIONS``
# replaced by the neutral face's, stored as an (R, D, 1) map). They go in as three times
# the views, in the order [CAM maps of views 0..V-1, contrast-layer maps, neutral edits];
# the embeddings sit on the first V and the rest carry empty (0-wide) embeddings. Neutral
# edits not computed (a hit encoded by Explain) are stored as NaN and read as absent. The
# layout is named in the store's view scheme (``stored_scheme``), so a store of another
# layout reads as stale.

STORED_KINDS = "cam+contrast+neutral-edits"


def stored_scheme(view_scheme: str) -> str:
    """The view scheme a FeatureStore is opened with for ``view_scheme``'s features."""
    return f"{view_scheme}|{STORED_KINDS}"


def to_stored(features: FaceFeatures, edits: Sequence[Sequence[torch.Tensor]] | None = None
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """FaceFeatures of N faces (and their neutral edits: per face, per view (R, D), or None)
    -> (maps, embeddings) for ``FeatureStore.put``: 3V maps (N, C, h, w), (N, C_f, h_f,
    w_f), (N, R, D, 1) (NaN without ``edits``), and 3V embeddings (N, D), then (N, 0),
    float32."""
    from explain.effects import EFFECT_REGIONS

    if features.fine_maps is None:
        raise ValueError("only features with their contrast-layer maps can be stored")

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).numpy()

    n, views = len(features), len(features.embeddings)
    if edits is None:
        neutral = [np.full((n, len(EFFECT_REGIONS), e.shape[-1], 1), np.nan, np.float32)
                   for e in features.embeddings]
    else:
        neutral = [np.stack([arr(edits[k][v]) for k in range(n)])[..., None]
                   for v in range(views)]
    maps = [arr(m) for m in (*features.feature_maps, *features.fine_maps)] + neutral
    embeddings = [arr(e) for e in features.embeddings]
    embeddings += [np.zeros((n, 0), np.float32)] * (2 * views)
    return maps, embeddings


def stored_edits(stored: StoredFeatures, row: int) -> list[torch.Tensor] | None:
    """The neutral edits of face ``row`` of ``FeatureStore.get``'s results, per view (R, D)
    float32 tensors, or None where the store holds none (NaN)."""
    views = len(stored.maps) // 3
    edits = [np.asarray(m[row, ..., 0], np.float32) for m in stored.maps[2 * views:]]
    if not edits or any(not np.isfinite(e).all() for e in edits):
        return None
    return [torch.from_numpy(e) for e in edits]


def from_stored(stored: StoredFeatures, like: FaceFeatures, crops: np.ndarray | None
                ) -> FaceFeatures:
    """``FeatureStore.get`` results -> FaceFeatures of those faces, with the encoders,
    flips and device of ``like`` (any features of the same explainer) and ``crops``
    (N, H, W, 3) uint8 of those faces (or None)."""
    views = len(like.feature_maps)
    if len(stored.maps) != 3 * views:
        raise ValueError(f"the store holds {len(stored.maps)} maps per face, expected {3 * views}")
    device = like.feature_maps[0].device

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, torch.float32)

    return FaceFeatures(
        tuple(tensor(m) for m in stored.maps[:views]),
        tuple(tensor(e) for e in stored.embeddings[:views]),
        like.encoders, like.flipped, like.crop_size, crops,
        tuple(tensor(m) for m in stored.maps[views:2 * views]),
    )


class FeatureCache:
    """LRU of per-face ``FaceFeatures`` keyed by gallery id, checked against a Fingerprint.

    ``capacity`` faces at most (>= 1). Thread-safe: lookups and inserts hold a
    lock; computing missing features happens outside it, so two calls that miss
    the same face may both compute it (the results are identical).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a feature cache holds at least one face, got {capacity}")
        self.capacity = int(capacity)
        self._entries: OrderedDict[int, tuple[Fingerprint, FaceFeatures, int]] = OrderedDict()
        # What else was derived from a cached face's crop (e.g. region effects' neutral
        # edits), by name; it lives and dies with the face's entry.
        self._extras: dict[int, dict[str, tuple[Any, int]]] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = self._misses = self._stale = self._evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, gallery_id: int, fingerprint: Fingerprint) -> FaceFeatures | None:
        """The cached features of a face whose crop and model match ``fingerprint``, or None."""
        with self._lock:
            entry = self._entries.get(gallery_id)
            if entry is not None and entry[0] == fingerprint:
                self._entries.move_to_end(gallery_id)
                self._hits += 1
                return entry[1]
            if entry is not None:
                self._drop(gallery_id)
                self._stale += 1
            self._misses += 1
            return None

    def put(self, gallery_id: int, fingerprint: Fingerprint, features: FaceFeatures) -> None:
        """Store one face's features (N = 1), evicting the least recently used beyond capacity."""
        if len(features) != 1:
            raise ValueError(f"cache one face at a time, got {len(features)}")
        owned = _own(features)
        size = _nbytes(owned)
        with self._lock:
            if gallery_id in self._entries:
                self._drop(gallery_id)
            self._entries[gallery_id] = (fingerprint, owned, size)
            self._bytes += size
            while len(self._entries) > self.capacity:
                self._drop(next(iter(self._entries)))
                self._evictions += 1

    def discard(self, gallery_ids: Sequence[int]) -> None:
        """Forget these faces (e.g. after they were deleted)."""
        with self._lock:
            for gid in gallery_ids:
                if gid in self._entries:
                    self._drop(gid)

    def retain(self, keep: Callable[[int, Fingerprint], bool]) -> int:
        """Forget every face for which ``keep(gallery_id, fingerprint)`` is False (e.g. a
        replica's new gallery no longer holds it as it was); returns how many were dropped."""
        with self._lock:
            held = [(gid, entry[0]) for gid, entry in self._entries.items()]
        gone = [gid for gid, fingerprint in held if not keep(gid, fingerprint)]
        self.discard(gone)
        return len(gone)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._extras.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.capacity, len(self._entries), self._bytes, self._hits,
                              self._misses, self._stale, self._evictions)

    def features(self, keys: Sequence[tuple[int, Fingerprint]],
                 compute: Callable[[list[int]], FaceFeatures]) -> FaceFeatures:
        """Features of the faces ``keys`` = [(gallery_id, fingerprint)], in order.

        Misses are computed together by ``compute(positions)`` (positions into
        ``keys``; returns FaceFeatures of those faces in that order) and cached.
        """
        found: list[FaceFeatures | None] = [self.get(gid, fp) for gid, fp in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            fresh = compute(missing)
            for j, i in enumerate(missing):
                one = fresh.select(j)
                self.put(keys[i][0], keys[i][1], one)
                found[i] = one
        return FaceFeatures.concat([f for f in found if f is not None])

    def extra(self, gallery_id: int, fingerprint: Fingerprint, name: str) -> Any:
        """What was stored under ``name`` for a cached face with this fingerprint, or None."""
        with self._lock:
            entry = self._entries.get(gallery_id)
            if entry is None or entry[0] != fingerprint:
                return None
            found = self._extras.get(gallery_id, {}).get(name)
            return None if found is None else found[0]

    def put_extra(self, gallery_id: int, fingerprint: Fingerprint, name: str,
                  value: Sequence[torch.Tensor]) -> None:
        """Keep tensors derived from a cached face's crop beside its features; dropped with
        them (deletion, replacement, eviction, ``retain``). Ignored when the face is not
        cached as ``fingerprint``."""
        owned = tuple(t.detach().clone() for t in value)
        size = sum(t.numel() * t.element_size() for t in owned)
        with self._lock:
            entry = self._entries.get(gallery_id)
            if entry is None or entry[0] != fingerprint:
                return
            extras = self._extras.setdefault(gallery_id, {})
            if name in extras:
                self._bytes -= extras[name][1]
            extras[name] = (owned, size)
            self._bytes += size

    def _drop(self, gallery_id: int) -> None:
        _, _, size = self._entries.pop(gallery_id)
        self._bytes -= size
        for _, extra_size in self._extras.pop(gallery_id, {}).values():
            self._bytes -= extra_size
