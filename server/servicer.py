"""The gRPC servicers: validate, convert to library values, call the backend, convert back.

No business logic lives here (the library calls are ``server.backend``; Explain's match,
explain and present sequence is ``server.application.explain_query``), and no status codes:
errors are raised and mapped to statuses in ``server.interceptor`` through
``server.errors``. Heavy work holds a slot of the ``HeavyWorkLimiter``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import grpc
from phenolens._proto import gallery_pb2, gallery_pb2_grpc, phenolens_pb2, phenolens_pb2_grpc
from phenolens.arrays import to_float_array

from encoder.image import decode_image
from explain.attribution.catalogue import METHOD_NAMES, check_methods
from gallery.png import encode_png
from server import convert
from server.application import ExplainAsk, ExplainedQuery, explain_query
from server.backend import Backend, Query
from server.config import ServiceConfig
from server.errors import BadRequest, NotFound
from server.limits import HeavyWorkLimiter, RequestScope

API_VERSION = "phenolens.v1"
SERVER_VERSION = "0.1.0"
FEATURES = ("encode", "match", "explain", "explain-stream", "gallery-admin", "health",
            "reflection")


class Limits:
    """Request validation against the configured limits."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config.limits

    def top_k(self, value: int, default: int, what: str = "top_k") -> int:
        value = value or default
        if value > self.config.max_top_k:
            raise BadRequest(f"{what} {value} is above the server's limit of "
                             f"{self.config.max_top_k}")
        return value


