"""Request messages built from plain Python arguments (shared by Client and AsyncClient)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ._proto import gallery_pb2, phenolens_pb2, types_pb2
from .arrays import ImageLike, to_float_array, to_image
from .results import GalleryRecord


@dataclass(frozen=True)
class Filters:
    """Gallery restrictions of a search (see GalleryFilters in types.proto)."""

    exclude_subjects: tuple[str, ...] = ()
    same_patient_rule: bool = False
    same_patient_distance: float = 0.0  # 0: the server's default, 0.4
    syndromes: tuple[str, ...] = ()

    def to_proto(self) -> types_pb2.GalleryFilters:
        return types_pb2.GalleryFilters(
            exclude_subject_ids=list(self.exclude_subjects),
            same_patient_rule=self.same_patient_rule,
            same_patient_distance=self.same_patient_distance,
            syndrome_ids=list(self.syndromes),
        )


@dataclass(frozen=True, eq=False)
class ImportItem:
    """One record for ``import_gallery``: an image, or a precomputed embedding and crop."""

    record: GalleryRecord
    image: ImageLike | None = None
    aligned: bool = False
    embedding: np.ndarray | None = None  # (V, D)
    view_scheme: str = ""
    aligned_crop_png: bytes = b""

    def to_proto(self) -> gallery_pb2.ImportRecord:
        if self.image is not None:
            return gallery_pb2.ImportRecord(record=self.record.to_proto(),
                                            image=to_image(self.image, aligned=self.aligned))
        if self.embedding is None:
            raise ValueError("an ImportItem needs an image or an embedding")
        return gallery_pb2.ImportRecord(
            record=self.record.to_proto(),
            precomputed=gallery_pb2.PrecomputedFace(
                embedding=types_pb2.Embedding(view_scheme=self.view_scheme,
                                              vectors=to_float_array(self.embedding)),
                aligned_crop_png=self.aligned_crop_png,
            ),
        )


def match_request(
    image: ImageLike | None = None,
    *,
    aligned: bool = False,
    embedding: np.ndarray | None = None,
    view_scheme: str = "",
    top_k: int = 10,
    top_syndromes: int = 10,
    top_genes: int = 10,
    filters: Filters | None = None,
    exclude_subjects: Sequence[str] = (),
) -> phenolens_pb2.MatchRequest:
    filters = filters or Filters()
    if exclude_subjects:
        filters = Filters(tuple(filters.exclude_subjects) + tuple(exclude_subjects),
                          filters.same_patient_rule, filters.same_patient_distance,
                          filters.syndromes)
    request = phenolens_pb2.MatchRequest(top_k=top_k, top_syndromes=top_syndromes,
                                         top_genes=top_genes, filters=filters.to_proto())
    if (image is None) == (embedding is None):
        raise ValueError("give exactly one of image and embedding")
    if image is not None:
        request.image.CopyFrom(to_image(image, aligned=aligned))
    else:
        request.embedding.CopyFrom(
            types_pb2.Embedding(view_scheme=view_scheme, vectors=to_float_array(embedding)))
    return request


def explain_request(
    image: ImageLike,
    *,
    aligned: bool = False,
    top_k: int = 3,
    methods: Sequence[str] = (),
    photo_maps: bool = True,
    overlays: bool = False,
    gallery_crops: bool = True,
    feature_maps: bool = False,
    gallery_ids: Sequence[str] = (),
    filters: Filters | None = None,
    exclude_subjects: Sequence[str] = (),
    method_options: Mapping[str, Mapping[str, float]] | None = None,
    effects: int = 0,
) -> phenolens_pb2.ExplainRequest:
    """``method_options``: per method name, its numeric options, e.g.
    ``{"occlusion": {"patch": 10, "stride": 5}}``; ``effects``: region effects for the
    first that many hits (``ExplainedMatch.effects``)."""
    return phenolens_pb2.ExplainRequest(
        match=match_request(image, aligned=aligned, top_k=top_k, filters=filters,
                            exclude_subjects=exclude_subjects),
        methods=list(methods), photo_maps=photo_maps, overlays=overlays,
        gallery_crops=gallery_crops, feature_maps=feature_maps, gallery_ids=list(gallery_ids),
        method_options={name: phenolens_pb2.MethodOptions(values=dict(values))
                        for name, values in (method_options or {}).items()},
        effects=effects,
    )


def add_image_request(image: ImageLike, record: GalleryRecord, *, aligned: bool = False,
                      face_index: int | None = None) -> gallery_pb2.AddImageRequest:
    request = gallery_pb2.AddImageRequest(image=to_image(image, aligned=aligned),
                                          record=record.to_proto())
    if face_index is not None:
        request.face_index = face_index
    return request


def import_records(items: Iterable[ImportItem]) -> Iterator[gallery_pb2.ImportRecord]:
    for item in items:
        yield item.to_proto()
