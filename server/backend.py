"""What the service does, without protobuf: the library calls behind each RPC.

The servicer converts messages to the arguments below and the results back;
this module composes the face pipeline, the encoder views, the gallery and the
explain engine, and owns the request-scoped cancellation of explanations.
Heavy entry points run under the caller's ``RequestScope`` so an abandoned
call stops computing (the explain engine polls ``scope.cancelled``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from encoder.image import decode_image
from encoder.pipeline import Face, FacePipeline
from explain.attribution.engine import FaceFeatures
from explain.errors import Cancelled as ExplainCancelled
from gallery import (
    Entry,
    Gallery,
    GeneHit,
    Hit,
    RecordInfo,
    SchemeMismatch,
    SearchFilter,
    SyndromeHit,
)
from gallery.calibration import Calibration, CalibrationCache, Confidence
from gallery.features import FeatureStore
from gallery.png import encode_png
from gallery.records import AddReport
from server.config import ServiceConfig
from server.errors import BadRequest, SeveralFaces
from server.feature_cache import (
    FeatureCache,
    Fingerprint,
    from_stored,
    stored_edits,
    stored_scheme,
    to_stored,
)
from server.limits import RequestScope

if TYPE_CHECKING:
    from explain.attribution.matches import MatchMaps

log = logging.getLogger("phenolens.server")

@dataclass(frozen=True, eq=False)
class Query:
    """A query face: its per-view unit embeddings (V, D) and, when it came as an image,
    the aligned face, the explain engine's features of it (reused by Explain) and the
    decoded photo (H, W, 3) uint8 (decoded once per request; photo overlays reuse it)."""

    views: np.ndarray
    face: Face | None = None
    features: Any = None  # explain.attribution.engine.FaceFeatures of the crop
    photo: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class MatchOutcome:
    """A query's ranked gallery images, syndromes and genes, each with its calibrated
    confidence (``gallery.calibration``, of the gallery version matched against; None
    without a calibration), in the same order."""

    query: Query
    hits: tuple[Hit, ...]
    syndromes: tuple[SyndromeHit, ...]
    genes: tuple[GeneHit, ...]
    gallery_version: int
    calibration: Calibration | None = None
    hit_confidences: tuple[Confidence | None, ...] = ()
    syndrome_confidences: tuple[Confidence | None, ...] = ()
    gene_confidences: tuple[Confidence | None, ...] = ()

    @classmethod
    def ranked(cls, query: Query, hits: Sequence[Hit], syndromes: Sequence[SyndromeHit],
               genes: Sequence[GeneHit], gallery_version: int,
               calibration: Calibration | None) -> MatchOutcome:
        """The outcome with every ranked item's confidence read off ``calibration``."""
        c = calibration
        return cls(query, tuple(hits), tuple(syndromes), tuple(genes), gallery_version, c,
                   _hit_confidences(c, hits),
                   tuple(None if c is None else c.syndrome_confidence(s.syndrome_id, s.score)
                         for s in syndromes),
                   tuple(None if c is None else c.gene_confidence(g.gene, g.score)
                         for g in genes))

    def with_hits(self, hits: Sequence[Hit]) -> MatchOutcome:
        """The same match with other hits (e.g. chosen gallery images) and their confidences."""
        return replace(self, hits=tuple(hits),
                       hit_confidences=_hit_confidences(self.calibration, hits))


def _hit_confidences(calibration: Calibration | None, hits: Sequence[Hit]
                     ) -> tuple[Confidence | None, ...]:
    return tuple(None if calibration is None else
                 calibration.hit_confidence(h.syndrome_id, h.score) for h in hits)


@dataclass(frozen=True, eq=False)
class HitExplanation:
    """One explained hit: ``maps``, ``explain_matches``'s MatchMaps of the pair (its index
    among the explained hits, cosine, residuals, every method's maps on both faces, region
    effects), and per method the query map on its photo (H', W') float32, or None."""

    hit: Hit
    maps: MatchMaps
    photo_maps: tuple[np.ndarray | None, ...]
    gallery_crop: np.ndarray  # (H, W, 3) uint8
    gallery_crop_png: bytes  # as stored in the gallery

    @property
    def index(self) -> int:
        return self.maps.index


