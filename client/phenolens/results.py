"""What the client returns: small frozen dataclasses with numpy arrays.

Each ``from_proto`` turns one response message into plain Python; nothing
outside this module and ``requests`` touches protobuf.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from . import overlay
from ._proto import gallery_pb2, phenolens_pb2, types_pb2
from .arrays import decode_png, from_float_array, optional_array

Side = Literal["query", "gallery"]
PhotoSource = np.ndarray | Callable[[], np.ndarray | None] | None
"""A photo (H, W, 3) uint8, a function that decodes it when first needed, or None."""
_SIDES: dict[int, Side] = {phenolens_pb2.SIDE_QUERY: "query", phenolens_pb2.SIDE_GALLERY: "gallery"}


@dataclass(frozen=True, eq=False)
class FaceAlignment:
    """How the face was found and aligned. Matrices are (2, 3) affine; points (5, 2) x, y."""

    detected: bool
    detection_score: float
    face_count: int
    boxes: np.ndarray  # (n, 4) x0, y0, x1, y1 in photo pixels
    landmarks_photo: np.ndarray | None
    landmarks_crop: np.ndarray | None
    photo_to_crop: np.ndarray | None
    crop_to_photo: np.ndarray | None
    photo_size: tuple[int, int]  # (H, W)
    crop_size: tuple[int, int]  # (H, W)
    template: str

    @classmethod
    def from_proto(cls, m: types_pb2.Alignment) -> FaceAlignment:
        boxes = optional_array(m.boxes)
        return cls(
            detected=m.detected,
            detection_score=m.detection_score,
            face_count=m.face_count,
            boxes=boxes if boxes is not None else np.zeros((0, 4), np.float32),
            landmarks_photo=optional_array(m.landmarks_photo),
            landmarks_crop=optional_array(m.landmarks_crop),
            photo_to_crop=optional_array(m.photo_to_crop),
            crop_to_photo=optional_array(m.crop_to_photo),
            photo_size=(m.photo_height, m.photo_width),
            crop_size=(m.crop_height, m.crop_width),
            template=m.template,
        )


@dataclass(frozen=True, eq=False)
class Encoding:
    encoder_id: str
    view_scheme: str
    embedding: np.ndarray  # (V, D), L2-normalised per view
    alignment: FaceAlignment
    aligned_crop_png: bytes = b""

    @classmethod
    def from_proto(cls, m: phenolens_pb2.EncodeResponse) -> Encoding:
        return cls(m.encoder_id, m.view_scheme, from_float_array(m.embedding),
                   FaceAlignment.from_proto(m.alignment), m.aligned_crop_png)

    def aligned_crop(self) -> np.ndarray:
        """(H, W, 3) uint8 aligned crop (needs Pillow and ``return_crop=True``)."""
        return decode_png(self.aligned_crop_png)


@dataclass(frozen=True)
class GalleryRecord:
    gallery_id: str
    image_id: str = ""
    subject_id: str = ""
    syndrome_id: str = ""
    syndrome_name: str = ""
    omim: str = ""
    genes: tuple[str, ...] = ()
    source: str = ""
    encoder_id: str = ""
    view_scheme: str = ""

    @classmethod
    def from_proto(cls, m: types_pb2.GalleryRecord) -> GalleryRecord:
        return cls(m.gallery_id, m.image_id, m.subject_id, m.syndrome_id, m.syndrome_name,
                   m.omim, tuple(m.genes), m.source, m.encoder_id, m.view_scheme)

    def to_proto(self) -> types_pb2.GalleryRecord:
        return types_pb2.GalleryRecord(
            gallery_id=self.gallery_id, image_id=self.image_id, subject_id=self.subject_id,
            syndrome_id=self.syndrome_id, syndrome_name=self.syndrome_name, omim=self.omim,
            genes=list(self.genes), source=self.source,
        )


@dataclass(frozen=True)
class Confidence:
    """P(the query shares the syndrome) from the gallery's calibration, or why it is refused
    (``probability`` None). ``calibration_error`` is the cross-validated expected calibration
    error, ``samples`` the number of gallery scores it rests on."""

    probability: float | None
    reason: str = ""
    method: str = ""
    calibration_error: float = 0.0
    samples: int = 0
    gallery_version: int = 0

    @property
    def calibrated(self) -> bool:
        return self.probability is not None

    @classmethod
    def from_proto(cls, m: types_pb2.Confidence) -> Confidence:
        return cls(m.probability if m.calibrated else None, m.reason, m.method,
                   m.calibration_error, m.samples, m.gallery_version)

    def to_json(self) -> dict:
        return {"probability": self.probability, "reason": self.reason or None,
                "method": self.method or None, "calibration_error": self.calibration_error,
                "samples": self.samples, "gallery_version": self.gallery_version}

    def describe(self) -> str:
        """``"72 %"`` (``">99 %"``, ``"<1 %"`` at the ends) or ``"not calibrated"``."""
        return percent(self.probability) if self.probability is not None else "not calibrated"


def percent(probability: float) -> str:
    """A probability in words a reader will not over-read: ``"72 %"``, ``">99 %"``, ``"<1 %"``."""
    if probability > 0.99:
        return ">99 %"
    if probability < 0.01:
        return "<1 %"
    return f"{100 * probability:.0f} %"


_NO_CONFIDENCE = Confidence(None, "the server sent no confidence")


@dataclass(frozen=True)
class Hit:
    rank: int
    record: GalleryRecord
    cosine: float
    distance: float
    confidence: Confidence = _NO_CONFIDENCE

    @property
    def gallery_id(self) -> str:
        return self.record.gallery_id

    @property
    def syndrome_id(self) -> str:
        return self.record.syndrome_id

    @classmethod
    def from_proto(cls, m: types_pb2.Hit) -> Hit:
        return cls(m.rank, GalleryRecord.from_proto(m.record), m.cosine, m.distance,
                   Confidence.from_proto(m.confidence) if m.HasField("confidence")
                   else _NO_CONFIDENCE)


@dataclass(frozen=True)
class SyndromeRank:
    rank: int
    syndrome_id: str
    syndrome_name: str
    omim: str
    cosine: float
    nearest_gallery_id: str
    nearest_image_id: str = ""
    confidence: Confidence = _NO_CONFIDENCE

    @classmethod
    def from_proto(cls, s: types_pb2.SyndromeRank) -> SyndromeRank:
        return cls(s.rank, s.syndrome_id, s.syndrome_name, s.omim, s.cosine,
                   s.nearest_gallery_id, s.nearest_image_id,
                   Confidence.from_proto(s.confidence) if s.HasField("confidence")
                   else _NO_CONFIDENCE)


@dataclass(frozen=True)
class GeneRank:
    rank: int
    gene: str
    cosine: float
    nearest_gallery_id: str
    nearest_image_id: str = ""
    confidence: Confidence = _NO_CONFIDENCE

    @classmethod
    def from_proto(cls, g: types_pb2.GeneRank) -> GeneRank:
        return cls(g.rank, g.gene, g.cosine, g.nearest_gallery_id, g.nearest_image_id,
                   Confidence.from_proto(g.confidence) if g.HasField("confidence")
                   else _NO_CONFIDENCE)


@dataclass(frozen=True, eq=False)
class MatchResult:
    encoder_id: str
    view_scheme: str
    gallery_version: int
    hits: tuple[Hit, ...]
    syndromes: tuple[SyndromeRank, ...]
    genes: tuple[GeneRank, ...]
    alignment: FaceAlignment | None

    @classmethod
    def from_proto(cls, m: phenolens_pb2.MatchResponse) -> MatchResult:
        return cls(
            encoder_id=m.encoder_id,
            view_scheme=m.view_scheme,
            gallery_version=m.gallery_version,
            hits=tuple(Hit.from_proto(h) for h in m.hits),
            syndromes=tuple(SyndromeRank.from_proto(s) for s in m.syndromes),
            genes=tuple(GeneRank.from_proto(g) for g in m.genes),
            alignment=FaceAlignment.from_proto(m.alignment) if m.HasField("alignment") else None,
        )


@dataclass(frozen=True)
class RegionShare:
    """Shares (0..1) of a map's positive and negative mass inside one landmark region."""

    region: str
    positive: float
    negative: float