class PhenoLensServicer(phenolens_pb2_grpc.PhenoLensServicer):
    def __init__(self, backend: Backend, limiter: HeavyWorkLimiter,
                 config: ServiceConfig) -> None:
        self.backend = backend
        self.limiter = limiter
        self.config = config
        self.limits = Limits(config)
        self.features: tuple[str, ...] = FEATURES

    # -- helpers -------------------------------------------------------------------------
    def _query(self, request: phenolens_pb2.MatchRequest, scope: RequestScope
               ) -> tuple[Query, bool]:
        which = request.WhichOneof("query")
        if which == "embedding":
            vectors, scheme = convert.embedding_input(request.embedding)
            return self.backend.query_of_embedding(vectors, scheme), False
        if which != "image":
            raise BadRequest("MatchRequest needs an image or an embedding")
        image, aligned = convert.image_input(request.image,
                                             self.config.limits.max_image_pixels)
        return self.backend.query_of_image(image, aligned=aligned, scope=scope), not aligned

    def _ranking(self, request: phenolens_pb2.MatchRequest, default_k: int) -> dict[str, Any]:
        """The match's list lengths (within the limits) and filters."""
        return {"top_k": self.limits.top_k(request.top_k, default_k),
                "top_syndromes": self.limits.top_k(request.top_syndromes, 10, "top_syndromes"),
                "top_genes": self.limits.top_k(request.top_genes, 10, "top_genes"),
                "filters": convert.filters(request.filters)}

    def _methods(self, request: phenolens_pb2.ExplainRequest) -> tuple[str, ...]:
        methods = tuple(dict.fromkeys(request.methods)) or self.backend.config.explain.methods
        if len(methods) > self.config.limits.max_explain_methods:
            raise BadRequest(f"{len(methods)} methods asked for; the limit is "
                             f"{self.config.limits.max_explain_methods}")
        return check_methods(methods)

    def _gallery_ids(self, request: phenolens_pb2.ExplainRequest) -> tuple[int, ...]:
        if len(request.gallery_ids) > self.config.limits.max_top_k:
            raise BadRequest("too many gallery_ids")
        return tuple(convert.gallery_id(g) for g in request.gallery_ids)

    def _explained(self, request: phenolens_pb2.ExplainRequest, scope: RequestScope
                   ) -> tuple[ExplainedQuery, bool]:
        """The explanation (its hits computed as they are read) and whether a face was
        detected."""
        methods = self._methods(request)
        options = {name: dict(o.values) for name, o in request.method_options.items()}
        if request.match.WhichOneof("query") != "image":
            raise BadRequest("Explain needs a query image")
        query, detected = self._query(request.match, scope)
        ask = ExplainAsk(
            methods, options, **self._ranking(request.match, 3),
            gallery_ids=self._gallery_ids(request), effects=request.effects,
            presentation=convert.presentation(request))
        return explain_query(self.backend, query, ask, scope), detected

    # -- RPCs ----------------------------------------------------------------------------
    def GetServerInfo(self, request: phenolens_pb2.ServerInfoRequest,
                      context: grpc.ServicerContext) -> phenolens_pb2.ServerInfo:
        b = self.backend
        limits = self.config.limits
        return phenolens_pb2.ServerInfo(
            server_version=SERVER_VERSION, api_version=API_VERSION, encoder_id=b.encoder_id,
            encoders=[phenolens_pb2.EncoderInfo(
                name=e.spec.name, version=str(e.spec.version),
                embedding_dim=e.spec.embedding_dim, input_height=e.spec.input_size[0],
                input_width=e.spec.input_size[1], alignment=e.spec.alignment)
                for e in b.encoders],
            view_scheme=b.view_scheme, gallery_version=b.gallery.version,
            gallery_size=len(b.gallery),
            limits=phenolens_pb2.Limits(
                max_message_bytes=limits.max_message_bytes,
                max_image_bytes=limits.max_image_bytes, max_image_pixels=limits.max_image_pixels,
                max_top_k=limits.max_top_k, max_concurrent_heavy_calls=limits.max_concurrent,
                max_explain_methods=limits.max_explain_methods,
                explain_time_limit_s=b.config.explain.time_limit_s,
                max_page_size=limits.max_page_size,
                max_photo_map_side=limits.max_photo_map_side,
                max_explain_budget=b.config.explain.budget),
            explain_methods=list(METHOD_NAMES), default_explain_methods=list(b.config.explain.methods),
            features=list(self.features),
        )

    def Encode(self, request: phenolens_pb2.EncodeRequest, context: grpc.ServicerContext
               ) -> phenolens_pb2.EncodeResponse:
        scope = RequestScope.of(context)
        image, aligned = convert.image_input(request.image,
                                             self.config.limits.max_image_pixels)
        with self.limiter.slot():
            face = self.backend.face(image, aligned=aligned, scope=scope)
            query = self.backend.query_of_face(face, scope)
        return phenolens_pb2.EncodeResponse(
            encoder_id=self.backend.encoder_id, view_scheme=self.backend.view_scheme,
            embedding=to_float_array(query.views),
            alignment=convert.alignment(face, detected=not aligned),
            aligned_crop_png=encode_png(face.crop) if request.return_aligned_crop else b"",
        )

    def Match(self, request: phenolens_pb2.MatchRequest, context: grpc.ServicerContext
              ) -> phenolens_pb2.MatchResponse:
        scope = RequestScope.of(context)
        with self.limiter.slot():
            query, detected = self._query(request, scope)
            outcome = self.backend.match(query, **self._ranking(request, 10), scope=scope)
        b = self.backend
        return convert.match_response(outcome, b.encoder_id, b.view_scheme, detected=detected)

    def Explain(self, request: phenolens_pb2.ExplainRequest, context: grpc.ServicerContext
                ) -> phenolens_pb2.ExplainResponse:
        scope = RequestScope.of(context)
        b = self.backend
        with self.limiter.slot():
            result, detected = self._explained(request, scope)
            return convert.explain_result(result, b.encoder_id, b.view_scheme,
                                          detected=detected)

    def ExplainStream(self, request: phenolens_pb2.ExplainRequest,
                      context: grpc.ServicerContext) -> Iterator[phenolens_pb2.ExplainEvent]:
        scope = RequestScope.of(context)
        b = self.backend
        with self.limiter.slot():
            result, detected = self._explained(request, scope)
            yield from convert.explain_events(result, b.encoder_id, b.view_scheme,
                                              detected=detected)