@dataclass
class ExplainActivity:
    """Counts of explanation computations, so operators and tests can see work end."""

    active: int = 0
    started: int = 0
    completed: int = 0
    stopped: int = 0  # ended early: cancelled, past the deadline, or failed
    hit_encodes: int = 0  # hit faces encoded because neither the cache nor the store held them
    store_reads: int = 0  # hit faces whose features came from the feature store
    _lock: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def begin(self) -> None:
        with self._lock:
            self.active += 1
            self.started += 1

    def end(self, completed: bool) -> None:
        with self._lock:
            self.active -= 1
            if completed:
                self.completed += 1
            else:
                self.stopped += 1
            self._lock.notify_all()

    def count(self, *, encoded: int = 0, from_store: int = 0) -> None:
        with self._lock:
            self.hit_encodes += encoded
            self.store_reads += from_store

    def wait_idle(self, timeout: float) -> bool:
        """True once no explanation is running (False after ``timeout`` seconds)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.active == 0, timeout)


@dataclass(frozen=True, eq=False)
class PhotoWarp:
    """Where each pixel of a query's photo map comes from on the aligned crop: built once
    per request (``of``), then applied to every map of every hit (``__call__``).

    The photo map is drawn at the size the wire carries (the photo downscaled so that its
    longer side is at most ``max_side``), only inside the face's box: each output pixel
    centre goes through ``photo_to_crop`` and the map is sampled bilinearly there, zero
    beyond the crop's edge (``encoder.align.warp_to_photo``'s constant border). That
    replaces a full-resolution warp plus a resize per map with one small remap per map.
    """

    shape: tuple[int, int]  # (H', W') of the photo map
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 of the face in the photo map
    crop_size: tuple[int, int]
    map_x: np.ndarray = field(repr=False)  # fixed-point remap tables of the box
    map_y: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, alignment: Any, max_side: int) -> PhotoWarp:
        """For an ``encoder.align.Alignment`` and the wire's longer-side limit."""
        import cv2

        ph, pw = alignment.photo_size
        scale = max_side / max(ph, pw)
        oh, ow = (max(1, round(ph * scale)), max(1, round(pw * scale))) if scale < 1 else (ph, pw)
        sx, sy = ow / pw, oh / ph
        x1, y1, x2, y2 = alignment.face_box_photo
        bx1, bx2 = max(int(np.floor(x1 * sx)) - 1, 0), min(int(np.ceil(x2 * sx)) + 2, ow)
        by1, by2 = max(int(np.floor(y1 * sy)) - 1, 0), min(int(np.ceil(y2 * sy)) + 2, oh)
        bx2, by2 = max(bx2, bx1), max(by2, by1)
        xp = (np.arange(bx1, bx2) + 0.5) / sx - 0.5  # output pixel centres in photo pixels
        yp = (np.arange(by1, by2) + 0.5) / sy - 0.5
        a = np.asarray(alignment.photo_to_crop, np.float64)
        u = (a[0, 0] * xp[None, :] + a[0, 1] * yp[:, None] + a[0, 2]).astype(np.float32)
        v = (a[1, 0] * xp[None, :] + a[1, 1] * yp[:, None] + a[1, 2]).astype(np.float32)
        map_x, map_y = (cv2.convertMaps(u, v, cv2.CV_16SC2) if u.size
                        else (np.zeros((0, 0, 2), np.int16), np.zeros((0, 0), np.uint16)))
        return cls((oh, ow), (bx1, by1, bx2, by2), alignment.crop_size, map_x, map_y)

    def __call__(self, aligned: np.ndarray) -> np.ndarray:
        """(M, h, w) maps on the crop (any resolution: resized bilinearly to the crop first)
        -> (M, H', W') float32 photo maps, 0 outside the face."""
        import cv2

        maps = np.asarray(aligned, np.float32)
        if maps.ndim != 3 or not np.isfinite(maps).all():
            raise ValueError(f"aligned maps must be finite (M, h, w), got shape {maps.shape}")
        out = np.zeros((len(maps), *self.shape), np.float32)
        x1, y1, x2, y2 = self.box
        if x2 <= x1 or y2 <= y1:
            return out
        ch, cw = self.crop_size
        for m, target in zip(maps, out, strict=True):
            if m.shape != (ch, cw):
                m = cv2.resize(m, (cw, ch), interpolation=cv2.INTER_LINEAR)
            target[y1:y2, x1:x2] = cv2.remap(m, self.map_x, self.map_y, cv2.INTER_LINEAR,
                                             borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        return out


class Backend:
    """The service's library calls. Thread-safe (the parts it composes are).

    pipeline: FacePipeline; views: a view source (``encoder.views.Ensemble``);
    gallery: an open Gallery; explainer: ``explain.attribution.engine.Explainer`` over ``views``.
    ``feature_cache`` holds the explainer's features of recently explained gallery
    faces (``explain.feature_cache_size`` faces; None when that is 0);
    ``feature_store`` the features of every gallery face on disk beside the gallery
    (``gallery.features``; filled as images are added, refilled lazily by Explain),
    or None (then only the cache and encoding).
    """

    def __init__(self, config: ServiceConfig, *, pipeline: FacePipeline, views: Any,
                 gallery: Gallery, explainer: Any, encoder_id: str, view_scheme: str,
                 encoders: Sequence[Any] = (), feature_store: FeatureStore | None = None) -> None:
        self.config = config
        self.pipeline = pipeline
        self.views = views
        self.gallery = gallery
        self.explainer = explainer
        self.encoder_id = encoder_id
        self.view_scheme = view_scheme
        self.encoders = tuple(encoders)
        self.activity = ExplainActivity()
        size = config.explain.feature_cache_size
        self.feature_cache: FeatureCache | None = FeatureCache(size) if size > 0 else None
        self._feature_store = feature_store
        self._store_lock = threading.Lock()
        self.calibrations = CalibrationCache()  # refitted when the gallery version moves

    @property
    def feature_store(self) -> FeatureStore | None:
        """The feature store beside the current gallery: when a replica swaps a snapshot
        in (``server.replica``), the store beside the snapshot's copy is opened, so gallery
        ids are never checked against another gallery's records."""
        store = self._feature_store
        if store is None or store.gallery_path == self.gallery.path:
            return store
        with self._store_lock:
            old = self._feature_store
            if old.gallery_path != self.gallery.path:
                self._feature_store = FeatureStore.open(self.gallery.path, old.encoder_id,
                                                        old.view_scheme)
                old.close()
            return self._feature_store

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ServiceConfig) -> Backend:
        """Build everything the configuration names: torch runtime, encoders, gallery."""
        from encoder import views as ev
        from encoder.runtime import configure_torch
        from explain.attribution.engine import Explainer

        runtime = configure_torch(config.runtime.device, config.runtime.torch_threads)
        enc = config.encoder
        ensemble = ev.configured_ensemble(enc.name, enc.scheme_id(), enc.weights,
                                          str(runtime.device))
        encoders, scheme, encoder_id = ensemble.encoders, ensemble.scheme, ensemble.encoder_id
        limits = config.limits
        pipeline = FacePipeline(enc.detector, template=ensemble.alignment,
                                max_pixels=limits.max_image_pixels,
                                max_bytes=limits.max_image_bytes)
        gallery = Gallery.open(config.gallery.path, encoder_id=encoder_id,
                               view_scheme=scheme.id,
                               **({"index": config.gallery.index} if config.gallery.index else {}))
        store = FeatureStore.open(gallery.path, encoder_id, stored_scheme(scheme.id))
        return cls(config, pipeline=pipeline, views=ensemble, gallery=gallery,
                   explainer=Explainer(ensemble), encoder_id=encoder_id, view_scheme=scheme.id,
                   encoders=tuple(encoders.values()), feature_store=store)

    def warm_up(self) -> None:
        """Build the detector, run one forward pass and one pair of maps (which measures,
        or reads from the data cache, where each map cell is drawn) so the first call is
        not slow."""
        self.pipeline.detector  # noqa: B018
        h, w = self.encoders[0].spec.input_size if self.encoders else (112, 112)
        features = self.explainer.encode(np.zeros((1, h, w, 3), np.uint8))
        from explain.attribution.catalogue import SPECS

        batched = [m for m in self.config.explain.methods if SPECS[m].batched]
        self.explainer.explain(features, features, maps=batched)
        from explain.attribution.matches import warm_up

        warm_up(self.explainer, features)  # every method's first call obeys its deadline too
        self.neutral  # noqa: B018  (region effects' neutral face: read, or made once from the photos)

    def close(self) -> None:
        if self._feature_store is not None:
            self._feature_store.close()
        self.gallery.close()

    # -- faces and embeddings ----------------------------------------------------------
    def face(self, image: bytes | np.ndarray, *, aligned: bool, scope: RequestScope,
             index: int | None = None) -> Face:
        """The most confident face, or with ``index`` the index-th most confident of a
        photo's faces (BadRequest naming the count when there is no such face)."""
        scope.check()
        if index is None or aligned:
            return self.pipeline.face(image, aligned=aligned)
        faces = self.pipeline.faces(image)
        if not 0 <= index < len(faces):
            raise BadRequest(f"face_index {index} does not exist: the photo shows "
                             f"{len(faces)} face(s), numbered 0 to {len(faces) - 1} by "
                             "decreasing confidence")
        return faces[index]

    def query_of_face(self, face: Face, scope: RequestScope,
                      photo: np.ndarray | None = None) -> Query:
        scope.check()
        features = self.explainer.encode(face.crop, cancel=scope.cancelled)
        return Query(_unit_views(features.embeddings), face, features, photo)

    def query_of_image(self, image: bytes | np.ndarray, *, aligned: bool,
                       scope: RequestScope) -> Query:
        """Decode once, find and align the face, encode it; the Query keeps the photo."""
        scope.check()
        photo, face = self.pipeline.photo_face(image, aligned=aligned)
        return self.query_of_face(face, scope, photo)

    def query_of_embedding(self, vectors: np.ndarray, view_scheme: str) -> Query:
        if view_scheme and view_scheme != self.view_scheme:
            raise SchemeMismatch(f"the embedding's view scheme {view_scheme!r} is not the "
                                 f"server's {self.view_scheme!r}")
        if vectors.ndim != 2 or not np.all(np.isfinite(vectors)):
            raise BadRequest(f"an embedding must be a finite (V, D) array, got shape "
                             f"{vectors.shape}")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise BadRequest("an embedding view has zero length")
        return Query((vectors / norms).astype(np.float32))

    # -- matching ----------------------------------------------------------------------
    def match(self, query: Query, *, top_k: int, top_syndromes: int, top_genes: int,
              filters: SearchFilter, scope: RequestScope) -> MatchOutcome:
        scope.check()
        self.gallery.refresh()  # another process may have written the gallery file
        scheme = self.view_scheme
        version = self.gallery.version
        hits = self.gallery.search(query.views, top_k, filters, view_scheme=scheme)
        if top_k > 0 and not hits and len(self.gallery) == 0:
            log.warning("match on an empty gallery: no faces to return (import some first)")
        syndromes = self.gallery.rank_syndromes(query.views, top_syndromes, filters,
                                                view_scheme=scheme) if top_syndromes else []
        genes = self.gallery.rank_genes(query.views, top_genes, filters,
                                        view_scheme=scheme) if top_genes else []
        return MatchOutcome.ranked(query, hits, syndromes, genes, version,
                                   self.calibrations.get(self.gallery))

    def hits_by_id(self, gallery_ids: Sequence[int], query: Query) -> tuple[Hit, ...]:
        """Hits for chosen gallery images, scored against the query (mean per-view cosine)."""
        hits = []
        for gid in gallery_ids:
            record = self.gallery.get(gid)
            info = record.info
            score = float(np.mean([float(np.dot(q, v / np.linalg.norm(v)))
                                   for q, v in zip(query.views, record.views, strict=True)]))
            hits.append(Hit(info.gallery_id, info.image_id, info.subject_id, info.syndrome_id,
                            info.syndrome_name, info.omim_id, info.genes, score))
        return tuple(hits)

    # -- explanations ------------------------------------------------------------------
    def explain(self, query: Query, hits: Sequence[Hit], *, methods: Sequence[str],
                options: Mapping[str, Mapping[str, float]], photo_maps: bool,
                scope: RequestScope, effects: int = 0) -> Iterator[HitExplanation]:
        """Per hit, in order, maps of every method on both faces, each yielded once ready
        (with the query's maps on its photo when ``photo_maps``).

        Through ``explain_matches``: the batched engine maps for all hits in one
        pass, every other method per pair on the same (cached) features, with the
        configured budget and a time limit that ends at the caller's deadline; region
        effects for the first ``effects`` hits, against the bundled photos' mean face.
        Raises explain's Cancelled or TimeLimitExceeded when the call is abandoned.
        """
        from explain.attribution.catalogue import typed_options
        from explain.attribution.matches import explain_matches

        if query.face is None:
            raise BadRequest("Explain needs a query image, not an embedding")
        if not hits:
            return
        self.activity.begin()
        completed = False
        try:
            pngs = [self._gallery_crop_png(h.gallery_id) for h in hits]
            crops = np.stack([decode_image(png) for png in pngs])
            keys = self._cache_keys(hits, pngs)
            store = self.feature_store  # one store for the whole call, read and written
            scope.check()
            limit = self.config.explain.time_limit_s

            def time_left() -> float:
                remaining = scope.remaining()
                return limit if remaining is None else max(0.0, min(limit, remaining))

            matches = explain_matches(
                self.explainer, query.features,
                self._hit_features(keys, crops, query.features, store, scope),
                methods, options={m: typed_options(m, o) for m, o in options.items()},
                budget=self.config.explain.budget, time_limit=time_left, cancel=scope.cancelled,
                effects=effects, neutral=self.neutral if effects else None,
                kept_edits=KeptNeutralEdits(self.feature_cache, store, keys) if effects else None)
            warp = None  # the photo maps' sampling, shared by every map of every hit
            if photo_maps and query.face.alignment is not None:
                warp = PhotoWarp.of(query.face.alignment, self.config.limits.max_photo_map_side)
            for match in matches:
                i = match.index
                photos = (None,) * len(match.maps) if warp is None else tuple(warp(
                    np.stack([np.asarray(m.query_aligned, np.float32) for m in match.maps])))
                yield HitExplanation(hits[i], match, photos, crops[i], pngs[i])
            completed = True
        except ExplainCancelled:
            scope.check()  # past the caller's deadline: say so (DEADLINE_EXCEEDED)
            raise
        finally:
            self.activity.end(completed)

    def _cache_keys(self, hits: Sequence[Any], pngs: Sequence[bytes]
                    ) -> list[tuple[int, Fingerprint]]:
        """(gallery id, Fingerprint of its stored crop and the model) per hit: what the
        feature cache and the hits' kept neutral edits are looked up by."""
        return [(h.gallery_id, Fingerprint.of(png, self.encoder_id, self.view_scheme))
                for h, png in zip(hits, pngs, strict=True)]

    def _neutral_edits(self, features: FaceFeatures) -> list | None:
        """Gallery faces' neutral edits for the feature store (``explain.effects``), or None
        when the configuration leaves them out or the faces carry no crops."""
        if not self.config.explain.store_neutral_edits or features.crops is None:
            return None
        from explain.effects import neutral_edits

        try:
            neutral = self.neutral
        except (OSError, ValueError) as exc:  # no neutral face here: import without the edits
            log.warning("region effects' neutral face unavailable (%s): faces are stored "
                        "without their neutral edits", type(exc).__name__)
            return None
        return neutral_edits(self.explainer, features, neutral=neutral)

    @property
    def neutral(self) -> Any:
        """The neutral face of region effects: the bundled photos' mean aligned face."""
        from explain.effects import bundled_neutral

        return bundled_neutral(self.pipeline)

    def _hit_features(self, keys: Sequence[tuple[int, Fingerprint]], crops: np.ndarray,
                      like: FaceFeatures, store: FeatureStore | None, scope: RequestScope
                      ) -> FaceFeatures:
        """The hits' FaceFeatures (crops included), by their ``_cache_keys``: from the cache
        where their stored crop is unchanged, else from ``store``, else encoded (and written
        to ``store``). ``like``: features of the same explainer (the query's), for encoders
        and flips."""
        ids = [gid for gid, _ in keys]

        def load(positions: list[int]) -> FaceFeatures:
            return self._stored_or_encoded(store, [ids[i] for i in positions],
                                           crops[positions], like, scope)

        if self.feature_cache is None:
            return load(list(range(len(keys))))
        return self.feature_cache.features(keys, load)

    def _stored_or_encoded(self, store: FeatureStore | None, ids: list[int], crops: np.ndarray,
                           like: FaceFeatures, scope: RequestScope) -> FaceFeatures:
        """Features of gallery faces ``ids`` with (N, H, W, 3) ``crops``, in order:
        ``store``'s where it holds them, the rest encoded together and stored there."""
        stored = store.get(ids) if store is not None else None
        parts: dict[int, FaceFeatures] = {}
        if stored is not None and stored.gallery_ids:
            at = {gid: i for i, gid in enumerate(ids)}
            rows = [at[gid] for gid in stored.gallery_ids]
            found = from_stored(stored, like, crops[rows])
            parts.update({i: found.select(j) for j, i in enumerate(rows)})
        missing = [i for i in range(len(ids)) if i not in parts]
        if missing:
            fresh = self.explainer.encode(crops[missing], cancel=scope.cancelled)
            self._store(store, [ids[i] for i in missing], fresh)
            parts.update({i: fresh.select(j) for j, i in enumerate(missing)})
        self.activity.count(encoded=len(missing), from_store=len(ids) - len(missing))
        return FaceFeatures.concat([parts[i] for i in range(len(ids))])

    @staticmethod
    def _store(store: FeatureStore | None, gallery_ids: Sequence[int],
               features: FaceFeatures, edits: Sequence[Any] | None = None) -> None:
        """Write gallery faces' features (and their neutral edits, when made) to ``store``
        (ids no longer in the gallery are skipped by the store; a failing disk only costs
        the next call an encode)."""
        if store is None or not gallery_ids:
            return
        try:
            store.put(list(gallery_ids), *to_stored(features, edits))
        except OSError as exc:
            log.warning("feature store write failed (%s): features will be encoded again",
                        type(exc).__name__)

    def _gallery_crop_png(self, gallery_id: int) -> bytes:
        record = self.gallery.get(gallery_id)
        if not record.crop_png:
            raise BadRequest("a gallery image has no stored aligned crop to explain against")
        return record.crop_png

    # -- gallery writes ----------------------------------------------------------------
    def delete_images(self, gallery_ids: Sequence[int], image_ids: Sequence[str], *,
                      missing_ok: bool) -> int:
        """Deletes by gallery id and by image id; unknown ids raise UnknownId unless
        ``missing_ok``. Deleted faces leave the feature cache too. Returns the count deleted."""
        from gallery import UnknownId

        ids = list(gallery_ids)
        for image_id in image_ids:
            try:
                ids.append(self.gallery.get_image(image_id).info.gallery_id)
            except UnknownId:
                if not missing_ok:
                    raise
        if missing_ok:
            known = []
            for gid in ids:
                try:
                    self.gallery.get(gid)
                    known.append(gid)
                except UnknownId:
                    pass
            ids = known
        deleted = self.gallery.delete(ids) if ids else 0
        if self.feature_cache is not None:
            self.feature_cache.discard(ids)
        store = self.feature_store
        if store is not None and ids:
            try:  # only tidiness: the store drops deleted records' entries by itself
                store.discard(ids)
            except OSError as exc:
                log.warning("feature store discard failed (%s)", type(exc).__name__)
        return deleted

    def add_images(self, items: Sequence[tuple[Entry, FaceFeatures | None]]) -> AddReport:
        """Add entries to the gallery, then their faces' features (from ``entry_with_features``,
        None for precomputed embeddings) to the feature store: the encode that embedded a
        crop is the only one. Replaced records' old features are dropped first."""
        report = self.gallery.add_many([entry for entry, _ in items])
        if self.feature_cache is not None and report.updated:
            self.feature_cache.discard(list(report.updated))
        store = self.feature_store
        if store is not None:
            if report.updated:
                store.discard(list(report.updated))
            with_features = [(e, f) for e, f in items if f is not None]
            if with_features:
                gids = [self.gallery.get_image(e.image_id).info.gallery_id
                        for e, _ in with_features]
                todo = set(store.missing(gids))
                keep = [i for i, g in enumerate(gids) if g in todo]
                if keep:
                    kept = FaceFeatures.concat([with_features[i][1] for i in keep])
                    self._store(store, [gids[i] for i in keep], kept, self._neutral_edits(kept))
        return report

    def add_image(self, item: tuple[Entry, FaceFeatures | None]) -> RecordInfo:
        """``add_images`` of one item; -> the record as stored (added, updated or unchanged)."""
        report = self.add_images([item])
        return self.gallery.get((report.added + report.updated + report.unchanged)[0]).info

    def import_images(self, items: Iterable[tuple[Entry, FaceFeatures | None]], *,
                      batch: int = 64) -> tuple[int, int]:
        """``add_images`` in batches of ``batch`` as ``items`` arrive (a failing item leaves
        the earlier batches added); -> (added or updated, unchanged)."""
        added = unchanged = 0
        pending: list[tuple[Entry, FaceFeatures | None]] = []

        def commit() -> None:
            nonlocal added, unchanged
            if pending:
                report = self.add_images(pending)
                added += len(report.added) + len(report.updated)
                unchanged += len(report.unchanged)
                pending.clear()

        for item in items:
            pending.append(item)
            if len(pending) >= batch:
                commit()
        commit()
        return added, unchanged

    def list_images(self, *, limit: int, offset: int, syndrome_id: str | None = None,
                    subject_id: str | None = None) -> tuple[list[RecordInfo], int]:
        """(up to ``limit`` records from ``offset`` in gallery-id order, how many match in
        all), of a syndrome and/or a subject when given."""
        gallery = self.gallery
        if subject_id is None:
            infos = gallery.list(limit=limit, offset=offset, syndrome_id=syndrome_id)
            stats = gallery.stats()
            return infos, (stats.records if syndrome_id is None else
                           stats.images_per_syndrome.get(syndrome_id, 0))
        everything = [i for i in gallery.list(limit=10**9, syndrome_id=syndrome_id)
                      if i.subject_id == subject_id]
        return everything[offset:offset + limit], len(everything)

    def fill_feature_store(self, batch: int = 32) -> int:
        """Encode and store the features of every gallery face the store lacks (records
        imported without a server, a store rebuilt offline); returns how many were stored."""
        store = self.feature_store
        if store is None:
            return 0
        stored = 0
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            nonlocal stored
            if pending:
                features = self.explainer.encode(np.stack([crop for _, crop in pending]))
                self._store(store, [gid for gid, _ in pending], features,
                            self._neutral_edits(features))
                stored += len(pending)
                pending.clear()

        for record in self.gallery.iter_records(batch=batch):
            gid = record.info.gallery_id
            if record.crop_png and store.missing([gid]):
                pending.append((gid, decode_image(record.crop_png)))
                if len(pending) >= batch:
                    flush()
        flush()
        return stored

    def entry(self, face: Face, record: Mapping[str, Any], scope: RequestScope) -> Entry:
        """A gallery Entry for an aligned face and its labels (embeds the crop); a photo
        with several faces is refused (SeveralFaces), never silently reduced to one."""
        return self.entry_with_features(face, record, scope)[0]

    def entry_with_features(self, face: Face, record: Mapping[str, Any], scope: RequestScope,
                            *, picked: bool = False) -> tuple[Entry, FaceFeatures]:
        """``entry`` and the explainer's features of the face (N = 1) it was embedded from,
        for ``add_images`` to store. ``picked``: the caller chose this face of several."""
        if face.face_count > 1 and not picked:
            raise SeveralFaces(f"the photo shows {face.face_count} faces; a gallery image "
                               "needs exactly one: pick one with face_index (0 = the most "
                               "confident), crop the photo, or send the aligned crop")
        query = self.query_of_face(face, scope)
        entry = self.entry_of(query.views, encode_png(face.crop), record, self.view_scheme)
        return entry, query.features

    def entry_of(self, views: np.ndarray, crop_png: bytes, record: Mapping[str, Any],
                 view_scheme: str) -> Entry:
        if not record.get("image_id"):
            raise BadRequest("a gallery record needs an image_id")
        return Entry(
            image_id=record["image_id"], subject_id=record.get("subject_id", ""),
            syndrome_id=record.get("syndrome_id", ""),
            syndrome_name=record.get("syndrome_name", ""), views=views,
            omim_id=record.get("omim") or None, genes=tuple(record.get("genes", ())),
            source=record.get("source", ""), crop_png=crop_png or None,
            encoder_id=self.encoder_id, view_scheme=view_scheme or self.view_scheme,
        )


