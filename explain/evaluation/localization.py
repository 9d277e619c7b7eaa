"""Localisation: IOU and IOU* of query maps against landmark region masks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from encoder.spec import FaceEncoder
from explain.attribution.engine import Explainer
from explain.attribution.views import ViewSource
from explain.evaluation import metrics as M
from explain.evaluation.common import (
    FacePair,
    available_methods,
    query_map,
)
from explain.regions import EVALUATION_REGIONS, region_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalisationResult:
    """method -> region -> mean over pairs of IOU, IOU*, energy share and pointing rate."""

    k: float
    side: str
    iou: dict[str, dict[str, float]]
    iou_star: dict[str, dict[str, float]]
    energy: dict[str, dict[str, float]]
    pointing: dict[str, dict[str, float]]
    errors: dict[str, str]


def localisation(
    model: FaceEncoder | ViewSource,
    pairs: Sequence[FacePair],
    methods: Sequence[str] | None = None,
    *,
    k: float = 1.0,
    regions: Sequence[str] = EVALUATION_REGIONS,
    side: str = "positive",
    method_options: dict[str, dict] | None = None,
    maps: dict[str, list[np.ndarray]] | None = None,
) -> LocalisationResult:
    """IOU/IOU* of each method's query map (thresholded at mean + k std) against the
    regions of the query's own landmarks. ``side="negative"`` scores the negated map
    (where the faces differ). Precomputed ``maps`` (method -> per pair) are reused."""
    methods = tuple(methods or available_methods())
    method_options = method_options or {}
    sign = 1.0 if side == "positive" else -1.0
    acc: dict[str, dict[str, list]] = {}
    errors: dict[str, str] = {}
    for method in methods:
        try:
            per_pair = (maps or {}).get(method) or [
                query_map(
                    method, Explainer(model), p.query, p.gallery, **method_options.get(method, {})
                )
                for p in pairs
            ]
        except Exception as exc:
            errors[method] = f"{type(exc).__name__}: {exc}"
            continue
        scores = {name: [] for name in regions}
        for pair, amap in zip(pairs, per_pair, strict=True):
            masks = region_masks(pair.query_landmarks, size=pair.query.shape[:2])
            for s in M.localisation_scores(sign * amap, {r: masks[r] for r in regions}, k):
                scores[s.region].append(s)
        acc[method] = scores

    def mean(attr: str) -> dict[str, dict[str, float]]:
        return {
            m: {r: float(np.mean([float(getattr(s, attr)) for s in ss])) for r, ss in regs.items()}
            for m, regs in acc.items()
        }

    return LocalisationResult(
        k, side, mean("iou"), mean("iou_star"), mean("energy"), mean("pointing"), errors
    )
