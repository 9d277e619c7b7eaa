"""Maps for a query and its K hits — the one path the server, the CLI, evaluation
and the syndrome tools share — and the catalogue of methods it accepts.

``explain_matches(explainer, query, hits, methods, ...)`` runs the engine's
batched maps (``engine.BATCHED_MAPS``: one pass for all K hits) and every other
method through the family (``methods.attribute``), reusing the features it is
given: cached gallery features are never encoded again, and pixel methods
perturb the crops the features carry. A batched method asked for with options
goes through the family, which takes them.

The catalogue's views are importable from here too (``METHOD_NAMES``, ``BATCHED``,
``DEFAULT_METHODS``, ``check_methods``, ``typed_options``, ``METHODS``): they are
declared once, in ``explain.attribution.catalogue``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from explain.attribution.catalogue import (
    BATCHED,
    DEFAULT_METHODS,
    METHOD_NAMES,
    SPECS,
    check_methods,
    typed_options,
)
from explain.attribution.engine import BATCHED_MAPS, Explainer, FaceFeatures
from explain.attribution.methods import METHODS, SIDES, attribute
from explain.effects import (
    NeutralEdits,
    NeutralFace,
    PairEffects,
    RegionEffects,
    bundled_neutral,
)
from explain.limits import DEFAULT_BUDGET, DEFAULT_TIME_LIMIT_S, CancelSignal, Guard

__all__ = ["BATCHED", "DEFAULT_METHODS", "METHODS", "METHOD_NAMES", "MatchMaps", "MethodMaps",
           "attribute", "check_methods", "explain_matches", "typed_options", "warm_up"]

TimeLimit = float | None | Callable[[], float | None]


@dataclass(frozen=True, eq=False)
class MethodMaps:
    """One method's maps on both faces of a pair.

    query/gallery: native resolution ((h, w) cells for feature methods, (H, W)
    for pixel methods); *_aligned (H, W) on the aligned crop; a side not asked
    for is None. batched: from the engine's one pass for all hits (forward_passes
    and seconds 0); else forward_passes (images through the encoder) and seconds
    of the family's call for this pair.
    """

    method: str
    resolution: str  # "feature" or "pixel"
    query: np.ndarray | None
    gallery: np.ndarray | None
    query_aligned: np.ndarray | None
    gallery_aligned: np.ndarray | None
    forward_passes: int = 0
    seconds: float = 0.0
    batched: bool = False


@dataclass(frozen=True, eq=False)
class MatchMaps:
    """Every asked method's maps for one (query, hit) pair, with the pair's cosine.

    residual/bias_share: of the similarity map on the query face (the gallery
    face's in ``gallery_residual``/``gallery_bias_share``).
    """

    index: int  # position among the hits
    cosine: float
    view_cosines: tuple[float, ...]
    residual: float
    bias_share: float
    gallery_residual: float
    gallery_bias_share: float
    maps: tuple[MethodMaps, ...]
    effects: PairEffects | None = None  # region effects, for the first ``effects`` hits

    def __getitem__(self, method: str) -> MethodMaps:
        return next(m for m in self.maps if m.method == method)

    @property
    def contrast_share(self) -> float | None:
        """The share of ``cosine − 1`` the contrast map's sum accounts for (its first-order
        estimate of the similarity lost against a perfect match), when contrast was drawn."""
        maps = next((m for m in self.maps if m.method == "contrast"), None)
        if maps is None or maps.query is None or abs(self.cosine - 1.0) < 1e-6:
            return None
        return float(np.sum(maps.query)) / (self.cosine - 1.0)


def explain_matches(
    explainer: Explainer,
    query: np.ndarray | FaceFeatures,
    hits: np.ndarray | FaceFeatures,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    budget: int | None = DEFAULT_BUDGET,
    time_limit: TimeLimit = DEFAULT_TIME_LIMIT_S,
    cancel: CancelSignal = None,
    sides: tuple[str, ...] = SIDES,
    effects: int = 0,
    neutral: np.ndarray | NeutralFace | None = None,
    effects_mode: str = "pixels",
    kept_edits: NeutralEdits | None = None,
) -> Iterator[MatchMaps]:
    """Maps of every method in ``methods`` on both faces of (query, hit_k), k = 1..K,
    one MatchMaps per hit, in order, each as soon as it is ready (``list(...)`` for all).

    query: one aligned crop (H, W, 3) uint8 or its FaceFeatures (N = 1); hits:
    (K, H, W, 3) crops or their (cached) FaceFeatures. The batched maps come
    from one engine pass for all K; every other method (and a batched one with
    ``options[method]``) runs per pair through the family on the same features,
    with ``budget`` forward passes and ``time_limit`` seconds each (a callable
    is asked before each map, e.g. for the time left to a request's deadline).
    ``sides`` limits family methods to one face. ``effects``: region effects
    (``explain.effects``) for the first that many hits, against ``neutral`` (default the
    bundled photos' mean face), by ``effects_mode`` edits, under the same budget, time
    limit and cancellation; ``kept_edits`` keeps the hits' neutral edits between calls
    (``explain.effects.NeutralEdits``, indexed like ``hits``). Raises UnknownMethod
    (before any work), and the family's InvalidOption, BudgetExceeded,
    TimeLimitExceeded, Cancelled.
    """
    methods = check_methods(methods)
    return _matches(explainer, query, hits, methods,
                    {m: dict(v) for m, v in (options or {}).items() if v},
                    budget, time_limit, cancel, sides,
                    _Effects(effects, neutral, effects_mode, kept_edits))


def _matches(explainer: Explainer, query: np.ndarray | FaceFeatures,
             hits: np.ndarray | FaceFeatures, methods: tuple[str, ...],
             options: dict[str, dict[str, Any]], budget: int | None, time_limit: TimeLimit,
             cancel: CancelSignal, sides: tuple[str, ...], effects: _Effects
             ) -> Iterator[MatchMaps]:
    guard = Guard(cancel=cancel)
    q, g = explainer.features(query, guard), explainer.features(hits, guard)
    region_effects = None
    batched = [m for m in methods if m in BATCHED_MAPS and m not in options]
    pairs = explainer.explain(q, g, maps=batched, cancel=cancel)
    for index, pair in enumerate(pairs):
        maps = []
        for method in methods:
            if method in batched:
                maps.append(MethodMaps(
                    method, "feature", pair.query.maps[method], pair.gallery.maps[method],
                    pair.query.aligned[method], pair.gallery.aligned[method], batched=True))
                continue
            limit = time_limit() if callable(time_limit) else time_limit
            result = attribute(method, explainer, q, g.select(index), budget=budget,
                               time_limit=limit, cancel=cancel, sides=sides,
                               **options.get(method, {}))
            maps.append(MethodMaps(method, result.resolution, result.query, result.gallery,
                                   result.query_aligned, result.gallery_aligned,
                                   result.forward_passes, result.seconds))
        pair_effects = None
        if index < effects.count:
            limit = time_limit() if callable(time_limit) else time_limit
            guard = Guard(budget, limit, cancel)
            if region_effects is None:
                neutral = bundled_neutral() if effects.neutral is None else effects.neutral
                region_effects = RegionEffects(explainer, q, neutral=neutral,
                                               mode=effects.mode, guard=guard)
            region_effects.guard = guard
            kept = None if effects.kept is None else _HitEdits(effects.kept, index)
            pair_effects = region_effects.of(g.select(index), kept)[0]
        yield MatchMaps(index, pair.cosine, pair.view_cosines, pair.query.residual,
                        pair.query.bias_share, pair.gallery.residual, pair.gallery.bias_share,
                        tuple(maps), pair_effects)


@dataclass(frozen=True)
class _Effects:
    count: int
    neutral: np.ndarray | NeutralFace | None
    mode: str
    kept: NeutralEdits | None = None


@dataclass(frozen=True)
class _HitEdits:
    """``kept`` seen from a call that explains hit ``index`` alone (its hit 0)."""

    kept: NeutralEdits
    index: int

    def get(self, index: int):
        return self.kept.get(self.index + index)

    def put(self, index: int, embeddings) -> None:
        self.kept.put(self.index + index, embeddings)


def warm_up(explainer: Explainer, features: FaceFeatures, methods: tuple[str, ...] = ()) -> None:
    """Run every method of the family (or ``methods``) once on ``features`` (N = 1, with
    its crop) with its cheapest options (``MethodSpec.warm_up``): the first real call then
    finds captum's and torch's lazy set-up done and the time per image of forward and
    backward passes measured, so its first batch is sized to its time limit too
    (``Guard.batches``)."""
    for name in methods or METHOD_NAMES:
        attribute(name, explainer, features, features, budget=None, time_limit=None,
                  sides=("query",), **SPECS[name].warm_up)
