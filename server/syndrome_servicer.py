"""The SyndromeService servicer: composites, syndrome-wise maps and fill-in over gRPC.

Thin like ``server.servicer``: it loads the gallery group, calls
``explain.syndrome.maps`` / ``explain.syndrome.fill_in`` and converts the results. Errors are
raised and mapped to statuses by the shared interceptor. Wire it with
``add_syndrome_service(grpc_server, backend, limiter, config)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from phenolens._proto import syndrome_pb2, syndrome_pb2_grpc, types_pb2
from phenolens.arrays import to_float_array

from encoder.image import decode_image
from explain.syndrome.fill_in import (
    FillIn,
    FillInOptions,
    FillInProgress,
    FillInResult,
    fill_in_figure,
)
from explain.syndrome.maps import Composite, SyndromeExplainer, check_group, composite
from gallery.png import encode_png
from server import convert
from server.backend import Backend
from server.config import ServiceConfig
from server.errors import BadRequest
from server.limits import HeavyWorkLimiter, RequestScope

SERVICE_NAME = syndrome_pb2.DESCRIPTOR.services_by_name["SyndromeService"].full_name
MAX_GROUP = 2000  # images per group: composites and maps scale linearly with it
FEATURE = "syndrome"  # for ServerInfo.features


@dataclass(frozen=True, eq=False)
class GalleryGroup:
    """A group loaded from a gallery: crops (N, H, W, 3) uint8 and one id/subject per crop."""

    label: str
    crops: np.ndarray
    gallery_ids: tuple[int, ...]
    subjects: tuple[str, ...]


def load_group(gallery: Any, *, syndrome_id: str = "", gallery_ids: tuple[int, ...] = (),
               exclude_subjects: tuple[str, ...] = (), max_images: int = MAX_GROUP
               ) -> GalleryGroup:
    """The aligned crops of a syndrome's images (or of chosen gallery images) from a Gallery.

    Images without a stored crop are skipped. Raises BadRequest for an empty
    selection or one above ``max_images``; gallery.UnknownId for unknown ids.
    """
    if bool(syndrome_id) == bool(gallery_ids):
        raise BadRequest("a group needs a syndrome id or gallery ids (one of them)")
    if syndrome_id:
        infos = gallery.list(limit=max_images + 1, syndrome_id=syndrome_id)
        records = [gallery.get(i.gallery_id) for i in infos]
    else:
        records = [gallery.get(g) for g in dict.fromkeys(gallery_ids)]
    records = [r for r in records if r.crop_png and r.info.subject_id not in exclude_subjects]
    if len(records) > max_images:
        raise BadRequest(f"the group has more than {max_images} images")
    if not records:
        raise BadRequest("the group has no gallery images with stored aligned crops")
    names = {r.info.syndrome_name or r.info.syndrome_id for r in records}
    label = syndrome_id and (records[0].info.syndrome_name or syndrome_id)
    if not label:
        label = names.pop() if len(names) == 1 else f"{len(records)} gallery images"
    crops = np.stack([decode_image(r.crop_png) for r in records])
    return GalleryGroup(label, crops, tuple(r.info.gallery_id for r in records),
                        tuple(r.info.subject_id for r in records))


def _raw(rgb: np.ndarray) -> types_pb2.RawPixels:
    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, c = arr.shape
    return types_pb2.RawPixels(height=h, width=w, channels=c, data=arr.tobytes())


def fill_in_options(message: syndrome_pb2.FillInOptions) -> FillInOptions:
    """Wire options (0/empty = default) -> FillInOptions."""
    d = FillInOptions()
    return FillInOptions(
        masks=message.masks or d.masks, count=message.count or d.count,
        ratio=message.ratio or d.ratio, patch=message.patch or d.patch,
        fill=message.fill or d.fill, step=message.step or d.step,
        steps=message.steps or d.steps, threshold=message.threshold or d.threshold,
        seed=int(message.seed), batch_size=d.batch_size)


class SyndromeServicer(syndrome_pb2_grpc.SyndromeServiceServicer):
    def __init__(self, backend: Backend, limiter: HeavyWorkLimiter,
                 config: ServiceConfig) -> None:
        self.backend = backend
        self.limiter = limiter
        self.config = config
        self.syndromes = SyndromeExplainer(backend.explainer)
        self.fill_in = FillIn(backend.explainer)

    # -- helpers -------------------------------------------------------------------------
    def _group(self, message: syndrome_pb2.Group) -> GalleryGroup:
        return load_group(self.backend.gallery, syndrome_id=message.syndrome_id,
                          gallery_ids=tuple(convert.gallery_id(g) for g in message.gallery_ids),
                          exclude_subjects=tuple(message.exclude_subject_ids))

    @staticmethod
    def _summary(group: GalleryGroup, check: Any) -> syndrome_pb2.GroupSummary:
        return syndrome_pb2.GroupSummary(
            label=group.label, images=check.images, subjects=check.subjects,
            warnings=list(check.warnings), gallery_ids=[str(g) for g in group.gallery_ids])

    def _composite(self, message: syndrome_pb2.Group, group: GalleryGroup) -> Composite:
        return composite(group.crops, subjects=group.subjects,
                         balance="subject" if message.balance_subjects else "image",
                         min_size=message.min_size or 2)

    def _time_limit(self, scope: RequestScope) -> float:
        limit = self.backend.config.explain.time_limit_s
        remaining = scope.remaining()
        return limit if remaining is None else max(0.0, min(limit, remaining))

    def _face(self, image: types_pb2.Image, scope: RequestScope):
        data, aligned = convert.image_input(image, self.config.limits.max_image_pixels)
        face = self.backend.face(data, aligned=aligned, scope=scope)
        return face, aligned

    # -- RPCs ----------------------------------------------------------------------------
    def Composite(self, request: syndrome_pb2.CompositeRequest, context: grpc.ServicerContext
                  ) -> syndrome_pb2.CompositeResponse:
        scope = RequestScope.of(context)
        with self.limiter.slot():
            group = self._group(request.group)
            scope.check()
            comp = self._composite(request.group, group)
        return syndrome_pb2.CompositeResponse(
            group=self._summary(group, comp.check), composite=_raw(comp.image),
            mean=to_float_array(comp.mean), composite_png=encode_png(comp.image))

    def SyndromeMap(self, request: syndrome_pb2.SyndromeMapRequest,
                    context: grpc.ServicerContext) -> syndrome_pb2.SyndromeMapResponse:
        from explain.render import overlay_png, symmetric_limit

        scope = RequestScope.of(context)
        with self.limiter.slot():
            group = self._group(request.group)
            check_group(len(group.crops), group.subjects, min_size=request.group.min_size or 2)
            maps = self.syndromes.syndrome_maps(
                group.crops, subjects=group.subjects, min_size=request.group.min_size or 2,
                cancel=scope.cancelled, time_limit=self._time_limit(scope))
            query = face = None
            if request.HasField("query"):
                face, aligned = self._face(request.query, scope)
                features = self.backend.query_of_face(face, scope).features
                query = self.syndromes.query_pull(features, maps.centroid, cancel=scope.cancelled)
        response = syndrome_pb2.SyndromeMapResponse(
            group=self._summary(group, maps.check),
            to_centroid=to_float_array(maps.to_centroid), to_rest=to_float_array(maps.to_rest),
            to_centroid_aligned=to_float_array(maps.to_centroid_aligned),
            to_rest_aligned=to_float_array(maps.to_rest_aligned),
            mean_cosine_to_centroid=maps.mean_cosine_to_centroid,
            mean_cosine_to_rest=maps.mean_cosine_to_rest,
            centroid=to_float_array(maps.centroid.as_array()))
        if request.members:
            response.members.extend(
                syndrome_pb2.MemberMap(
                    gallery_id=str(group.gallery_ids[m.index]),
                    cosine_to_centroid=m.cosine_to_centroid, cosine_to_rest=m.cosine_to_rest or 0.0,
                    to_centroid=to_float_array(m.to_centroid), to_rest=to_float_array(m.to_rest))
                for m in maps.members)
        if request.overlays:
            comp = composite(group.crops, subjects=group.subjects,
                             min_size=request.group.min_size or 2).image
            limit = symmetric_limit(maps.to_centroid_aligned, maps.to_rest_aligned)
            response.composite_png = encode_png(comp)
            response.to_centroid_overlay_png = overlay_png(comp, maps.to_centroid_aligned,
                                                           limit=limit)
            response.to_rest_overlay_png = overlay_png(comp, maps.to_rest_aligned, limit=limit)
        if query is not None:
            response.query.CopyFrom(syndrome_pb2.QueryPull(
                cosine=query.cosine, view_cosines=list(query.view_cosines),
                map=to_float_array(query.map), aligned=to_float_array(query.map_aligned),
                bias_share=query.bias_share, residual=query.residual,
                alignment=convert.alignment(face, detected=not aligned),
                overlay_png=overlay_png(face.crop, query.map_aligned) if request.overlays
                else b""))
        return response

    def FillIn(self, request: syndrome_pb2.FillInRequest, context: grpc.ServicerContext
               ) -> Iterator[syndrome_pb2.FillInEvent]:
        scope = RequestScope.of(context)
        options = fill_in_options(request.options)
        with self.limiter.slot():
            face, aligned = self._face(request.image, scope)
            which = request.WhichOneof("target")
            if which == "syndrome":
                group = self._group(request.syndrome)
                check_group(len(group.crops), group.subjects,
                            min_size=request.syndrome.min_size or 1)
                target_crops, label = group.crops, group.label
            elif which == "gallery_id":
                record = self.backend.gallery.get(convert.gallery_id(request.gallery_id))
                if not record.crop_png:
                    raise BadRequest("the gallery image has no stored aligned crop")
                target_crops = decode_image(record.crop_png)[None]
                label = record.info.syndrome_name or record.info.syndrome_id or "gallery face"
            elif which == "target_image":
                target_face, _ = self._face(request.target_image, scope)
                target_crops, label = target_face.crop[None], "target face"
            else:
                raise BadRequest("FillIn needs a target: a syndrome group, a gallery id or an image")
            target = self.syndromes.centroid(target_crops, cancel=scope.cancelled)
            for event in self.fill_in.steps(
                    face.crop, target, options, budget=self.backend.config.explain.budget,
                    time_limit=self._time_limit(scope), cancel=scope.cancelled):
                scope.check()
                if isinstance(event, FillInProgress):
                    yield syndrome_pb2.FillInEvent(progress=syndrome_pb2.FillInProgress(
                        done=event.done, total=event.total))
                else:
                    yield syndrome_pb2.FillInEvent(result=self._fill_in_result(
                        event, label, face, aligned, request.overlays))

    @staticmethod
    def _fill_in_result(result: FillInResult, label: str, face: Any, aligned: bool,
                        overlays: bool) -> syndrome_pb2.FillInResult:
        c = result.consistency
        return syndrome_pb2.FillInResult(
            target_label=label, score=result.score, score_updated=result.score_updated,
            gradient=to_float_array(result.gradient), magnitude=to_float_array(result.magnitude),
            update=to_float_array(result.update), filled=_raw(result.filled),
            expected_fill=_raw(result.expected_fill),
            example_masked=_raw(result.example_masked),
            example_filled=_raw(result.example_filled),
            consistency=syndrome_pb2.FillInConsistency(
                masked=to_float_array(c.masked), filled=to_float_array(c.filled),
                control=to_float_array(c.control), fraction_improved=c.fraction_improved,
                mean_gain=c.mean_gain, control_fraction_improved=c.control_fraction_improved,
                control_mean_gain=c.control_mean_gain, consistent=c.consistent),
            forward_passes=result.forward_passes, seconds=result.seconds,
            alignment=convert.alignment(face, detected=not aligned),
            figure_png=fill_in_figure(face.crop, result, label=label) if overlays else b"",
            crop=_raw(face.crop))


def add_syndrome_service(server: grpc.Server, backend: Backend, limiter: HeavyWorkLimiter,
                         config: ServiceConfig) -> SyndromeServicer:
    """Register the SyndromeService on ``server`` (before ``server.start()``)."""
    servicer = SyndromeServicer(backend, limiter, config)
    syndrome_pb2_grpc.add_SyndromeServiceServicer_to_server(servicer, server)
    return servicer
