"""Protobuf messages <-> the library's values, and nothing else: confidences come with the
match (``server.backend``), pictures and region summaries with the presentation
(``server.present``). The only server module besides the servicers that touches
protobuf; arrays use the client's codec (one wire format)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from phenolens._proto import gallery_pb2, phenolens_pb2, types_pb2
from phenolens.arrays import from_float_array, set_float_array, to_float_array

from encoder.pipeline import Face
from gallery import GeneHit, Hit, RecordInfo, SearchFilter, SyndromeHit
from gallery.calibration import Confidence
from server.backend import MatchOutcome
from server.errors import BadRequest, NotFound
from server.present import Presentation, PresentedMatch

if TYPE_CHECKING:
    from explain.regions import RegionSummary
    from server.application import ExplainedQuery

SIDE_QUERY, SIDE_GALLERY = phenolens_pb2.SIDE_QUERY, phenolens_pb2.SIDE_GALLERY
DEFAULT_SAME_PATIENT_DISTANCE = 0.4


def image_input(message: types_pb2.Image, max_pixels: int) -> tuple[bytes | np.ndarray, bool]:
    """(bytes or (H, W, C) uint8 array, aligned flag) of an Image message."""
    which = message.WhichOneof("source")
    if which == "encoded":
        return message.encoded, message.aligned
    if which == "pixels":
        p = message.pixels
        if p.channels not in (1, 3, 4) or p.height < 1 or p.width < 1:
            raise BadRequest(f"raw pixels need height, width >= 1 and 1, 3 or 4 channels, got "
                             f"{p.height}x{p.width}x{p.channels}")
        if p.height * p.width > max_pixels:
            raise BadRequest(f"raw image of {p.height * p.width} pixels is above the limit "
                             f"of {max_pixels}")
        if len(p.data) != p.height * p.width * p.channels:
            raise BadRequest(f"raw pixels hold {len(p.data)} bytes, {p.height}x{p.width}x"
                             f"{p.channels} needs {p.height * p.width * p.channels}")
        arr = np.frombuffer(p.data, np.uint8).reshape(p.height, p.width, p.channels)
        if p.channels == 1:
            arr = np.repeat(arr, 3, axis=2)
        return np.ascontiguousarray(arr[:, :, :3]), message.aligned
    raise BadRequest("no image given: set Image.encoded or Image.pixels")


def embedding_input(message: types_pb2.Embedding) -> tuple[np.ndarray, str]:
    try:
        vectors = from_float_array(message.vectors)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return vectors, message.view_scheme


def gallery_id(value: str) -> int:
    """A gallery id from the wire; anything not a known id's form is simply not found."""
    try:
        return int(value)
    except ValueError:
        raise NotFound("gallery id is not in the gallery") from None


def filters(message: types_pb2.GalleryFilters) -> SearchFilter:
    distance = None
    if message.same_patient_rule:
        distance = message.same_patient_distance or DEFAULT_SAME_PATIENT_DISTANCE
    return SearchFilter(
        exclude_subjects=tuple(message.exclude_subject_ids),
        same_patient_distance=distance,
        syndromes=tuple(message.syndrome_ids) or None,
    )


def alignment(face: Face, *, detected: bool = True) -> types_pb2.Alignment:
    a = face.alignment
    h, w = a.crop_size
    return types_pb2.Alignment(
        detected=detected,
        detection_score=float(face.score),
        face_count=int(face.face_count),
        boxes=to_float_array(np.asarray(face.boxes, np.float32).reshape(-1, 4)),
        landmarks_photo=to_float_array(a.landmarks_photo),
        landmarks_crop=to_float_array(a.landmarks_crop),
        photo_to_crop=to_float_array(a.photo_to_crop),
        crop_to_photo=to_float_array(a.crop_to_photo),
        photo_height=int(a.photo_size[0]), photo_width=int(a.photo_size[1]),
        crop_height=h, crop_width=w, template=a.template,
    )


def record_info(info: RecordInfo) -> types_pb2.GalleryRecord:
    return types_pb2.GalleryRecord(
        gallery_id=str(info.gallery_id), image_id=info.image_id, subject_id=info.subject_id,
        syndrome_id=info.syndrome_id, syndrome_name=info.syndrome_name, omim=info.omim_id or "",
        genes=list(info.genes), source=info.source, encoder_id=info.encoder_id,
        view_scheme=info.view_scheme,
    )


