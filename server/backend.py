"""What the service does, without protobuf: the library calls behind each RPC.

The servicer converts messages to the arguments below and the results back;
this module composes the face pipeline, the encoder views, the gallery and the
explain engine, and owns the request-scoped cancellation of explanations.
Heavy entry points run under the caller's ``RequestScope`` so an abandoned
call stops computing (the explain engine polls ``scope.cancelled``).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encoder.pipeline import Face, FacePipeline
from explain.errors import Cancelled as ExplainCancelled
from gallery import Entry, Gallery, GeneHit, Hit, SchemeMismatch, SyndromeHit
from server.config import ServiceConfig
from server.errors import BadRequest, SeveralFaces
from server.feature_cache import FeatureCache, Fingerprint
from server.limits import RequestScope

log = logging.getLogger("phenolens.server")

ENGINE_METHODS = ("similarity", "gradcam")  # batched for all hits by explain.engine


def png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_pixels(data: bytes) -> np.ndarray:
    """PNG (or any image) bytes of a stored aligned crop -> (H, W, 3) uint8."""
    from encoder.image import decode_image

    return decode_image(data)


@dataclass(frozen=True)
class SearchFilters:
    exclude_subjects: tuple[str, ...] = ()
    same_patient_distance: float | None = None  # None: rule off
    syndromes: tuple[str, ...] | None = None  # None: all syndromes


@dataclass(frozen=True, eq=False)
class Query:
    """A query face: its per-view unit embeddings (V, D) and, when it came as an image,
    the aligned face and the explain engine's features of it (reused by Explain)."""

    views: np.ndarray
    face: Face | None = None
    features: Any = None  # explain.engine.FaceFeatures of the crop


@dataclass(frozen=True, eq=False)
class MatchOutcome:
    query: Query
    hits: tuple[Hit, ...]
    syndromes: tuple[SyndromeHit, ...]
    genes: tuple[GeneHit, ...]
    gallery_version: int


@dataclass(frozen=True, eq=False)
class MethodMaps:
    """One method's maps of one pair. aligned (H, W) crop maps; feature (h, w) or None;
    query_photo (H', W') over the (possibly downscaled) photo, or None."""

    method: str
    query_aligned: np.ndarray
    gallery_aligned: np.ndarray
    query_feature: np.ndarray | None = None
    gallery_feature: np.ndarray | None = None
    query_photo: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class HitExplanation:
    index: int
    hit: Hit
    maps: tuple[MethodMaps, ...]
    residual: float
    bias_share: float
    gallery_crop: np.ndarray  # (H, W, 3) uint8
    gallery_crop_png: bytes  # as stored in the gallery