@dataclass(frozen=True, eq=False)
class ExplanationMap:
    """One signed map of one face. Positive cells pull the faces together.

    The arrays are read-only float32 views of the response's bytes (a photo map is about
    1 MB, twenty of them to a response); ``np.array(m.photo)`` gives a copy to change."""

    method: str
    side: Side
    aligned: np.ndarray  # (h, w) in aligned-crop pixels
    photo: np.ndarray | None = None  # (H, W) in the submitted photo's pixels (query side)
    feature: np.ndarray | None = None  # (h', w') at the layer's resolution
    overlay_png: bytes = b""
    photo_overlay_png: bytes = b""
    regions: tuple[RegionShare, ...] = ()  # eyes, brows, nasal_bridge, nose, mouth, chin, ...
    pair_figure_png: bytes = b""  # query side, when pair figures were asked for
    # (h, w) what pictures draw when it is not ``aligned``: with region effects, contrast
    # and similarity weighted by them (each region's measured effect as its mass)
    drawn: np.ndarray | None = None

    @classmethod
    def from_proto(cls, m: phenolens_pb2.Map) -> ExplanationMap:
        return cls(m.method, _SIDES.get(m.side, "query"), from_float_array(m.aligned, copy=False),
                   optional_array(m.photo, copy=False), optional_array(m.feature, copy=False),
                   m.overlay_png, m.photo_overlay_png,
                   tuple(RegionShare(r.region, r.positive, r.negative) for r in m.regions),
                   m.pair_figure_png, optional_array(m.drawn, copy=False))

    @property
    def picture(self) -> np.ndarray:
        """(h, w) on the aligned crop: what a picture of this map draws (``drawn`` when the
        server weighted it by the region effects, else ``aligned``)."""
        return self.aligned if self.drawn is None else self.drawn

    def regions_json(self) -> dict[str, dict[str, float]]:
        """``{"eyes": {"positive": 0.1, "negative": 0.48}, ...}`` (the CLI's ``"regions"``)."""
        return {r.region: {"positive": r.positive, "negative": r.negative} for r in self.regions}

    def ranked_regions(self, sign: Literal["positive", "negative"] = "negative", *, top: int = 2,
                       min_share: float = 0.05) -> tuple[tuple[str, float], ...]:
        """The ``top`` regions by share of the ``sign`` mass (at least ``min_share`` each);
        none when that sign holds under 5 % of the map's absolute mass (as the server's
        ``explain.regions.RegionSummary.ranked``)."""
        a = np.asarray(self.aligned, np.float64)
        mass = float(np.maximum(-a if sign == "negative" else a, 0.0).sum())
        if mass < 0.05 * float(np.abs(a).sum()):
            return ()
        order = sorted(((r.region, getattr(r, sign)) for r in self.regions), key=lambda r: -r[1])
        return tuple((name, share) for name, share in order[:top] if share >= min_share)

    def describe_regions(self, sign: Literal["positive", "negative"] = "negative", *,
                         top: int = 2) -> str:
        """``"differs most: eyes 48 %, mouth 21 %"`` (``"alike most: ..."`` for positive);
        the same words as ``explain.regions.RegionSummary.describe`` on the server."""
        head = "differs most" if sign == "negative" else "alike most"
        ranked = self.ranked_regions(sign, top=top)
        if not ranked:
            return f"{head}: nowhere in particular"
        return f"{head}: " + ", ".join(f"{n.replace('_', ' ')} {round(100 * s)} %"
                                       for n, s in ranked)


