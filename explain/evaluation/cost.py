"""Cost and consistency: run time per map, spread over repeats and under small
input noise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from encoder.spec import FaceEncoder
from explain.attribution.catalogue import SPECS
from explain.attribution.engine import Explainer
from explain.attribution.views import ViewSource
from explain.evaluation import metrics as M
from explain.evaluation.common import (
    FacePair,
    available_methods,
    query_map,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------- cost and consistency


def _takes_seed(method: str) -> bool:
    return "seed" in SPECS[method].defaults


@dataclass(frozen=True)
class CostResult:
    """method -> median seconds per map, mean pairwise Spearman over repeats,
    mean Spearman between clean and noisy-input maps."""

    seconds: dict[str, float]
    cpu_seconds: dict[str, float]  # process CPU time (all threads): steadier on a shared machine
    repeat_spearman: dict[str, float]
    noise_spearman: dict[str, float]
    noise_std: float
    repeats: int
    errors: dict[str, str]


def cost_and_consistency(
    model: FaceEncoder | ViewSource,
    pairs: Sequence[FacePair],
    methods: Sequence[str] | None = None,
    *,
    repeats: int = 3,
    noise_std: float = 2.0,
    method_options: dict[str, dict] | None = None,
    seed: int = 0,
) -> CostResult:
    """Run time per map, and how much a map moves between repeats (stochastic methods)
    and under Gaussian pixel noise of ``noise_std`` levels."""
    methods = tuple(methods or available_methods())
    method_options = method_options or {}
    explainer = Explainer(model)
    rng = np.random.default_rng(seed)
    seconds, cpu, rep, noise, errors = {}, {}, {}, {}, {}
    if pairs and methods:  # one-time work (the head's linearisation) is not a map's cost
        try:
            query_map(methods[0], explainer, pairs[0].query, pairs[0].gallery)
        except Exception:  # reported below, method by method
            pass
    for method in methods:
        opts = method_options.get(method, {})
        times, cpu_times, reps, noisy = [], [], [], []
        try:
            for pair in pairs:
                runs = []
                for r in range(repeats):
                    seeded = {**opts, "seed": seed + r} if _takes_seed(method) else opts
                    t0, c0 = time.perf_counter(), time.process_time()
                    runs.append(query_map(method, explainer, pair.query, pair.gallery, **seeded))
                    times.append(time.perf_counter() - t0)
                    cpu_times.append(time.process_time() - c0)
                reps += [
                    M.spearman(runs[i], runs[j])
                    for i in range(repeats)
                    for j in range(i + 1, repeats)
                ]
                jitter = np.clip(pair.query + rng.normal(0, noise_std, pair.query.shape), 0, 255)
                noisy.append(
                    M.spearman(
                        runs[0],
                        query_map(
                            method, explainer, jitter.astype(np.float32), pair.gallery, **opts
                        ),
                    )
                )
        except Exception as exc:
            errors[method] = f"{type(exc).__name__}: {exc}"
            continue
        seconds[method] = float(np.median(times))
        cpu[method] = float(np.median(cpu_times))
        rep[method] = float(np.mean(reps)) if reps else 1.0
        noise[method] = float(np.mean(noisy))
    return CostResult(seconds, cpu, rep, noise, noise_std, repeats, errors)
