"""Faithfulness: deletion and insertion curves (blur and mean baselines) for the
positive side (most similar first: s should fall) and the negative side (most
dissimilar first: s should rise), against random orders; captum's infidelity
and max-sensitivity.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from encoder.spec import FaceEncoder
from explain.attribution.engine import Explainer
from explain.attribution.views import ViewSource
from explain.evaluation import metrics as M
from explain.evaluation.common import (
    SIDES,
    FacePair,
    PairTarget,
    available_methods,
    query_map,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------- faithfulness


@dataclass(frozen=True)
class CurveSet:
    """Deletion/insertion curves of one method (or the random order) on one pair and side."""

    pair: str
    method: str  # a method name, or "random"
    side: str  # "positive" or "negative" ("random" for random orders)
    baseline: str  # "blur" or "mean"
    deletion: M.Curve
    insertion: M.Curve | None  # None where only deletion was asked for (negative side)
    deletion_cosine: np.ndarray  # (S+1,) plain cosine along the deletion curve
    insertion_cosine: np.ndarray | None


@dataclass(frozen=True)
class FaithfulnessResult:
    curves: tuple[CurveSet, ...]
    infidelity: dict[str, dict[str, float]]  # method -> pair -> infidelity
    sensitivity: dict[str, dict[str, float]]  # method -> pair -> max-sensitivity
    seconds: dict[str, dict[str, float]]  # method -> pair -> time of one map
    errors: dict[str, str]  # method -> why it was skipped
    steps: int
    n_random: int
    maps: dict[str, list[np.ndarray]] = field(
        default_factory=dict, repr=False
    )  # method -> per pair


def _curve_set(
    target: PairTarget,
    image: np.ndarray,
    baseline_name: str,
    order: np.ndarray,
    steps: int,
    pair: str,
    method: str,
    side: str,
    insertion: bool = True,
    max_fraction: float = 1.0,
) -> CurveSet:
    base = M.BASELINES[baseline_name](image)
    images, f = M.perturbation_images(image, base, order, steps, "deletion", max_fraction)
    if insertion:
        ins, _ = M.perturbation_images(image, base, order, steps, "insertion", max_fraction)
        images = np.concatenate([images, ins])
    held, cos = target.scores(images)
    n = steps + 1
    return CurveSet(
        pair,
        method,
        side,
        baseline_name,
        M.Curve("deletion", f, held[:n]),
        M.Curve("insertion", f, held[n:]) if insertion else None,
        cos[:n],
        cos[n:] if insertion else None,
    )


def faithfulness(
    model: FaceEncoder | ViewSource,
    pairs: Sequence[FacePair],
    methods: Sequence[str] | None = None,
    *,
    steps: int = 16,
    baselines: Sequence[str] = ("blur", "mean"),
    sides: Sequence[str] = SIDES,
    n_random: int = 5,
    captum_metrics: bool = True,
    n_perturb_samples: int = 8,
    sensitivity_radius: float = 2.0,
    sensitivity_pairs: int | None = None,
    negative_fraction: float = 0.25,
    method_options: dict[str, dict] | None = None,
    seed: int = 0,
) -> FaithfulnessResult:
    """Deletion/insertion curves per method, side and baseline, random-order curves,
    and (optionally) captum's infidelity and max-sensitivity.

    ``sensitivity_radius`` is in pixel levels (0..255); infidelity perturbs with
    Gaussian noise (std 16 levels) on 7x7-pixel patches (see :func:`captum_scores`).
    Max-sensitivity recomputes maps, so ``sensitivity_pairs`` may limit it to the
    first N pairs.

    The negative side deletes the most dissimilar pixels first, over the first
    ``negative_fraction`` of the pixels only (the similarity should rise): over
    the full range its curve would be the positive insertion curve read
    backwards, so only the truncated curve says something new. Its random
    reference (side ``"random-"``) uses the same range.
    """
    methods = tuple(methods or available_methods())
    method_options = method_options or {}
    explainer = Explainer(model)
    rng = np.random.default_rng(seed)
    curves: list[CurveSet] = []
    infid: dict[str, dict[str, float]] = {m: {} for m in methods}
    sens: dict[str, dict[str, float]] = {m: {} for m in methods}
    secs: dict[str, dict[str, float]] = {m: {} for m in methods}
    errors: dict[str, str] = {}
    maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for pair_index, pair in enumerate(pairs):
        target = PairTarget(model, pair.query, pair.gallery)
        image = pair.query.astype(np.float32)
        size = image.shape[:2]
        for _ in range(n_random):
            order = M.pixel_order(np.zeros(size), size, "random", rng)
            for b in baselines:
                curves.append(
                    _curve_set(target, image, b, order, steps, pair.name, "random", "random")
                )
                if "negative" in sides:
                    curves.append(
                        _curve_set(
                            target,
                            image,
                            b,
                            order,
                            steps,
                            pair.name,
                            "random",
                            "random-",
                            insertion=False,
                            max_fraction=negative_fraction,
                        )
                    )
        for method in methods:
            if method in errors:
                continue
            opts = method_options.get(method, {})
            try:
                t0 = time.perf_counter()
                amap = query_map(method, explainer, pair.query, pair.gallery, **opts)
                secs[method][pair.name] = time.perf_counter() - t0
            except Exception as exc:  # one failing method must not sink the others
                log.warning("method %s failed: %s", method, exc)
                errors[method] = f"{type(exc).__name__}: {exc}"
                continue
            maps[method].append(amap)
            for side in sides:
                order = M.pixel_order(amap, size, side, np.random.default_rng(seed))
                positive = side == "positive"
                for b in baselines:
                    curves.append(
                        _curve_set(
                            target,
                            image,
                            b,
                            order,
                            steps,
                            pair.name,
                            method,
                            side,
                            insertion=positive,
                            max_fraction=1.0 if positive else negative_fraction,
                        )
                    )
            if captum_metrics:
                sens_here = sensitivity_pairs is None or pair_index < sensitivity_pairs
                i, s = captum_scores(
                    target,
                    explainer,
                    method,
                    pair,
                    amap,
                    n_perturb_samples=n_perturb_samples,
                    radius=sensitivity_radius,
                    options=opts,
                    seed=seed,
                    sensitivity=sens_here,
                )
                infid[method][pair.name] = i
                if sens_here:
                    sens[method][pair.name] = s
    maps = {m: v for m, v in maps.items() if m not in errors}
    return FaithfulnessResult(tuple(curves), infid, sens, secs, errors, steps, n_random, maps)


def captum_scores(
    target: PairTarget,
    explainer: Explainer,
    method: str,
    pair: FacePair,
    amap: np.ndarray,
    *,
    n_perturb_samples: int = 8,
    radius: float = 2.0,
    noise_std: float = 16.0,
    patch: int = 7,
    options: dict | None = None,
    seed: int = 0,
    sensitivity: bool = True,
) -> tuple[float, float]:
    """(infidelity, max-sensitivity) of one query map with ``captum.metrics``.

    Inputs are the query crop as (1, 3, H, W) pixel levels; the map (H, W) is
    spread evenly over the three channels, and infidelity perturbations are the
    same on all channels, so ``<attribution, I>`` is ``sum_p map_p I_p``.
    Infidelity uses captum's ``normalize=True`` (the optimal rescaling of the
    map), so maps in any unit are comparable. Max-sensitivity recomputes the map
    for ``n_perturb_samples`` inputs within ``radius`` levels (L-inf) and
    reports the largest relative change of the map (Frobenius norm).
    """
    from captum.metrics import infidelity, sensitivity_max

    options = options or {}
    h, w = pair.query.shape[:2]
    gen = torch.Generator().manual_seed(seed)

    def to_images(x: torch.Tensor | tuple[torch.Tensor, ...]) -> np.ndarray:
        if isinstance(x, tuple):
            (x,) = x
        return x.permute(0, 2, 3, 1).detach().cpu().numpy().astype(np.float32)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(target(to_images(x)), dtype=torch.float32)

    def perturb(x: torch.Tensor):
        n = x.shape[0]
        coarse = torch.randn(n, 1, -(-h // patch), -(-w // patch), generator=gen) * noise_std
        noise = coarse.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]
        noise = noise.expand(-1, 3, -1, -1)
        return noise, x - noise

    x = torch.as_tensor(pair.query.astype(np.float32)).permute(2, 0, 1)[None]
    attr = torch.as_tensor(np.asarray(amap, dtype=np.float32))[None, None].expand(1, 3, h, w) / 3
    with torch.no_grad():
        infid = float(
            infidelity(
                forward, perturb, x, attr, n_perturb_samples=n_perturb_samples, normalize=True
            )[0]
        )

    def explanation(inputs: torch.Tensor) -> tuple[torch.Tensor]:
        maps = [
            query_map(method, explainer, np.clip(img, 0, 255), pair.gallery, **options)
            for img in to_images(inputs)
        ]
        # A tuple: captum iterates over the unperturbed explanation as a tuple of inputs.
        return (torch.as_tensor(np.stack(maps))[:, None].expand(-1, 3, h, w).contiguous() / 3,)

    if not sensitivity:
        return infid, float("nan")
    torch.manual_seed(seed)
    sens = float(
        sensitivity_max(
            explanation,
            x,
            perturb_radius=radius,
            n_perturb_samples=n_perturb_samples,
            max_examples_per_batch=n_perturb_samples,
        )[0]
    )
    return infid, sens