OUTSIDE_FACE = "outside_face"
EFFECT_NOISE = 0.01  # |Δ cosine| below this is not named in words


@dataclass(frozen=True)
class RegionEffect:
    """What editing one region of one face does to the match's cosine (cosine units).

    differs: the cosine change when this face's region is replaced by the other face's
    (positive: the faces differ there); alike: the change when it is replaced by a neutral
    (average) face's (negative: the match leans on it). ``region`` is a summary region or
    ``outside_face`` (hair and background).
    """

    region: str
    differs: float
    alike: float


@dataclass(frozen=True)
class FaceEffects:
    """Region effects of one face of a pair, the words a clinician reads come from them."""

    side: Side
    regions: tuple[RegionEffect, ...]

    @classmethod
    def from_proto(cls, m: phenolens_pb2.FaceEffects) -> FaceEffects:
        return cls(_SIDES.get(m.side, "query"),
                   tuple(RegionEffect(r.region, r.differs, r.alike) for r in m.regions))

    def ranked(self, kind: Literal["differs", "alike"] = "differs", *, top: int = 2,
               noise: float = EFFECT_NOISE, face_only: bool = True
               ) -> tuple[tuple[str, float], ...]:
        """The ``top`` regions by effect (differs: largest gain first; alike: largest loss
        first), leaving out those within ``noise`` and, unless ``face_only`` is False,
        ``outside_face`` (worded apart by ``leans_on_outside``)."""
        sign = 1.0 if kind == "differs" else -1.0
        pairs = [(r.region, getattr(r, kind)) for r in self.regions
                 if sign * getattr(r, kind) >= noise
                 and not (face_only and r.region == OUTSIDE_FACE)]
        pairs.sort(key=lambda p: -sign * p[1])
        return tuple(pairs[:top])

    def leans_on_outside(self, *, top: int = 2) -> bool:
        """Hair or background is among the ``top`` regions the match leans on."""
        return any(r == OUTSIDE_FACE for r, _ in self.ranked("alike", top=top, face_only=False))

    def describe(self, *, top: int = 2) -> str:
        """``"differs most: eyes (+0.12), mouth (+0.04) · alike most: nose (−0.05)"``, and a
        warning when the match leans on hair or background (as the server's
        ``explain.effects.SideEffects.describe``)."""
        def words(items: tuple[tuple[str, float], ...]) -> str:
            return ", ".join(f"{region_label(r)} ({signed(v)})" for r, v in items)

        none = f"no facial region moves the match by {EFFECT_NOISE:.2f} or more"
        differs, alike = self.ranked("differs", top=top), self.ranked("alike", top=top)
        text = (f"differs most: {words(differs)}" if differs else f"differs: {none}") + \
            " · " + (f"alike most: {words(alike)}" if alike else f"alike: {none}")
        if self.leans_on_outside():
            outside = next(r.alike for r in self.regions if r.region == OUTSIDE_FACE)
            text += f" · leans on hair/background ({signed(outside)})"
        return text

    def to_json(self) -> dict[str, dict[str, float]]:
        """``{"eyes": {"differs": 0.12, "alike": -0.03}, ...}`` (the CLI's ``"effects"``)."""
        return {r.region: {"differs": r.differs, "alike": r.alike} for r in self.regions}


