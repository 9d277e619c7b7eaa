"""Region effects: what editing one facial region does to a match's cosine — the model's own
answer to "which region matters", in the unit the user sees.

For a pair (q, g) and a region R of the aligned crop (``EFFECT_REGIONS``):

- *differs* on the query side = ``cos(q with g's R, g) − cos(q, g)``: "if the query had the
  match's eyes, the similarity would rise by 0.12" (positive: the faces differ there);
- *alike* on the query side = ``cos(q with a neutral R, g) − cos(q, g)``: "without its nose the
  match would drop by 0.05" (negative: the match leans on the region);
- the gallery side is the same with the roles swapped (g with q's R; g with a neutral R).

Every view of the ensemble is edited and the view cosines averaged, as the cosine itself is.
The neutral face is the pixel-wise mean of aligned faces (``mean_face``; the server uses the
bundled photos' mean, so a pair's words do not change when unrelated gallery records do).

Two ways to make the edit, one contract:

- ``pixels`` (served): the region is pasted into the aligned crop (colour-matched to the
  target inside the region, feathered edge; ``paste_region``) and the edited crops go
  through the encoder. This *is* the question the words answer. It is made affordable
  without changing the answer: bf16 forwards (a bf16 copy of the encoder); the encoder's
  high-resolution early layers run only on a window around the region (exact,
  ``encoder.spec.EarlySplit``); every view of one encoder in one pass; the query's
  neutral edits once per call and kept by the query's pixels for the next calls
  (``QUERY_EDITS_KEPT``); a gallery face's neutral edits kept between calls
  (``NeutralEdits``, the server's feature cache).
- ``features`` (research): the same edit made on the encoder's ``contrast_layer``
  activations (SFace: the last 14×14 block) with the region's feathered mask averaged over
  each cell, followed by the network's tail only — about 1/20 of a forward per edit on
  SFace, but it names the pixel edits' first region in only half the pairs
  (``phenolens evaluate effects`` measures it).

No gradients and no hooks: every edit is a plain batched forward under ``torch.no_grad``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import cv2
import numpy as np
import torch

from encoder.spec import FaceEncoder
from explain.limits import Guard
from explain.regions import SUMMARY_REGIONS, first_region_stack, template_regions

# Summary regions, then everything outside the face (hair, background): a match that leans
# on it is one a clinician must be warned about.
OUTSIDE_FACE = "outside_face"
EFFECT_REGIONS: tuple[str, ...] = (*SUMMARY_REGIONS, OUTSIDE_FACE)
NOISE = 0.01  # |Δ cosine| below this is not named in words
EFFECT_MODES = ("features", "pixels")
EffectKind = Literal["differs", "alike"]

# Paste geometry in units of the inter-ocular distance d (shared with evaluate swap).
COLOUR_GROW = 0.25  # colour statistics are taken in the region grown by this
FEATHER_GROW = 0.10  # the paste mask is grown by this before blurring
FEATHER_SIGMA = 0.06  # Gaussian sigma of the alpha's blur
PIXEL_BATCH = 8  # edited crops per forward (× views): SFace in channels-last bf16 on one CPU
# thread is fastest per image at 8 images a batch (4.7 ms; 1 image 7.7 ms, 32 images 7.7 ms;
# float32 contiguous, as the encoder serves: 14.7 ms for one image)
LATE_BATCH = 32  # edited crops x views per pass through the layers after the early windows:
# SFace's late layers in bf16 on one CPU thread take 2.15 ms a crop at 16-32 a pass (the
# activations stay in cache), 2.5 ms at 4 and 3.1 ms at 64
PRECISIONS = ("bf16", "fp32")
FEATURE_BATCH = 96  # at most this many edited activations per tail batch (``features``)
# A server's (cancellable) call sizes its batches by time (``Guard.batches``), so it stops
# within about ``explain.limits.BATCH_TARGET_S`` of its deadline.


def region_label(name: str) -> str:
    """``nasal_bridge`` -> ``nasal bridge``; ``outside_face`` -> ``hair/background``."""
    return "hair/background" if name == OUTSIDE_FACE else name.replace("_", " ")


@dataclass(frozen=True)
class SideEffects:
    """Per region (``regions``), the cosine change of two edits of one face of a pair.

    differs[i]: this face's region i replaced by the other face's (positive: they differ
    there); alike[i]: this face's region i replaced by the neutral face's (negative: the
    match leans on it). Both in cosine units, view-averaged.
    """

    regions: tuple[str, ...]
    differs: tuple[float, ...]
    alike: tuple[float, ...]

    def ranked(self, kind: EffectKind = "differs", *, top: int = 2, noise: float = NOISE,
               face_only: bool = True) -> tuple[tuple[str, float], ...]:
        """The ``top`` regions by effect: differs, largest gain first; alike, largest loss
        first. Regions whose effect is within ``noise`` are left out, and ``outside_face``
        unless ``face_only`` is False (it is worded apart: ``leans_on_outside``)."""
        values = self.differs if kind == "differs" else self.alike
        sign = 1.0 if kind == "differs" else -1.0
        pairs = [(r, v) for r, v in zip(self.regions, values, strict=True)
                 if sign * v >= noise and not (face_only and r == OUTSIDE_FACE)]
        pairs.sort(key=lambda p: -sign * p[1])
        return tuple(pairs[:top])

    def outside(self, kind: EffectKind = "alike") -> float | None:
        """The ``outside_face`` effect, when measured."""
        values = self.differs if kind == "differs" else self.alike
        return dict(zip(self.regions, values, strict=True)).get(OUTSIDE_FACE)

    def leans_on_outside(self, *, top: int = 2) -> bool:
        """Hair or background is among the ``top`` regions the match leans on."""
        return any(r == OUTSIDE_FACE for r, _ in self.ranked("alike", top=top, face_only=False))

    def describe(self, *, top: int = 2) -> str:
        """``"differs most: eyes (+0.12), mouth (+0.04) · alike most: nose (−0.05)"``, and a
        warning when the match leans on hair or background."""
        outside = self.outside("alike") if self.leans_on_outside() else None
        return describe_effects(self.ranked("differs", top=top), self.ranked("alike", top=top),
                                outside)

    def to_json(self) -> dict[str, dict[str, float]]:
        """``{"eyes": {"differs": 0.12, "alike": -0.03}, ...}`` (the CLI's ``"effects"``)."""
        return {r: {"differs": d, "alike": a}
                for r, d, a in zip(self.regions, self.differs, self.alike, strict=True)}


def describe_effects(differs: Sequence[tuple[str, float]], alike: Sequence[tuple[str, float]],
                     outside: float | None = None) -> str:
    """Words for ranked effects (the client's ``FaceEffects.describe`` says the same)."""
    def words(items: Sequence[tuple[str, float]]) -> str:
        return ", ".join(f"{region_label(r)} ({signed(v)})" for r, v in items)

    none = f"no facial region moves the match by {NOISE:.2f} or more"
    text = (f"differs most: {words(differs)}" if differs else f"differs: {none}") + " · " + \
        (f"alike most: {words(alike)}" if alike else f"alike: {none}")
    if outside is not None:
        text += f" · leans on hair/background ({signed(outside)})"
    return text


def signed(value: float) -> str:
    """``+0.12`` / ``−0.05`` (a true minus sign)."""
    return f"{value:+.2f}".replace("-", "\u2212")


@dataclass(frozen=True)
class PairEffects:
    """Region effects on both faces of one (query, hit) pair; ``cosine`` the pair's own."""

    cosine: float
    query: SideEffects
    gallery: SideEffects
    mode: str  # "features" or "pixels"

    def side(self, name: str) -> SideEffects:
        return self.query if name == "query" else self.gallery

    def weighted(self, side: str, kind: EffectKind, aligned_map: np.ndarray) -> np.ndarray:
        """``weighted_map`` of one face's ``kind`` effects, spread as ``aligned_map``."""
        effects = self.side(side)
        values = effects.differs if kind == "differs" else effects.alike
        return weighted_map(aligned_map, values, effects.regions)


# The drawn maps when a match's effects are measured: the map each kind of effect weights
# (contrast pictures where the faces differ, similarity what pulls them together).
WEIGHTED_KIND: dict[str, EffectKind] = {"contrast": "differs", "similarity": "alike"}
WEIGHT_FLOOR = 0.25  # inside a region, every pixel weighs at least this x the map's mean there


def weighted_map(aligned_map: np.ndarray, values: Sequence[float],
                 regions: tuple[str, ...] = EFFECT_REGIONS) -> np.ndarray:
    """A signed map whose mass in each region is minus that region's effect (``values``, one
    per region: a side's ``differs`` or ``alike``), spread inside the region as
    ``aligned_map``'s magnitude is, with a floor of ``WEIGHT_FLOOR`` of its mean there (so a
    region's effect is never squeezed into a few pixels; uniform where the map is zero).

    The maps' convention holds: negative where the faces differ (a region whose swap would
    raise the cosine by 0.12 carries −0.12), positive where the match leans (a region whose
    neutral edit would lower it by 0.05 carries +0.05). So the map answers "where inside the
    region" (the method's picture) and "how much" (the model's measured effect), and the
    words and the picture cannot disagree about which region matters. Its sum is minus the
    sum of the region effects, each measured alone (not ``cosine − 1``).

    aligned_map: (H, W) on the ArcFace template (a method's ``*_aligned`` map; any size).
    Returns (H, W) float32.
    """
    m = np.asarray(aligned_map, np.float64)
    stack = _stack(tuple(m.shape), tuple(regions))
    out = np.zeros_like(m)
    for mask, value in zip(stack, values, strict=True):
        mass = -float(value)
        if mass == 0.0 or not mask.any():
            continue
        magnitude = np.where(mask, np.abs(m), 0.0)
        weights = magnitude + WEIGHT_FLOOR * magnitude[mask].mean() * mask
        total = weights.sum()
        if total <= 0.0:
            weights, total = mask.astype(np.float64), float(mask.sum())
        out += mass * weights / total
    return out.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _stack(size: tuple[int, int], regions: tuple[str, ...]) -> np.ndarray:
    stack = effect_region_stack(size, regions)
    stack.flags.writeable = False
    return stack


# ---- edits in the aligned crop ---------------------------------------------------------------

@dataclass(frozen=True)
class EditMasks:
    """Per region of ``regions``: alpha (H, W) float32 in 0..1 (the feathered paste mask) and
    colour (H, W) bool (where colour statistics are matched)."""

    regions: tuple[str, ...]
    alpha: np.ndarray  # (R, H, W)
    colour: np.ndarray  # (R, H, W)

    def cells(self, grid: tuple[int, int]) -> np.ndarray:
        """(R, h, w) float32: the mean alpha over each cell of a feature grid."""
        return np.stack([cv2.resize(a, (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
                         for a in self.alpha]).astype(np.float32)


def effect_region_stack(size: tuple[int, int] = (112, 112),
                        regions: tuple[str, ...] = EFFECT_REGIONS) -> np.ndarray:
    """(R, H, W) bool: ``regions`` on the ArcFace template at ``size``, disjoint (a pixel
    belongs to the first that holds it; ``outside_face`` is the template's background)."""
    names = tuple("background" if r == OUTSIDE_FACE else r for r in regions)
    return first_region_stack(template_regions(size), names)


@functools.lru_cache(maxsize=8)
def edit_masks(size: tuple[int, int] = (112, 112),
               regions: tuple[str, ...] = EFFECT_REGIONS) -> EditMasks:
    """Feathered paste masks of ``regions`` on the ArcFace template at ``size`` (aligned crops
    are warped onto it). Regions are disjoint before feathering (a pixel belongs to the first
    summary region that holds it; ``outside_face`` is everything outside the face ellipse)."""
    from encoder.align import ARCFACE_TEMPLATE_112

    stack = effect_region_stack(size, regions)
    eyes = np.asarray(ARCFACE_TEMPLATE_112[:2], np.float64)
    d = float(np.linalg.norm(eyes[1] - eyes[0])) * size[1] / 112.0  # inter-ocular distance

    def kernel(fraction: float) -> np.ndarray:
        k = max(3, int(fraction * d) | 1)
        return np.ones((k, k), np.uint8)

    alphas, colours = [], []
    for m in stack.astype(np.float32):
        colours.append(cv2.dilate(m, kernel(COLOUR_GROW)) > 0)
        a = cv2.GaussianBlur(cv2.dilate(m, kernel(FEATHER_GROW)), (0, 0),
                             max(1.0, FEATHER_SIGMA * d))
        alphas.append(np.clip(a, 0.0, 1.0))
    alpha, colour = np.stack(alphas), np.stack(colours)
    alpha.flags.writeable = colour.flags.writeable = False
    return EditMasks(tuple(regions), alpha, colour)


def paste_region(target: np.ndarray, donor: np.ndarray, alpha: np.ndarray,
                 colour: np.ndarray) -> np.ndarray:
    """``target`` with ``donor`` pasted where ``alpha`` > 0: the donor matched per channel
    (mean/std) to the target inside ``colour``, blended with the feathered ``alpha``.

    target, donor (H, W, 3) uint8 in one frame (aligned crops); alpha (H, W) in 0..1;
    colour (H, W) bool. Returns (H, W, 3) uint8.
    """
    return _blend(target, donor, alpha, _colour_stats(target, colour),
                  _colour_stats(donor, colour), _box(alpha))


def _colour_stats(face: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (mean, std) of ``face`` inside ``colour``, in float32."""
    values = face[colour].astype(np.float32)
    return values.mean(0), values.std(0)


def _blend(target: np.ndarray, donor: np.ndarray, alpha: np.ndarray,
           target_stats: tuple[np.ndarray, np.ndarray], donor_stats: tuple[np.ndarray, np.ndarray],
           box: tuple[slice, slice] | None) -> np.ndarray:
    """``paste_region`` from the two faces' ``_colour_stats`` and the alpha's ``_box``."""
    scale = (target_stats[1] + 1e-6) / (donor_stats[1] + 1e-6)
    shift = target_stats[0] - donor_stats[0] * scale
    out = target.copy()  # outside the alpha's box the target is kept as it is
    if box is None:
        return out
    a = alpha[box][..., None]
    t = target[box].astype(np.float32)
    matched = donor[box].astype(np.float32) * scale + shift
    out[box] = np.clip(np.rint(a * matched + (1 - a) * t), 0, 255).astype(np.uint8)
    return out


def _box(alpha: np.ndarray) -> tuple[slice, slice] | None:
    """The smallest (rows, cols) box holding every pixel where ``alpha`` > 0, or None."""
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    if not len(rows):
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def edited_crops(target: np.ndarray, donor: np.ndarray, masks: EditMasks) -> np.ndarray:
    """(R, H, W, 3) uint8: ``target`` with each region of ``masks`` pasted from ``donor``."""
    pastes = _Pastes(masks)
    return pastes.edited(target, donor, pastes.stats(target), pastes.stats(donor))


class _Pastes:
    """``edited_crops`` for many pairs of a few faces: each region's box is taken once, and
    a face's colour statistics per region (``stats``) once, kept under ``key`` for faces
    met in every call (the query, the neutral face). The same pixels as ``paste_region``."""

    def __init__(self, masks: EditMasks) -> None:
        self.masks = masks
        self.boxes = [_box(a) for a in masks.alpha]
        self._kept: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def stats(self, face: np.ndarray, key: str | None = None
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        found = None if key is None else self._kept.get(key)
        if found is None:
            found = [_colour_stats(face, c) for c in self.masks.colour]
            if key is not None:
                self._kept[key] = found
        return found

    def edited(self, target: np.ndarray, donor: np.ndarray, target_stats: list,
               donor_stats: list) -> np.ndarray:
        return np.stack([_blend(target, donor, a, ts, ds, box) for a, ts, ds, box in zip(
            self.masks.alpha, target_stats, donor_stats, self.boxes, strict=True)])


def mean_face(crops: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the pixel-wise mean of (N, H, W, 3) aligned crops (the neutral face)."""
    crops = np.asarray(crops)
    if crops.ndim != 4 or len(crops) == 0:
        raise ValueError(f"mean_face needs (N, H, W, 3) crops, got shape {crops.shape}")
    return np.clip(np.rint(crops.astype(np.float64).mean(0)), 0, 255).astype(np.uint8)


# ---- the neutral face -------------------------------------------------------------------

class NeutralFace:
    """The neutral face (H, W, 3) uint8 and, per explainer, its contrast-layer activations
    (encoded once, for the ``features`` edits; thread-safe, so a server keeps one for its
    lifetime)."""

    def __init__(self, crop: np.ndarray) -> None:
        self.crop = np.ascontiguousarray(crop, dtype=np.uint8)
        self.digest = hashlib.sha256(self.crop.data).hexdigest()  # names its pixels
        self._fine: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def fine_maps(self, explainer) -> tuple[torch.Tensor, ...]:
        """One (1, C_f, h, w) tensor per view of ``explainer``."""
        with self._lock:
            if explainer not in self._fine:
                self._fine[explainer] = explainer.encode(self.crop).fine_maps
            return self._fine[explainer]


class KeptEdits(dict):
    """``NeutralEdits`` in a plain dict, hit index -> embeddings (a caller that explains the
    same hits again; the server keeps them in its feature cache instead)."""

    def put(self, index: int, embeddings: Sequence[torch.Tensor]) -> None:
        self[index] = embeddings


# A query's neutral edits (9 crops x views) depend on its pixels, not on its hits: the last
# QUERY_EDITS_KEPT queries' are kept by content (a few KB each), so Match, Explain and the
# report of one photo make them once.
QUERY_EDITS_KEPT = 32
_QUERY_EDITS: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
_QUERY_EDITS_LOCK = threading.Lock()


def _kept_query_edits(key: tuple) -> list[torch.Tensor] | None:
    with _QUERY_EDITS_LOCK:
        found = _QUERY_EDITS.get(key)
        if found is not None:
            _QUERY_EDITS.move_to_end(key)
        return found


def _keep_query_edits(key: tuple, embeddings: list[torch.Tensor]) -> None:
    with _QUERY_EDITS_LOCK:
        _QUERY_EDITS[key] = embeddings
        _QUERY_EDITS.move_to_end(key)
        while len(_QUERY_EDITS) > QUERY_EDITS_KEPT:
            _QUERY_EDITS.popitem(last=False)


def forget_query_edits() -> None:
    """Drop every kept query's neutral edits (the next call makes them again)."""
    with _QUERY_EDITS_LOCK:
        _QUERY_EDITS.clear()


def as_neutral(neutral: np.ndarray | NeutralFace) -> NeutralFace:
    return neutral if isinstance(neutral, NeutralFace) else NeutralFace(neutral)


_BUNDLED: dict[str, NeutralFace] = {}
_BUNDLED_LOCK = threading.Lock()


def bundled_neutral(pipeline=None) -> NeutralFace:
    """The mean aligned face of the bundled photos (``encoder.assets.PHOTOS``: every face of
    every photo, 15 for the ArcFace template), computed once per template size and kept in
    ``data/cache``. A fixed reference, so a pair's effects do not change when unrelated
    gallery records do."""
    from encoder.align import get_template
    from encoder.assets import CACHE_DIR, PHOTOS
    from encoder.pipeline import FacePipeline

    pipeline = pipeline or FacePipeline()
    template = pipeline.template
    with _BUNDLED_LOCK:
        if template in _BUNDLED:
            return _BUNDLED[template]
        path = CACHE_DIR / f"neutral-face-{template}.npy"
        if path.is_file():
            crop = np.load(path)
        else:
            crops = []
            for photo in PHOTOS:
                if not photo.path.exists():
                    continue
                if photo.aligned:
                    crops.append(pipeline.face(photo.path, aligned=True).crop)
                else:
                    crops.extend(face.crop for face in pipeline.faces(photo.path))
            if not crops:
                raise FileNotFoundError(f"no bundled photos to make the neutral face from and no "
                                        f"{path}: run `make setup` (python -m encoder.assets fetch)")
            crop = mean_face(np.stack(crops))
            try:  # a read-only install (a container's root) keeps it in memory only
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, crop)
                tmp.replace(path)
            except OSError:
                pass
        if crop.shape[:2] != get_template(template).size:
            raise ValueError(f"{path} does not hold a {template} crop: delete it")
        _BUNDLED[template] = NeutralFace(crop)
        return _BUNDLED[template]


# ---- the effects ---------------------------------------------------------------------------

class NeutralEdits(Protocol):
    """Where the hits' neutral edits are kept between calls (they depend on the hit's crop
    and the model, never on the query): ``get(k)`` for hit k of the call, or None;
    ``put(k, embeddings)``, one (R, D) unit tensor per view. The server keeps them beside
    the hit's cached features, so they are forgotten with them (``server.feature_cache``)."""

    def get(self, index: int) -> Sequence[torch.Tensor] | None: ...

    def put(self, index: int, embeddings: Sequence[torch.Tensor]) -> None: ...


class RegionEffects:
    """Region effects of one query against its hits (request-scoped; not thread-safe).

    explainer: an ``explain.attribution.engine.Explainer``; query: FaceFeatures of one face
    with its crop (``Explainer.encode`` keeps it); neutral: the neutral face (``mean_face``
    of some aligned faces, or ``bundled_neutral()``); mode: "pixels" (edited crops through
    the whole encoder, the served default) or "features" (edits of the contrast layer + the
    network tail). ``guard`` is polled between batches and charged one forward pass per
    edited crop and view (a tail pass as ``1/TAIL_PASSES_PER_FORWARD`` of one). The query's
    neutral edits are made once and shared by every hit, and kept by the query's pixels
    for later calls (not charged again). ``precision``: the edited crops' forwards in
    "bf16" (a bf16 copy of the encoder; on the 56 pairs of the bundled photos every effect
    within 0.0038 of float32 forwards of the whole edited crops, under the words'
    ``NOISE``, and the same first region named on all 112 faces) or "fp32"; the pair's
    own cosine, the reference of every change, stays the float32 one.
    """

    def __init__(self, explainer, query, *, neutral: np.ndarray | NeutralFace,
                 mode: str = "pixels", regions: tuple[str, ...] = EFFECT_REGIONS,
                 guard: Guard | None = None, precision: str = "bf16") -> None:
        from explain.errors import InvalidOption

        if precision not in PRECISIONS:
            raise InvalidOption(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")
        self.precision = precision
        if mode not in EFFECT_MODES:
            raise InvalidOption(f"unknown effects mode {mode!r}; known: {list(EFFECT_MODES)}")
        if query.crops is None:
            raise InvalidOption("region effects need the faces' aligned crops")
        self.explainer, self.query, self.mode = explainer, query, mode
        self.neutral = as_neutral(neutral)
        self.regions = tuple(regions)
        self.masks = edit_masks(tuple(query.crop_size), self.regions)
        self.guard = guard or Guard()
        self._query_alike: list[torch.Tensor] | None = None  # per view (R, D), unit
        self._early_query: dict[int, torch.Tensor] = {}  # per view, the query's early layers
        self._windows: dict[tuple[int, int], tuple] = {}  # (region, view) -> _window
        self._pastes = _Pastes(self.masks)  # the query's and neutral face's colour statistics

    def of(self, hits, kept: NeutralEdits | None = None) -> list[PairEffects]:
        """PairEffects of the query with each of ``hits`` (FaceFeatures with crops), in
        order; ``kept``: the hits' neutral edits from earlier calls (pixel mode)."""
        from explain.errors import InvalidOption

        if hits.crops is None:
            raise InvalidOption("region effects need the faces' aligned crops")
        if self.mode == "pixels":
            q_diff, g_diff, g_alike, q_alike = self._pixel_edits(hits, kept)
        else:
            q_diff, g_diff, g_alike, q_alike = self._feature_edits(hits)
        q_units = [_unit(e[0:1])[0] for e in self.query.embeddings]
        g_units = [_unit(e) for e in hits.embeddings]
        views = range(len(q_units))

        def mean(values) -> np.ndarray:
            return np.mean([v.double().numpy() for v in values], axis=0)

        base = mean([g_units[v] @ q_units[v] for v in views])  # (K,)
        qd = mean([(q_diff[v] * g_units[v][:, None]).sum(-1) for v in views]) - base[:, None]
        gd = mean([g_diff[v] @ q_units[v] for v in views]) - base[:, None]
        ga = mean([g_alike[v] @ q_units[v] for v in views]) - base[:, None]
        qa = mean([g_units[v] @ q_alike[v].T for v in views]) - base[:, None]
        return [PairEffects(float(base[k]),
                            SideEffects(self.regions, _floats(qd[k]), _floats(qa[k])),
                            SideEffects(self.regions, _floats(gd[k]), _floats(ga[k])),
                            self.mode)
                for k in range(len(base))]

    # -- pixels: edited crops through the whole encoder ------------------------------------
    def _pixel_edits(self, hits, kept: NeutralEdits | None):
        q_crop, neutral = self.query.crops[0], self.neutral.crop
        k_count, r_count = len(hits), len(self.regions)
        known = [None if kept is None else kept.get(k) for k in range(k_count)]
        todo = [k for k in range(k_count) if known[k] is None]
        parts, targets = [], []  # edited crops; which face each edits (0 query, 1 + k hit k)
        paste = self._pastes
        q_stats, n_stats = paste.stats(q_crop, "query"), paste.stats(neutral, "neutral")
        g_stats = [paste.stats(crop) for crop in hits.crops]
        for k in range(k_count):
            g_crop = hits.crops[k]
            parts += [paste.edited(q_crop, g_crop, q_stats, g_stats[k]),
                      paste.edited(g_crop, q_crop, g_stats[k], q_stats)]
            targets += [0] * r_count + [1 + k] * r_count
        parts += [paste.edited(hits.crops[k], neutral, g_stats[k], n_stats) for k in todo]
        targets += [1 + k for k in todo for _ in range(r_count)]
        if self._query_alike is None:
            self._query_alike = _kept_query_edits(self._query_key())
        if self._query_alike is None:
            parts.append(paste.edited(q_crop, neutral, q_stats, n_stats))
            targets += [0] * r_count
        embs = self._embed(np.concatenate(parts), np.array(targets),
                           np.tile(np.arange(r_count), len(parts)), hits)
        pairs = 2 * k_count * r_count
        per_hit = [e[:pairs].view(k_count, 2, r_count, -1) for e in embs]
        fresh = [e[pairs:pairs + len(todo) * r_count].view(len(todo), r_count, e.shape[-1])
                 for e in embs]
        for j, k in enumerate(todo):
            known[k] = [f[j] for f in fresh]
            if kept is not None:
                kept.put(k, known[k])
        if self._query_alike is None:
            self._query_alike = [e[pairs + len(todo) * r_count:] for e in embs]
            _keep_query_edits(self._query_key(), self._query_alike)
        g_alike = [torch.stack([known[k][v] for k in range(k_count)]) for v in range(len(embs))]
        return ([e[:, 0] for e in per_hit], [e[:, 1] for e in per_hit], g_alike,
                self._query_alike)

    def _query_key(self) -> tuple:
        """What the query's neutral edits depend on: the encoders (weakly: a dead encoder's
        key matches nothing), the views, the precision, the regions, and the query's and
        the neutral face's pixels."""
        crop = np.ascontiguousarray(self.query.crops[0])
        return (tuple(weakref.ref(e) for e in self.query.encoders), tuple(self.query.flipped),
                self.precision, self.regions, crop.shape,
                hashlib.sha256(crop.data).hexdigest(), self.neutral.digest)

    def neutral_of(self, hits) -> list[list[torch.Tensor]]:
        """Each of ``hits``' neutral edits (pixel mode): per hit, per view, the (R, D) unit
        embeddings of the hit with each region replaced by the neutral face's. They depend
        on the hit's crop and the model only, so a gallery keeps them (``NeutralEdits``;
        the server's feature store computes them at import)."""
        from explain.errors import InvalidOption

        if hits.crops is None:
            raise InvalidOption("region effects need the faces' aligned crops")
        r_count = len(self.regions)
        paste = self._pastes
        n_stats = paste.stats(self.neutral.crop, "neutral")
        crops = np.concatenate([paste.edited(crop, self.neutral.crop, paste.stats(crop), n_stats)
                                for crop in hits.crops])
        embs = self._embed(crops, np.repeat(np.arange(1, len(hits) + 1), r_count),
                           np.tile(np.arange(r_count), len(hits)), hits)
        return [[e[k * r_count:(k + 1) * r_count] for e in embs] for k in range(len(hits))]

    def _embed(self, crops: np.ndarray, targets: np.ndarray, regions: np.ndarray,
               hits) -> list[torch.Tensor]:
        """Edited crops -> per view (N, D) unit embeddings: through the early windows where
        every encoder declares its early layers (``_encode_windows``), else whole."""
        splits = self._splits()
        if splits is None:
            return self._encode(crops)
        return self._encode_windows(crops, targets, regions, hits, splits)

    def _encode(self, crops: np.ndarray) -> list[torch.Tensor]:
        """(N, H, W, 3) crops -> per view (N, D) unit embeddings, in guarded batches."""
        views = len(self.query.embeddings)
        out: list[list[torch.Tensor]] = [[] for _ in range(views)]
        kind = f"effects/pixels/{self.precision}/{views}x{crops.shape[1]}x{crops.shape[2]}"
        device = self.query.embeddings[0].device.type
        low = self.precision == "bf16"
        for part in self.guard.batches(len(crops), kind, PIXEL_BATCH):
            chunk = crops[part]
            self.guard.spend(len(chunk) * views)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=low):
                feats = self.explainer.encode(chunk, cancel=self.guard.cancel)
            for v in range(views):
                out[v].append(feats.embeddings[v].float())
        return [_unit(torch.cat(e)) for e in out]

    # -- pixels, exactly but cheaper: the early layers only around each region ---------------
    def _splits(self) -> list | None:
        """Each view's ``EarlySplit`` of its encoder's ``fast_copy`` in the edits' precision
        (None when an encoder has none)."""
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        splits = [fast_split(enc, dtype) for enc in self.query.encoders]
        return None if any(sp is None for sp in splits) else splits

    def _encode_windows(self, crops: np.ndarray, targets: np.ndarray, regions: np.ndarray,
                        hits, splits: list) -> list[torch.Tensor]:
        """As ``_encode``, with each edited crop's early (high-resolution) layers run only on
        a window around its region and pasted into the unedited face's early activations:
        exact (``encoder.spec.EarlySplit``: outside ``radius`` of the region nothing
        changes). targets[i]: the face crop i edits (0 the query, 1 + k hit k); regions[i]:
        its region's index in ``self.masks``; splits: each view's ``EarlySplit``.

        The edits go through the late layers ``LATE_BATCH`` at a time (crops x views) in
        order of region (each batch's early windows run per region inside it), every view
        of one encoder in the same pass (the mirrored view is the same network), in the
        precision's own weights (bf16: no autocast, which would cast every weight at every
        call)."""
        views = len(splits)
        faces = np.concatenate([self.query.crops[:1], hits.crops])
        order = np.argsort(regions, kind="stable")
        pick = torch.from_numpy(np.asarray(targets, np.int64))
        # views whose late layers are one module share a pass (SFace and its mirror)
        groups: dict[int, list[int]] = {}
        for v, sp in enumerate(splits):
            groups.setdefault(id(sp.late), []).append(v)
        features: list[list[torch.Tensor]] = [[] for _ in range(views)]
        kind = f"effects/edits/{self.precision}/{views}x{crops.shape[1]}x{crops.shape[2]}"
        with torch.no_grad():
            base = [self._early(v, faces, splits[v]) for v in range(views)]
            buffers: dict[int, torch.Tensor] = {}  # per group, its late batch (channels-last)
            per_pass = max(1, LATE_BATCH // max(len(m) for m in groups.values()))
            most = -(-len(order) // max(1, -(-len(order) // per_pass)))  # even batches
            for part in self.guard.batches(len(order), kind, most):
                rows = order[part]
                n = len(rows)
                self.guard.spend(n * views)
                runs = np.flatnonzero(np.diff(regions[rows])) + 1
                bounds = [0, *runs.tolist(), n]
                chosen = pick[rows].to(base[0].device)
                for g, members in groups.items():
                    c, h, w = base[members[0]].shape[1:]
                    if g not in buffers or len(buffers[g]) < len(members) * n:
                        buffers[g] = torch.empty(
                            (len(members) * most, c, h, w), dtype=base[members[0]].dtype,
                            device=base[members[0]].device, memory_format=torch.channels_last)
                    batch = buffers[g][:len(members) * n]
                    for m, v in enumerate(members):
                        h_v = batch[m * n:(m + 1) * n]
                        # gathered as (N, H, W, C), the channels-last tensor's own order
                        torch.index_select(base[v].permute(0, 2, 3, 1), 0, chosen,
                                           out=h_v.permute(0, 2, 3, 1))
                        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                            (a, b, c0, d), (i0, i1, j0, j1), (oi, oj) = self._window(
                                int(regions[rows[lo]]), v, splits[v])
                            x = self._inputs(v, crops[rows[lo:hi]], (a, b, c0, d))
                            h_v[lo:hi, :, i0:i1, j0:j1] = splits[v].early(x)[
                                ..., i0 - oi:i1 - oi, j0 - oj:j1 - oj]
                    late = splits[members[0]].late(batch)
                    for m, v in enumerate(members):
                        features[v].append(late[m * n:(m + 1) * n])
        # The head once per encoder for every edit of its views, in float32 (a bf16 head
        # would round the 50k-long dot products), on a contiguous copy (flattening
        # channels-last copies); its weights are read once for all the edits.
        where = torch.from_numpy(np.argsort(order))
        out: list[torch.Tensor] = [torch.empty(0)] * views
        with torch.no_grad():
            for members in groups.values():
                flat = torch.cat([f for v in members for f in features[v]]).to(
                    torch.float32, memory_format=torch.contiguous_format)
                embs = fast_copy(self.query.encoders[members[0]]).head(flat)
                for v, e in zip(members, embs.split(len(order)), strict=True):
                    out[v] = _unit(e[where.to(e.device)])
        return out

    def _window(self, region: int, view: int, split):
        """``_window`` of region ``region`` for view ``view`` (kept for the call)."""
        key = (region, view)
        found = self._windows.get(key)
        if found is None:
            found = self._windows[key] = _window(self.masks.alpha[region], split,
                                                 self.query.flipped[view])
        return found

    def _inputs(self, view: int, crops: np.ndarray,
                box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """Crops as view ``view``'s channels-last input in the edits' precision; ``box``
        (rows a:b, cols c:d of the view's input) cuts a window out. The encoder's own
        ``preprocess``; where that is ``FaceEncoder``'s, its per-pixel ``normalise`` on the
        window's pixels only (the same values as cutting the window out of the input)."""
        encoder = self.query.encoders[view]
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        flipped = self.query.flipped[view]
        if type(encoder).preprocess is not FaceEncoder.preprocess:
            x = encoder.preprocess(crops)
            x = torch.flip(x, dims=[-1]) if flipped else x
            if box is not None:
                x = x[..., box[0]:box[1], box[2]:box[3]]
            return x.to(dtype, memory_format=torch.channels_last)
        crops = np.asarray(crops)
        h, w = encoder.spec.input_size
        if crops.shape[1:3] != (h, w):
            return encoder.preprocess(crops)  # raises WrongImageSize
        pixels = crops[:, :, ::-1] if flipped else crops
        if box is not None:
            pixels = pixels[:, box[0]:box[1], box[2]:box[3]]
        # (N, H, W, 3) uint8 as an (N, 3, H, W) channels-last tensor: no copy to permute
        return encoder.normalise(pixels).to(dtype, memory_format=torch.channels_last)

    def _early(self, view: int, faces: np.ndarray, split) -> torch.Tensor:
        """Early activations of the unedited faces (the query's computed once per call)."""
        cached = self._early_query.get(view)
        if cached is None:
            cached = self._early_query[view] = split.early(self._inputs(view, faces[:1]))
        rest = split.early(self._inputs(view, faces[1:])) if len(faces) > 1 else cached[:0]
        return torch.cat([cached, rest])

    # -- features: edits of the contrast layer, then the network's tail --------------------
    def _feature_edits(self, hits):
        query = self.query
        if query.fine_maps is None:
            query = self.query = self.explainer.encode(query.crops, cancel=self.guard.cancel)
        if hits.fine_maps is None:
            hits = self.explainer.encode(hits.crops, cancel=self.guard.cancel)
        n_fine = self.neutral.fine_maps(self.explainer)
        k_count, r_count = len(hits), len(self.regions)
        q_diff, g_diff, g_alike, q_alike = [], [], [], []
        with torch.no_grad():
            for v, (encoder, flipped) in enumerate(zip(query.encoders, query.flipped,
                                                       strict=True)):
                fq, fg, fn = query.fine_maps[v], hits.fine_maps[v], n_fine[v]
                m = _view_cells(self.masks.cells(tuple(fq.shape[-2:])), flipped, fq.dtype)
                edits = [(fq[None] + m[None] * (fg[:, None] - fq[None])).flatten(0, 1),
                         (fg[:, None] + m[None] * (fq[None] - fg[:, None])).flatten(0, 1),
                         (fg[:, None] + m[None] * (fn[None] - fg[:, None])).flatten(0, 1)]
                if self._query_alike is None:
                    edits.append(fq + m * (fn - fq))
                embs = _unit(_tail_embeddings(encoder, torch.cat(edits), self.guard))
                n = k_count * r_count
                q_diff.append(embs[:n].view(k_count, r_count, -1))
                g_diff.append(embs[n:2 * n].view(k_count, r_count, -1))
                g_alike.append(embs[2 * n:3 * n].view(k_count, r_count, -1))
                q_alike.append(embs[3 * n:])
        if self._query_alike is None:
            self._query_alike = q_alike
        return q_diff, g_diff, g_alike, self._query_alike


def region_effects(explainer, query, hits, *, neutral: np.ndarray | NeutralFace,
                   mode: str = "pixels", regions: tuple[str, ...] = EFFECT_REGIONS,
                   guard: Guard | None = None, precision: str = "bf16") -> list[PairEffects]:
    """Region effects on both faces of (query, hit_k), k = 1..K (``RegionEffects`` for one
    query and all of ``hits`` at once). Returns K PairEffects in the order of ``hits``."""
    return RegionEffects(explainer, query, neutral=neutral, mode=mode, regions=regions,
                         guard=guard, precision=precision).of(hits)


def neutral_edits(explainer, faces, *, neutral: np.ndarray | NeutralFace,
                  guard: Guard | None = None, precision: str = "bf16") -> list[list[torch.Tensor]]:
    """``RegionEffects.neutral_of``: per face of ``faces`` (FaceFeatures with crops), per
    view, its (R, D) neutral-edit embeddings over ``EFFECT_REGIONS``."""
    return RegionEffects(explainer, faces.select(0), neutral=neutral, guard=guard,
                         precision=precision).neutral_of(faces)


def _window(alpha: np.ndarray, split, flipped: bool
            ) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int], tuple[int, int]]:
    """Where a paste with ``alpha`` (H, W) can change the early activations, and the input
    window that computes them exactly: ((rows a:b, cols c:d) of the input, (rows i0:i1,
    cols j0:j1) of the early grid, the grid cell at the window's origin)."""
    if flipped:
        alpha = alpha[:, ::-1]
    ys, xs = np.nonzero(alpha > 1 / 512)  # pixels the paste can change by half a grey level
    s, rad = split.stride, split.radius
    h, w = alpha.shape

    def span(lo: int, hi: int, size: int) -> tuple[int, int, int, int]:
        cells = -(-size // s)
        first = max(0, -(-(lo - rad) // s))
        last = min(cells - 1, (hi + rad) // s)
        start = max(0, (s * first - rad) // s * s)
        stop = min(size, s * last + rad + 1)
        return start, stop, first, last + 1

    a, b, i0, i1 = span(int(ys.min()), int(ys.max()), h)
    c, d, j0, j1 = span(int(xs.min()), int(xs.max()), w)
    return (a, b, c, d), (i0, i1, j0, j1), (a // s, c // s)


_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FAST_LOCK = threading.Lock()
_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fast copy -> EarlySplit


def fast_copy(encoder, dtype: torch.dtype = torch.float32):
    """``encoder.inference_copy()`` with its weights in ``dtype``, made once per encoder and
    dtype and kept while the encoder lives: the edits' forwards run through it (on this
    machine's CPU a batch of 8 crops through SFace's body in bf16 takes 29 ms instead of
    79 ms; float32 as served: 96 ms). The served encoder keeps its own layout."""
    with _FAST_LOCK:
        copies = _FAST.get(encoder)
        if copies is None:
            copies = _FAST[encoder] = {}
        if torch.float32 not in copies:
            copies[torch.float32] = encoder.inference_copy()
        if dtype not in copies:
            copies[dtype] = copy.deepcopy(copies[torch.float32]).to(dtype)
        return copies[dtype]


def fast_split(encoder, dtype: torch.dtype = torch.float32):
    """``fast_copy(encoder, dtype).early_split()``, made once per copy (so the views of one
    encoder share its late layers, and a batch of both goes through them in one pass)."""
    fast = fast_copy(encoder, dtype)
    with _FAST_LOCK:
        if fast not in _SPLITS:
            _SPLITS[fast] = fast.early_split()
        return _SPLITS[fast]


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _unit(e: torch.Tensor) -> torch.Tensor:
    return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _view_cells(cells: np.ndarray, flipped: bool, dtype: torch.dtype) -> torch.Tensor:
    """(R, h, w) -> (R, 1, h, w) tensor, mirrored for a flipped view."""
    t = torch.from_numpy(np.array(cells))
    return (torch.flip(t, dims=[-1]) if flipped else t)[:, None].to(dtype)


# A tail pass through SFace's last 14x14 block and the 7x7 blocks costs about 1/20 of a full
# forward; the guard is charged in whole forwards.
TAIL_PASSES_PER_FORWARD = 20


def _tail_embeddings(encoder, fine: torch.Tensor, guard: Guard) -> torch.Tensor:
    """(N, C_f, h, w) contrast-layer activations -> (N, D) embeddings, in guarded batches."""
    out = []
    kind = f"effects/tail/{encoder.spec.name}/{'x'.join(map(str, fine.shape[1:]))}"
    for part in guard.batches(len(fine), kind, FEATURE_BATCH):
        chunk = fine[part]
        guard.spend(max(1, -(-len(chunk) // TAIL_PASSES_PER_FORWARD)))
        out.append(encoder.head(encoder.fine_to_features(chunk)))
    return torch.cat(out)
