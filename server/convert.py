"""Protobuf messages <-> the library's values. The only server module besides the
servicer that touches protobuf; arrays use the client's codec (one wire format)."""

from __future__ import annotations

from typing import Any

import numpy as np
from phenolens._proto import gallery_pb2, phenolens_pb2, types_pb2
from phenolens.arrays import from_float_array, to_float_array

from encoder.pipeline import Face
from gallery import GeneHit, Hit, RecordInfo, SearchFilter, SyndromeHit
from gallery.calibration import Calibration, Confidence
from server.backend import HitExplanation, MatchOutcome
from server.errors import BadRequest, NotFound

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
        calibration: Calibration | None = None) -> types_pb2.Hit:
    message = types_pb2.Hit(
        rank=rank,
        record=types_pb2.GalleryRecord(
            gallery_id=str(h.gallery_id), image_id=h.image_id, subject_id=h.subject_id,
            syndrome_id=h.syndrome_id, syndrome_name=h.syndrome_name, omim=h.omim_id or "",
            genes=list(h.genes), encoder_id=encoder_id, view_scheme=view_scheme,
        ),
        cosine=h.score, distance=h.distance,
    )
    if calibration is not None:
        message.confidence.CopyFrom(confidence(calibration.hit_confidence(h.syndrome_id,
                                                                          h.score)))
    return message


def match_response(outcome: MatchOutcome, encoder_id: str, view_scheme: str, *,
                   detected: bool = True) -> phenolens_pb2.MatchResponse:
    response = phenolens_pb2.MatchResponse(
        encoder_id=encoder_id, view_scheme=view_scheme,
        gallery_version=outcome.gallery_version,
        hits=[hit(h, i + 1, encoder_id, view_scheme, outcome.calibration)
              for i, h in enumerate(outcome.hits)],
        syndromes=[_syndrome(s, i + 1, outcome.calibration)
                   for i, s in enumerate(outcome.syndromes)],
        genes=[_gene(g, i + 1, outcome.calibration) for i, g in enumerate(outcome.genes)],
    )
    if outcome.query.face is not None:
        response.alignment.CopyFrom(alignment(outcome.query.face, detected=detected))
    return response


def _syndrome(s: SyndromeHit, rank: int,
              calibration: Calibration | None = None) -> types_pb2.SyndromeRank:
    message = types_pb2.SyndromeRank(rank=rank, syndrome_id=s.syndrome_id,
                                     syndrome_name=s.syndrome_name, omim=s.omim_id or "",
                                     cosine=s.score, nearest_gallery_id=str(s.gallery_id),
                                     nearest_image_id=s.image_id)
    if calibration is not None:
        message.confidence.CopyFrom(confidence(calibration.syndrome_confidence(s.syndrome_id,
                                                                               s.score)))
    return message


def regions(aligned_map: np.ndarray) -> list[phenolens_pb2.RegionShare]:
    """The region summary of an aligned map (template landmark regions of the aligned crop)."""
    from explain.regions import region_summary

    summary = region_summary(aligned_map)
    return [phenolens_pb2.RegionShare(region=r, positive=p, negative=n) for r, p, n in
            zip(summary.regions, summary.positive, summary.negative, strict=True)]


def _gene(g: GeneHit, rank: int, calibration: Calibration | None = None) -> types_pb2.GeneRank:
    message = types_pb2.GeneRank(rank=rank, gene=g.gene, cosine=g.score,
                                 nearest_gallery_id=str(g.gallery_id),
                                 nearest_image_id=g.image_id)
    if calibration is not None:
        message.confidence.CopyFrom(confidence(calibration.gene_confidence(g.gene, g.score)))
    return message


def explained_match(e: HitExplanation, *, rank: int, encoder_id: str, view_scheme: str,
                    query_crop: np.ndarray, overlays: bool, gallery_crops: bool,
                    query_photo: np.ndarray | None = None, pair_figures: bool = False,
                    calibration: Calibration | None = None) -> phenolens_pb2.ExplainedMatch:
    from explain.render import overlay_png, pair_figure, sum_note

    maps = []
    words = None if e.effects is None else (e.effects.query.describe(),
                                            e.effects.gallery.describe())
    for m in e.maps:
        q = phenolens_pb2.Map(method=m.method, side=SIDE_QUERY,
                              aligned=to_float_array(m.query_aligned),
                              regions=regions(m.query_aligned))
        g = phenolens_pb2.Map(method=m.method, side=SIDE_GALLERY,
                              aligned=to_float_array(m.gallery_aligned),
                              regions=regions(m.gallery_aligned))
        if pair_figures:
            q.pair_figure_png = pair_figure(
                query_crop, e.gallery_crop, m.query_aligned, m.gallery_aligned,
                cosine=e.hit.score, label=e.hit.syndrome_name or e.hit.syndrome_id,
                method=m.method, gallery_name=_face_name(e.hit), words=words,
                note=sum_note(m.method, e.contrast_share))
        if m.query_photo is not None:
            q.photo.CopyFrom(to_float_array(m.query_photo))
        if m.query_feature is not None:
            q.feature.CopyFrom(to_float_array(m.query_feature))
            g.feature.CopyFrom(to_float_array(m.gallery_feature))
        if overlays:
            q.overlay_png = overlay_png(query_crop, m.query_aligned)
            g.overlay_png = overlay_png(e.gallery_crop, m.gallery_aligned)
            if query_photo is not None and m.query_photo is not None:
                q.photo_overlay_png = overlay_png(query_photo, m.query_photo)
        maps += [q, g]
    return phenolens_pb2.ExplainedMatch(
        index=e.index, hit=hit(e.hit, rank, encoder_id, view_scheme, calibration), maps=maps,
        residual=e.residual, bias_share=e.bias_share,
        gallery_crop_png=e.gallery_crop_png if gallery_crops else b"",
        effects=face_effects(e.effects), contrast_share=e.contrast_share,
    )


def _face_name(h: Hit) -> str:
    """How the gallery names a face: subject and image id (never a bare row id)."""
    return " · ".join(p for p in (h.subject_id and f"subject {h.subject_id}",
                                  h.image_id and f"image {h.image_id}") if p)


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