def region_label(name: str) -> str:
    """``nasal_bridge`` -> ``nasal bridge``; ``outside_face`` -> ``hair/background``."""
    return "hair/background" if name == OUTSIDE_FACE else name.replace("_", " ")


def signed(value: float) -> str:
    """``+0.12`` / ``−0.05`` (a true minus sign)."""
    return f"{value:+.2f}".replace("-", "\u2212")


@dataclass(frozen=True, eq=False)
class ExplainedMatch:
    """The explanation of one hit: maps on both faces, and the faces to draw them on.

    ``query_photo_source``: the query photo (H, W, 3) uint8, or a function that decodes it
    (called once a photo overlay is drawn; ``phenolens.arrays.LazyRGB``); read it as
    ``query_photo``."""

    index: int
    hit: Hit
    maps: tuple[ExplanationMap, ...]
    residual: float
    bias_share: float
    gallery_crop_png: bytes = b""
    query_crop_png: bytes = b""
    query_photo_source: PhotoSource = field(default=None, repr=False)
    effects: tuple[FaceEffects, ...] = ()  # query and gallery side, when asked for
    # The share of cosine − 1 the contrast map's sum accounts for (a first-order estimate).
    contrast_share: float | None = None

    @property
    def query_photo(self) -> np.ndarray | None:
        """(H, W, 3) uint8 query photo as submitted (None: not kept, or Pillow is absent)."""
        source = self.query_photo_source
        return source() if callable(source) else source

    @classmethod
    def from_proto(cls, m: phenolens_pb2.ExplainedMatch, *, query_crop_png: bytes = b"",
                   query_photo: PhotoSource = None) -> ExplainedMatch:
        return cls(m.index, Hit.from_proto(m.hit),
                   tuple(ExplanationMap.from_proto(x) for x in m.maps), m.residual,
                   m.bias_share, m.gallery_crop_png, query_crop_png, query_photo,
                   tuple(FaceEffects.from_proto(e) for e in m.effects),
                   m.contrast_share if m.HasField("contrast_share") else None)

    def effects_of(self, side: Side = "query") -> FaceEffects | None:
        """The region effects of one face, or None when they were not asked for."""
        return next((e for e in self.effects if e.side == side), None)

    def describe(self, side: Side = "query", method: str | None = None) -> str:
        """What a clinician reads about one face: the region effects' words when they were
        measured, else the words of ``method``'s map (shares of its mass)."""
        effects = self.effects_of(side)
        if effects is not None:
            return effects.describe()
        m = self.map(method, side)
        return f"{m.describe_regions('negative')} · {m.describe_regions('positive')} " \
            "(shares of the map's mass; region effects not measured)"

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.method for m in self.maps))

    def map(self, method: str | None = None, side: Side = "query") -> ExplanationMap:
        """The map of ``method`` (default: the first one sent) on ``side``."""
        method = method or self.methods[0]
        for m in self.maps:
            if m.method == method and m.side == side:
                return m
        raise KeyError(f"no {side} map for method {method!r}; have {self.methods}")

    def overlay(self, method: str | None = None, side: Side = "query", *,
                coords: Literal["aligned", "photo"] = "aligned", alpha: float = 0.6,
                scale: int = 1, weighted: bool = True) -> np.ndarray:
        """(H, W, 3) uint8 rendering of one map over its face (needs Pillow); aligned crops
        are enlarged ``scale`` times first (crops are small: 112 pixels for ArcFace). On the
        crop it draws ``ExplanationMap.picture`` (weighted by the region effects when the
        server sent them), or with ``weighted=False`` the method's own map; on the photo
        always the method's own (the weighting is made on the crop's regions)."""
        m = self.map(method, side)
        if coords == "photo":
            if side != "query" or m.photo is None or self.query_photo is None:
                raise ValueError("photo overlays need the query side, photo_maps=True and the "
                                 "query photo (a numpy input, or Pillow to decode it)")
            return overlay.render_overlay(self.query_photo, m.photo, alpha=alpha)
        crop_png = self.query_crop_png if side == "query" else self.gallery_crop_png
        if not crop_png:
            raise ValueError(f"the server sent no {side} crop: ask for gallery_crops=True")
        crop = decode_png(crop_png)
        if scale > 1:
            crop = np.repeat(np.repeat(crop, scale, axis=0), scale, axis=1)
        return overlay.render_overlay(crop, m.picture if weighted else m.aligned, alpha=alpha)

    def save_overlay(self, path: str | Path, method: str | None = None,
                     side: Side | Literal["both"] = "both", *,
                     coords: Literal["aligned", "photo"] = "aligned", alpha: float = 0.75,
                     scale: int = 2) -> Path:
        """Write a PNG: one face with its map, or (``side="both"``) query | gallery side by side.

        Red cells pull the faces together, blue cells push them apart (for ``contrast``:
        blue marks what differs from the other face); a legend line says so under the faces."""
        if side == "both":
            return overlay.save_png(
                self.overlay_pair(method, coords=coords, alpha=alpha, scale=scale), path)
        return overlay.save_png(
            self.overlay(method, side, coords=coords, alpha=alpha, scale=scale), path)

    def overlay_pair(self, method: str | None = None, *,
                     coords: Literal["aligned", "photo"] = "aligned", alpha: float = 0.75,
                     scale: int = 2) -> np.ndarray:
        """(H, W, 3) uint8: query | gallery overlays side by side (``coords`` for the
        query), with the legend in words under them (needs Pillow). Both faces are drawn
        alike: weighted by the region effects when the server sent them and the query is
        on its crop, else with the method's own maps."""
        weighted = coords == "aligned" and self.map(method).drawn is not None
        row = overlay.side_by_side(
            [self.overlay(method, "query", coords=coords, alpha=alpha, scale=scale),
             self.overlay(method, "gallery", alpha=alpha, scale=scale, weighted=weighted)])
        name = method or (self.methods[0] if self.methods else None)
        return np.concatenate([row, overlay.legend_strip(row.shape[1], name, weighted=weighted)])