class GalleryAdminServicer(gallery_pb2_grpc.GalleryAdminServicer):
    def __init__(self, backend: Backend, limiter: HeavyWorkLimiter,
                 config: ServiceConfig) -> None:
        self.backend = backend
        self.limiter = limiter
        self.config = config

    def AddImage(self, request: gallery_pb2.AddImageRequest, context: grpc.ServicerContext
                 ) -> gallery_pb2.AddImageResponse:
        scope = RequestScope.of(context)
        image, aligned = convert.image_input(request.image,
                                             self.config.limits.max_image_pixels)
        index = request.face_index if request.HasField("face_index") else None
        with self.limiter.slot():
            face = self.backend.face(image, aligned=aligned, scope=scope, index=index)
            item = self.backend.entry_with_features(face, convert.record_fields(request.record),
                                                    scope, picked=index is not None)
        scope.check()
        info = self.backend.add_image(item)
        return gallery_pb2.AddImageResponse(record=convert.record_info(info),
                                            gallery_version=self.backend.gallery.version,
                                            alignment=convert.alignment(face,
                                                                        detected=not aligned))

    def ImportGallery(self, request_iterator: Iterator[gallery_pb2.ImportRecord],
                      context: grpc.ServicerContext) -> gallery_pb2.ImportSummary:
        scope = RequestScope.of(context)
        b = self.backend
        received = 0

        def items() -> Iterator[tuple[Any, Any]]:
            nonlocal received
            for item in request_iterator:
                scope.check()
                received += 1
                yield self._import_item(item, received, scope)

        with self.limiter.slot():
            added, unchanged = b.import_images(items())
        return gallery_pb2.ImportSummary(received=received, added=added, unchanged=unchanged,
                                         gallery_version=b.gallery.version)

    def _import_item(self, item: gallery_pb2.ImportRecord, number: int, scope: RequestScope
                     ) -> tuple[Any, Any]:
        """One import record -> (gallery Entry, its face's features or None)."""
        b = self.backend
        fields = convert.record_fields(item.record)
        if item.WhichOneof("content") == "image":
            image, aligned = convert.image_input(item.image, self.config.limits.max_image_pixels)
            return b.entry_with_features(b.face(image, aligned=aligned, scope=scope), fields,
                                         scope)
        if item.WhichOneof("content") == "precomputed":
            vectors, scheme = convert.embedding_input(item.precomputed.embedding)
            crop = item.precomputed.aligned_crop_png
            if crop:
                decode_image(crop)  # refuse a corrupt crop before it is stored
            return b.entry_of(vectors, crop, fields, scheme), None
        raise BadRequest(f"import record {number} has neither image nor precomputed embedding")

    def DeleteImages(self, request: gallery_pb2.DeleteImagesRequest,
                     context: grpc.ServicerContext) -> gallery_pb2.DeleteImagesResponse:
        gallery_ids = []
        for value in request.gallery_ids:
            try:
                gallery_ids.append(convert.gallery_id(value))
            except NotFound:
                if not request.missing_ok:
                    raise
        deleted = self.backend.delete_images(gallery_ids, list(request.image_ids),
                                             missing_ok=request.missing_ok)
        return gallery_pb2.DeleteImagesResponse(deleted=deleted,
                                                gallery_version=self.backend.gallery.version)

    def GetImage(self, request: gallery_pb2.GetImageRequest, context: grpc.ServicerContext
                 ) -> gallery_pb2.GalleryImage:
        record = self.backend.gallery.get(convert.gallery_id(request.gallery_id))
        response = gallery_pb2.GalleryImage(record=convert.record_info(record.info))
        if request.include_crop and record.crop_png:
            response.aligned_crop_png = record.crop_png
        if request.include_embedding:
            import numpy as np

            response.embedding.CopyFrom(to_float_array(np.stack(record.views)))
        return response

    def ListImages(self, request: gallery_pb2.ListImagesRequest, context: grpc.ServicerContext
                   ) -> gallery_pb2.ListImagesResponse:
        limits = self.config.limits
        size = request.page_size or 100
        if size > limits.max_page_size:
            raise BadRequest(f"page_size {size} is above the limit of {limits.max_page_size}")
        offset = _decode_page_token(request.page_token)
        infos, total = self.backend.list_images(limit=size + 1, offset=offset,
                                                syndrome_id=request.syndrome_id or None,
                                                subject_id=request.subject_id or None)
        more = len(infos) > size
        return gallery_pb2.ListImagesResponse(
            records=[convert.record_info(i) for i in infos[:size]],
            next_page_token=_encode_page_token(offset + size) if more else "",
            total=total)

    def GalleryStats(self, request: gallery_pb2.GalleryStatsRequest,
                     context: grpc.ServicerContext) -> gallery_pb2.GalleryStatsResponse:
        return convert.stats_response(self.backend.gallery.stats())


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode()


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        offset = int(json.loads(base64.urlsafe_b64decode(token.encode()))["o"])
    except (ValueError, KeyError, TypeError):
        raise BadRequest("page_token is not one this server issued") from None
    if offset < 0:
        raise BadRequest("page_token is not one this server issued")
    return offset