@dataclass
class ExplainActivity:
    """Counts of explanation computations, so operators and tests can see work end."""

    active: int = 0
    started: int = 0
    completed: int = 0
    stopped: int = 0  # ended early: cancelled, past the deadline, or failed
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

    def wait_idle(self, timeout: float) -> bool:
        """True once no explanation is running (False after ``timeout`` seconds)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.active == 0, timeout)


def _downscale(photo_map: np.ndarray, max_side: int) -> np.ndarray:
    h, w = photo_map.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return photo_map
    import cv2

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(photo_map, size, interpolation=cv2.INTER_AREA)


class Backend:
    """The service's library calls. Thread-safe (the parts it composes are).

    pipeline: FacePipeline; views: a view source (``encoder.views.Ensemble``);
    gallery: an open Gallery; explainer: ``explain.engine.Explainer`` over ``views``.
    ``feature_cache`` holds the explainer's features of recently explained gallery
    faces (``explain.feature_cache_size`` faces; None when that is 0).
    """

    def __init__(self, config: ServiceConfig, *, pipeline: FacePipeline, views: Any,
                 gallery: Gallery, explainer: Any, encoder_id: str, view_scheme: str,
                 encoders: Sequence[Any] = ()) -> None:
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

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ServiceConfig) -> Backend:
        """Build everything the configuration names: torch runtime, encoders, gallery."""
        from encoder import views as ev
        from encoder.registry import shared_encoder
        from encoder.runtime import configure_torch
        from explain.engine import Explainer

        runtime = configure_torch(config.runtime.device, config.runtime.torch_threads)
        enc = config.encoder
        scheme = ev.ViewScheme.parse(enc.scheme_id())
        names = list(dict.fromkeys(v.encoder for v in scheme.views))
        weights = {enc.name: enc.weights} if enc.weights else {}
        encoders = {n: shared_encoder(n, weights.get(n), str(runtime.device)) for n in names}
        ensemble = ev.Ensemble(encoders, scheme)
        encoder_id = "+".join(f"{e.spec.name}@{e.spec.version}" for e in encoders.values())
        limits = config.limits
        pipeline = FacePipeline(template=next(iter(encoders.values())).spec.alignment,
                                max_pixels=limits.max_image_pixels,
                                max_bytes=limits.max_image_bytes)
        gallery = Gallery.open(config.gallery.path, encoder_id=encoder_id,
                               view_scheme=scheme.id,
                               **({"index": config.gallery.index} if config.gallery.index else {}))
        return cls(config, pipeline=pipeline, views=ensemble, gallery=gallery,
                   explainer=Explainer(ensemble), encoder_id=encoder_id, view_scheme=scheme.id,
                   encoders=tuple(encoders.values()))

    def warm_up(self) -> None:
        """Build the detector and run one forward pass so the first call is not slow."""
        self.pipeline.detector  # noqa: B018
        h, w = self.encoders[0].spec.input_size if self.encoders else (112, 112)
        self.explainer.encode(np.zeros((1, h, w, 3), np.uint8))

    def close(self) -> None:
        self.gallery.close()

    # -- faces and embeddings ----------------------------------------------------------
    def face(self, image: bytes | np.ndarray, *, aligned: bool, scope: RequestScope) -> Face:
        scope.check()
        return self.pipeline.face(image, aligned=aligned)

    def query_of_face(self, face: Face, scope: RequestScope) -> Query:
        scope.check()
        features = self.explainer.encode(face.crop, cancel=scope.cancelled)
        return Query(_unit_views(features.embeddings), face, features)

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
              filters: SearchFilters, scope: RequestScope) -> MatchOutcome:
        scope.check()
        kwargs = dict(exclude_subjects=filters.exclude_subjects,
                      same_patient_distance=filters.same_patient_distance,
                      syndromes=filters.syndromes, view_scheme=self.view_scheme)
        version = self.gallery.version
        hits = self.gallery.search(query.views, top_k, **kwargs)
        syndromes = self.gallery.rank_syndromes(query.views, top_syndromes, **kwargs) \
            if top_syndromes else []
        genes = self.gallery.rank_genes(query.views, top_genes, **kwargs) if top_genes else []
        return MatchOutcome(query, tuple(hits), tuple(syndromes), tuple(genes), version)

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
                feature_maps: bool, scope: RequestScope) -> Iterator[HitExplanation]:
        """Per hit, in order, maps of every method on both faces, each yielded once ready.

        The engine methods (similarity, gradcam) for all hits come from one batched
        call; every other method runs per pair with the configured budget and a time
        limit that ends at the caller's deadline. Raises explain's Cancelled or
        TimeLimitExceeded when the call is abandoned.
        """
        if query.face is None:
            raise BadRequest("Explain needs a query image, not an embedding")
        if not hits:
            return
        self.activity.begin()
        completed = False
        try:
            pngs = [self._gallery_crop_png(h.gallery_id) for h in hits]
            crops = np.stack([png_pixels(png) for png in pngs])
            scope.check()
            pairs = self.explainer.explain(query.features,
                                           self._hit_features(hits, pngs, crops, scope),
                                           cancel=scope.cancelled)
            for index, (hit, pair) in enumerate(zip(hits, pairs, strict=True)):
                maps = []
                for method in methods:
                    scope.check()
                    maps.append(self._method_maps(method, pair, query, crops[index],
                                                  options.get(method, {}), photo_maps,
                                                  feature_maps, scope))
                yield HitExplanation(index, hit, tuple(maps), pair.query.residual,
                                     pair.query.bias_share, crops[index], pngs[index])
            completed = True
        except ExplainCancelled:
            scope.check()  # past the caller's deadline: say so (DEADLINE_EXCEEDED)
            raise
        finally:
            self.activity.end(completed)

    def _hit_features(self, hits: Sequence[Hit], pngs: Sequence[bytes], crops: np.ndarray,
                      scope: RequestScope) -> Any:
        """The hits' FaceFeatures, from the cache where their stored crop is unchanged;
        without a cache the (K, H, W, 3) crops themselves (the engine encodes them)."""
        if self.feature_cache is None:
            return crops
        keys = [(h.gallery_id, Fingerprint.of(png, self.encoder_id, self.view_scheme))
                for h, png in zip(hits, pngs, strict=True)]
        return self.feature_cache.features(
            keys, lambda missing: self.explainer.encode(crops[missing], cancel=scope.cancelled))

    def _gallery_crop_png(self, gallery_id: int) -> bytes:
        record = self.gallery.get(gallery_id)
        if not record.crop_png:
            raise BadRequest("a gallery image has no stored aligned crop to explain against")
        return record.crop_png

    def _method_maps(self, method: str, pair: Any, query: Query, gallery_crop: np.ndarray,
                     options: Mapping[str, float], photo_maps: bool, feature_maps: bool,
                     scope: RequestScope) -> MethodMaps:
        if method in ENGINE_METHODS and not options:
            q, g = pair.query, pair.gallery
            name = "similarity" if method == "similarity" else "gradcam"
            qa, ga = getattr(q, f"{name}_aligned"), getattr(g, f"{name}_aligned")
            qf, gf = (getattr(q, name), getattr(g, name)) if feature_maps else (None, None)
        else:
            from explain.methods import METHODS, attribute

            impl = METHODS.get(method)
            typed = {k: (int(v) if impl is not None and isinstance(impl.defaults.get(k), int)
                         and not isinstance(impl.defaults.get(k), bool) else v)
                     for k, v in options.items()}
            remaining = scope.remaining()
            limit = self.config.explain.time_limit_s
            if remaining is not None:
                limit = max(0.0, min(limit, remaining))
            result = attribute(method, self.explainer, query.face.crop, gallery_crop,
                               budget=self.config.explain.budget, time_limit=limit,
                               cancel=scope.cancelled, **typed)
            qa, ga = result.query_aligned, result.gallery_aligned
            feature = result.resolution == "feature" and feature_maps
            qf, gf = (result.query, result.gallery) if feature else (None, None)
        photo = None
        if photo_maps and query.face.alignment is not None:
            from encoder.align import warp_to_photo

            photo = _downscale(warp_to_photo(qa, query.face.alignment),
                               self.config.limits.max_photo_map_side)
        return MethodMaps(method, np.asarray(qa, np.float32), np.asarray(ga, np.float32),
                          qf, gf, photo)

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
        return deleted

    def entry(self, face: Face, record: Mapping[str, Any], scope: RequestScope) -> Entry:
        """A gallery Entry for an aligned face and its labels (embeds the crop); a photo
        with several faces is refused (SeveralFaces), never silently reduced to one."""
        if face.face_count > 1:
            raise SeveralFaces(f"the photo shows {face.face_count} faces; a gallery image "
                               "needs exactly one: crop it to one face or send its aligned crop")
        query = self.query_of_face(face, scope)
        return self.entry_of(query.views, png_bytes(face.crop), record, self.view_scheme)

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


def _unit_views(embeddings: Sequence[Any]) -> np.ndarray:
    """Per-view (1, D) torch embeddings -> (V, D) float32, L2-normalised per view."""
    rows = [np.asarray(e.detach().cpu().numpy(), np.float32).reshape(-1) for e in embeddings]
    arr = np.stack(rows)
    return arr / np.linalg.norm(arr, axis=1, keepdims=True)