@dataclass(frozen=True, eq=False)
class ExplainResult:
    match: MatchResult
    explanations: tuple[ExplainedMatch, ...]
    query_crop_png: bytes = b""

    @classmethod
    def from_proto(cls, m: phenolens_pb2.ExplainResponse, *,
                   query_photo: PhotoSource = None) -> ExplainResult:
        return cls(MatchResult.from_proto(m.match),
                   tuple(ExplainedMatch.from_proto(e, query_crop_png=m.query_crop_png,
                                                   query_photo=query_photo)
                         for e in m.explanations),
                   m.query_crop_png)


@dataclass(frozen=True)
class EncoderInfo:
    name: str
    version: str
    embedding_dim: int
    input_size: tuple[int, int]
    alignment: str


@dataclass(frozen=True)
class ServerInfo:
    server_version: str
    api_version: str
    encoder_id: str
    encoders: tuple[EncoderInfo, ...]
    view_scheme: str
    gallery_version: int
    gallery_size: int
    limits: dict[str, float]
    explain_methods: tuple[str, ...]
    default_explain_methods: tuple[str, ...]
    features: tuple[str, ...]

    @classmethod
    def from_proto(cls, m: phenolens_pb2.ServerInfo) -> ServerInfo:
        limits = {f.name: getattr(m.limits, f.name) for f in m.limits.DESCRIPTOR.fields}
        return cls(
            m.server_version, m.api_version, m.encoder_id,
            tuple(EncoderInfo(e.name, e.version, e.embedding_dim, (e.input_height, e.input_width),
                              e.alignment) for e in m.encoders),
            m.view_scheme, m.gallery_version, m.gallery_size, limits,
            tuple(m.explain_methods), tuple(m.default_explain_methods), tuple(m.features),
        )


