"""What a reader of an explanation is shown, drawn from the explain results (no protobuf).

``Presentation`` says what to draw for one call; ``present_match`` turns one explained
hit into its region summaries, the arrays to send and the PNG pictures asked for
(overlays, photo overlays, pair figures), through ``explain.render``. The servicer,
``phenolens report`` and ``phenolens explain`` all get their pictures here, so
``server.convert`` only copies values into messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gallery import Hit
from gallery.calibration import Confidence
from gallery.png import encode_png
from server.backend import HitExplanation

if TYPE_CHECKING:
    from encoder.pipeline import Face
    from explain.attribution.matches import MatchMaps, MethodMaps
    from explain.regions import RegionSummary


@dataclass(frozen=True)
class Presentation:
    """What to send beside each method's maps on the two aligned crops.

    overlays: each map drawn over its face (and over the query's photo, with photo maps);
    pair_figures: both faces and their maps in one figure with the words;
    gallery_crops: the hits' stored crops; photo_maps: the query's maps on its photo
    (downscaled to the server's longer-side limit); feature_maps: the maps at feature
    resolution, for methods that have them.
    """

    overlays: bool = False
    pair_figures: bool = False
    gallery_crops: bool = False
    photo_maps: bool = False
    feature_maps: bool = False

    @property
    def query_crop(self) -> bool:
        """Whether the query's aligned crop is sent (the pictures are drawn on it)."""
        return self.overlays or self.gallery_crops

    @property
    def photo_overlays(self) -> bool:
        return self.overlays and self.photo_maps


@dataclass(frozen=True, eq=False)
class PresentedMap:
    """One method's maps of one pair as a reader gets them.

    query_aligned/gallery_aligned (H, W) float32 on the aligned crops, with their region
    summaries; query_feature/gallery_feature (h, w) when feature maps were asked and the
    method has them; query_photo (H', W') on the (downscaled) photo, with photo maps;
    the PNGs asked for (else b""). ``source``: ``explain_matches``'s maps (native
    resolution, forward passes, seconds).
    """

    source: MethodMaps
    query_aligned: np.ndarray
    gallery_aligned: np.ndarray
    query_regions: RegionSummary
    gallery_regions: RegionSummary
    query_feature: np.ndarray | None = None
    gallery_feature: np.ndarray | None = None
    query_photo: np.ndarray | None = None
    query_overlay_png: bytes = b""
    gallery_overlay_png: bytes = b""
    photo_overlay_png: bytes = b""
    pair_figure_png: bytes = b""
    query_drawn: np.ndarray | None = None  # what the pictures draw, when not *_aligned
    gallery_drawn: np.ndarray | None = None

    @property
    def method(self) -> str:
        return self.source.method


@dataclass(frozen=True, eq=False)
class PresentedMatch:
    """One explained hit as a reader gets it: ``rank`` (1 = best) among the match's hits,
    its calibrated confidence, each method's PresentedMap and, when asked, the gallery
    face's stored crop PNG."""

    rank: int
    explained: HitExplanation
    confidence: Confidence | None
    maps: tuple[PresentedMap, ...]
    gallery_crop_png: bytes = b""

    @property
    def hit(self) -> Hit:
        return self.explained.hit

    @property
    def pair(self) -> MatchMaps:
        return self.explained.maps


def query_crop_png(face: Face | None, presentation: Presentation) -> bytes:
    """The query's aligned crop as PNG when the pictures need it (else b"")."""
    return encode_png(face.crop) if presentation.query_crop and face is not None else b""


def display_photo(photo: np.ndarray | None, presentation: Presentation,
                  max_side: int) -> np.ndarray | None:
    """The query photo (H, W, 3) uint8 that photo overlays are drawn on, its longer side at
    most ``max_side`` (the photo maps' size); None when no photo overlay is asked for."""
    if photo is None or not presentation.photo_overlays:
        return None
    import cv2

    h, w = photo.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return photo
    return cv2.resize(photo, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)


def present_match(e: HitExplanation, *, rank: int, confidence: Confidence | None,
                  query_crop: np.ndarray, query_photo: np.ndarray | None,
                  presentation: Presentation) -> PresentedMatch:
    """``e`` with every method's maps presented (``present_maps``); ``query_crop`` (H, W, 3)
    uint8, ``query_photo`` the photo that photo overlays are drawn on (``display_photo``)."""
    maps = present_maps(e.maps, e.photo_maps, presentation, hit=e.hit, query_crop=query_crop,
                        gallery_crop=e.gallery_crop, query_photo=query_photo)
    return PresentedMatch(rank, e, confidence, maps,
                          e.gallery_crop_png if presentation.gallery_crops else b"")


def present_maps(pair: MatchMaps, photo_maps: Sequence[np.ndarray | None] | None = None,
                 presentation: Presentation = Presentation(), *, hit: Hit | None = None,
                 query_crop: np.ndarray | None = None, gallery_crop: np.ndarray | None = None,
                 query_photo: np.ndarray | None = None) -> tuple[PresentedMap, ...]:
    """Each method's maps of ``pair`` with their region summaries and the pictures
    ``presentation`` asks for: drawn on the (H, W, 3) uint8 crops and ``query_photo``, the
    pair figure titled with ``hit``'s gallery cosine and names and worded by the pair's
    region effects when it has them."""
    from explain.regions import region_summary
    from explain.render import overlay_png, pair_figure

    words = None if pair.effects is None else (pair.effects.query.describe(),
                                               pair.effects.gallery.describe())
    out = []
    for m, photo in zip(pair.maps, photo_maps or (None,) * len(pair.maps), strict=True):
        qa = np.asarray(m.query_aligned, np.float32)
        ga = np.asarray(m.gallery_aligned, np.float32)
        feature = presentation.feature_maps and m.resolution == "feature"
        drawn_q, drawn_g, note = drawn_maps(pair, m)
        pictures: dict[str, bytes] = {}
        if presentation.pair_figures:
            pictures["pair_figure_png"] = pair_figure(
                query_crop, gallery_crop, drawn_q, drawn_g, cosine=hit.score,
                label=hit.syndrome_name or hit.syndrome_id, method=m.method,
                gallery_name=face_name(hit), words=words, note=note)
        if presentation.overlays:
            pictures["query_overlay_png"] = overlay_png(query_crop, drawn_q)
            pictures["gallery_overlay_png"] = overlay_png(gallery_crop, drawn_g)
            if query_photo is not None and photo is not None:
                pictures["photo_overlay_png"] = overlay_png(query_photo, photo)
        weighted = is_weighted(pair, m)
        out.append(PresentedMap(m, qa, ga, region_summary(qa), region_summary(ga),
                                m.query if feature else None, m.gallery if feature else None,
                                photo, **pictures, query_drawn=drawn_q if weighted else None,
                                gallery_drawn=drawn_g if weighted else None))
    return tuple(out)


def drawn_maps(pair: MatchMaps, m: MethodMaps) -> tuple[np.ndarray, np.ndarray, str | None]:
    """What a picture of ``m``'s maps shows, query and gallery (H, W) on the aligned crops,
    and the grey note under its title. With region effects, contrast and similarity are
    drawn weighted (``explain.effects.weighted_map``): each region's measured effect as its
    mass, the method's shading inside it, so the picture and the words agree on which
    region matters. The arrays sent and saved stay the method's own."""
    from explain.effects import WEIGHTED_KIND
    from explain.render import sum_note, weighted_note

    qa = np.asarray(m.query_aligned, np.float32)
    ga = np.asarray(m.gallery_aligned, np.float32)
    if not is_weighted(pair, m):
        return qa, ga, sum_note(m.method, pair.contrast_share)
    kind = WEIGHTED_KIND[m.method]
    return (pair.effects.weighted("query", kind, qa), pair.effects.weighted("gallery", kind, ga),
            weighted_note(m.method, pair.contrast_share))


def is_weighted(pair: MatchMaps, m: MethodMaps) -> bool:
    """Whether ``m``'s pictures draw its maps weighted by ``pair``'s region effects."""
    from explain.effects import WEIGHTED_KIND

    return pair.effects is not None and m.method in WEIGHTED_KIND


def face_name(h: Hit) -> str:
    """How the gallery names a face: subject and image id (never a bare row id)."""
    return " · ".join(p for p in (h.subject_id and f"subject {h.subject_id}",
                                  h.image_id and f"image {h.image_id}") if p)