@dataclass(frozen=True)
class KeptNeutralEdits:
    """``explain.effects.NeutralEdits`` of the hits ``keys`` (``Backend._cache_keys``): kept
    beside their cached features (and forgotten with them: deletion, replacement, eviction,
    a replica's new snapshot), else read from the feature store, which holds them from
    import (and then cached), else None (the call makes them)."""

    cache: FeatureCache | None
    store: FeatureStore | None
    keys: Sequence[tuple[int, Fingerprint]]
    name: ClassVar[str] = "region-effects/neutral-edits"

    def get(self, index: int) -> Any:
        gid, fingerprint = self.keys[index]
        found = None if self.cache is None else self.cache.extra(gid, fingerprint, self.name)
        if found is None and self.store is not None:
            stored = self.store.get([gid])
            found = stored_edits(stored, 0) if stored.gallery_ids else None
            if found is not None:
                self.put(index, found)
        return found

    def put(self, index: int, embeddings: Sequence[Any]) -> None:
        if self.cache is not None:
            gid, fingerprint = self.keys[index]
            self.cache.put_extra(gid, fingerprint, self.name, embeddings)


def _unit_views(embeddings: Sequence[Any]) -> np.ndarray:
    """Per-view (1, D) torch embeddings -> (V, D) float32, L2-normalised per view."""
    rows = [np.asarray(e.detach().cpu().numpy(), np.float32).reshape(-1) for e in embeddings]
    arr = np.stack(rows)
    return arr / np.linalg.norm(arr, axis=1, keepdims=True)