@dataclass(frozen=True, eq=False)
class GalleryImage:
    record: GalleryRecord
    aligned_crop_png: bytes
    embedding: np.ndarray | None  # (V, D)

    @classmethod
    def from_proto(cls, m: gallery_pb2.GalleryImage) -> GalleryImage:
        return cls(GalleryRecord.from_proto(m.record), m.aligned_crop_png,
                   optional_array(m.embedding))


@dataclass(frozen=True)
class Page:
    records: tuple[GalleryRecord, ...]
    next_page_token: str
    total: int


@dataclass(frozen=True)
class ImportSummary:
    received: int
    added: int
    unchanged: int
    gallery_version: int


@dataclass(frozen=True)
class SyndromeCount:
    syndrome_id: str
    syndrome_name: str
    images: int
    subjects: int


@dataclass(frozen=True)
class GalleryStats:
    images: int
    subjects: int
    syndromes: int
    per_syndrome: tuple[SyndromeCount, ...]
    imbalance: float
    gallery_version: int
    encoder_id: str
    view_scheme: str

    @classmethod
    def from_proto(cls, m: gallery_pb2.GalleryStatsResponse) -> GalleryStats:
        return cls(m.images, m.subjects, m.syndromes,
                   tuple(SyndromeCount(s.syndrome_id, s.syndrome_name, s.images, s.subjects)
                         for s in m.per_syndrome),
                   m.imbalance, m.gallery_version, m.encoder_id, m.view_scheme)