def record_fields(message: types_pb2.GalleryRecord) -> dict[str, Any]:
    return {
        "image_id": message.image_id, "subject_id": message.subject_id,
        "syndrome_id": message.syndrome_id, "syndrome_name": message.syndrome_name,
        "omim": message.omim, "genes": tuple(message.genes), "source": message.source,
    }


def confidence(c: Confidence) -> types_pb2.Confidence:
    return types_pb2.Confidence(
        calibrated=c.calibrated, probability=c.probability or 0.0, reason=c.reason,
        method=c.method, calibration_error=c.calibration_error, samples=c.samples,
        gallery_version=c.gallery_version)


def hit(h: Hit, rank: int, encoder_id: str, view_scheme: str,
        c: Confidence | None = None) -> types_pb2.Hit:
    message = types_pb2.Hit(
        rank=rank,
        record=types_pb2.GalleryRecord(
            gallery_id=str(h.gallery_id), image_id=h.image_id, subject_id=h.subject_id,
            syndrome_id=h.syndrome_id, syndrome_name=h.syndrome_name, omim=h.omim_id or "",
            genes=list(h.genes), encoder_id=encoder_id, view_scheme=view_scheme,
        ),
        cosine=h.score, distance=h.distance,
    )
    if c is not None:
        message.confidence.CopyFrom(confidence(c))
    return message


def match_response(outcome: MatchOutcome, encoder_id: str, view_scheme: str, *,
                   detected: bool = True) -> phenolens_pb2.MatchResponse:
    response = phenolens_pb2.MatchResponse(
        encoder_id=encoder_id, view_scheme=view_scheme,
        gallery_version=outcome.gallery_version,
        hits=[hit(h, i + 1, encoder_id, view_scheme, c) for i, (h, c) in
              enumerate(zip(outcome.hits, outcome.hit_confidences, strict=True))],
        syndromes=[_syndrome(s, i + 1, c) for i, (s, c) in
                   enumerate(zip(outcome.syndromes, outcome.syndrome_confidences, strict=True))],
        genes=[_gene(g, i + 1, c) for i, (g, c) in
               enumerate(zip(outcome.genes, outcome.gene_confidences, strict=True))],
    )
    if outcome.query.face is not None:
        response.alignment.CopyFrom(alignment(outcome.query.face, detected=detected))
    return response


def _syndrome(s: SyndromeHit, rank: int, c: Confidence | None) -> types_pb2.SyndromeRank:
    message = types_pb2.SyndromeRank(rank=rank, syndrome_id=s.syndrome_id,
                                     syndrome_name=s.syndrome_name, omim=s.omim_id or "",
                                     cosine=s.score, nearest_gallery_id=str(s.gallery_id),
                                     nearest_image_id=s.image_id)
    if c is not None:
        message.confidence.CopyFrom(confidence(c))
    return message


def _gene(g: GeneHit, rank: int, c: Confidence | None) -> types_pb2.GeneRank:
    message = types_pb2.GeneRank(rank=rank, gene=g.gene, cosine=g.score,
                                 nearest_gallery_id=str(g.gallery_id),
                                 nearest_image_id=g.image_id)
    if c is not None:
        message.confidence.CopyFrom(confidence(c))
    return message


def regions(summary: RegionSummary) -> list[phenolens_pb2.RegionShare]:
    """A map's region summary (template landmark regions of the aligned crop)."""
    return [phenolens_pb2.RegionShare(region=r, positive=p, negative=n) for r, p, n in
            zip(summary.regions, summary.positive, summary.negative, strict=True)]


def presentation(request: phenolens_pb2.ExplainRequest) -> Presentation:
    """What an ExplainRequest asks to be drawn and sent beside the aligned maps."""
    return Presentation(overlays=request.overlays, pair_figures=request.pair_figures,
                        gallery_crops=request.gallery_crops, photo_maps=request.photo_maps,
                        feature_maps=request.feature_maps)


def explain_events(result: ExplainedQuery, encoder_id: str, view_scheme: str, *,
                   detected: bool) -> Iterator[phenolens_pb2.ExplainEvent]:
    """The events of an explanation: the match first, then each explained hit as it comes."""
    event = phenolens_pb2.ExplainEvent(query_crop_png=result.query_crop_png)
    event.match.CopyFrom(match_response(result.outcome, encoder_id, view_scheme,
                                        detected=detected))
    yield event
    for presented in result.matches:
        event = phenolens_pb2.ExplainEvent()
        explained_match(presented, encoder_id, view_scheme, out=event.explanation)
        yield event


def explain_result(result: ExplainedQuery, encoder_id: str, view_scheme: str, *,
                   detected: bool) -> phenolens_pb2.ExplainResponse:
    """The unary ExplainResponse of an explanation, each hit built in place in it (a
    response with photo maps is 15-20 MB: every copy of it counts): the same messages as
    the stream's ``explain_events``, without their copies."""
    response = phenolens_pb2.ExplainResponse(query_crop_png=result.query_crop_png)
    response.match.CopyFrom(match_response(result.outcome, encoder_id, view_scheme,
                                           detected=detected))
    for presented in result.matches:
        explained_match(presented, encoder_id, view_scheme, out=response.explanations.add())
    return response


def explained_match(p: PresentedMatch, encoder_id: str, view_scheme: str, *,
                    out: phenolens_pb2.ExplainedMatch | None = None
                    ) -> phenolens_pb2.ExplainedMatch:
    """``p`` as an ExplainedMatch, filled into ``out`` (a field of the message being built,
    so the maps are not copied again) or a new message."""
    out = phenolens_pb2.ExplainedMatch() if out is None else out
    pair = p.pair
    out.index = pair.index
    out.hit.CopyFrom(hit(p.hit, p.rank, encoder_id, view_scheme, p.confidence))
    for m in p.maps:
        _map(out.maps.add(), m.method, SIDE_QUERY, m.query_aligned, m.query_regions,
             m.query_overlay_png, photo=m.query_photo, feature=m.query_feature,
             photo_overlay_png=m.photo_overlay_png, pair_figure_png=m.pair_figure_png,
             drawn=m.query_drawn)
        _map(out.maps.add(), m.method, SIDE_GALLERY, m.gallery_aligned, m.gallery_regions,
             m.gallery_overlay_png,
             feature=m.gallery_feature if m.query_feature is not None else None,
             drawn=m.gallery_drawn)
    out.residual = pair.residual
    out.bias_share = pair.bias_share
    out.gallery_crop_png = p.gallery_crop_png
    out.effects.extend(face_effects(pair.effects))
    if pair.contrast_share is not None:
        out.contrast_share = pair.contrast_share
    return out


def _map(out: phenolens_pb2.Map, method: str, side: int, aligned: np.ndarray,
         summary: RegionSummary, overlay_png: bytes, *, photo: np.ndarray | None = None,
         feature: np.ndarray | None = None, photo_overlay_png: bytes = b"",
         pair_figure_png: bytes = b"", drawn: np.ndarray | None = None) -> None:
    """Fill one face's Map in place; arrays are written straight into its fields."""
    out.method = method
    out.side = side
    set_float_array(out.aligned, aligned)
    if photo is not None:
        set_float_array(out.photo, photo)
    if feature is not None:
        set_float_array(out.feature, feature)
    out.overlay_png = overlay_png
    out.photo_overlay_png = photo_overlay_png
    out.regions.extend(regions(summary))
    out.pair_figure_png = pair_figure_png
    if drawn is not None:
        set_float_array(out.drawn, drawn)


def face_effects(effects: Any) -> list[phenolens_pb2.FaceEffects]:
    """An ``explain.effects.PairEffects`` (or None) -> one FaceEffects per side."""
    if effects is None:
        return []
    return [phenolens_pb2.FaceEffects(side=side, regions=[
        phenolens_pb2.RegionEffect(region=r, differs=d, alike=a)
        for r, d, a in zip(s.regions, s.differs, s.alike, strict=True)])
        for side, s in ((SIDE_QUERY, effects.query), (SIDE_GALLERY, effects.gallery))]


def stats_response(s: Any) -> gallery_pb2.GalleryStatsResponse:
    return gallery_pb2.GalleryStatsResponse(
        images=s.records, subjects=s.subjects, syndromes=s.syndromes,
        per_syndrome=[
            gallery_pb2.SyndromeCount(syndrome_id=sid, syndrome_name=s.syndrome_names.get(sid, ""),
                                      images=n, subjects=s.subjects_per_syndrome.get(sid, 0))
            for sid, n in s.images_per_syndrome.items()
        ],
        imbalance=s.syndrome_balance.max_min_ratio, gallery_version=s.gallery_version,
        encoder_id=s.encoder_id or "", view_scheme=s.view_scheme or "",
    )
