"""The family's one entry point: ``attribute(method, explainer, query, hit, ...)`` explains
one pair with any method of the catalogue, the same steps for every method.

Like captum's ``attribute(inputs, target, ...)``, one call takes the same arguments for
every method and returns signed maps of the same shapes (``AttributionMap``); like
pytorch-grad-cam's ``BaseCAM``, the steps are shared and a method overrides one
(``Method.side_map``; a CAM method only its ``weights(grads, acts)``: the CAM variants
are subclasses of ``cam.CamMethod``, with the gradient analytic and no hooks — the
example ``shared/STYLE.md`` gives new methods to follow):

1. ``_plan``: the method's spec and its options, typed and checked; the guard.
2. ``_pair``: both faces' features (crops given as arrays are encoded, counted as passes).
3. the maps: a batched method (``engine.BATCHED_MAPS``) from the engine's pass
   (``_engine_maps``); any other per face and view (``_family_maps``: the pass plan
   checked against the budget first, then ``side_map`` on each ``SideProblem``).
4. ``_result``: views averaged in aligned orientation, drawn on the crop, ``relu`` /
   ``absolute`` / ``normalise`` applied (never silently), passes and seconds counted.

Maps for a query and K hits go through ``explain.attribution.matches.explain_matches``.
Each call has a budget of forward passes (images through the encoder) checked before it
starts and while it runs, a time limit, and a cancellation signal: polled before every
batch, and inside the encoder after every block of the forward and backward passes
(``_polled``), so a late or cancelled call stops within one block; batches of a
cancellable call are sized by the time they take (``Guard.batches``).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from explain.attribution.affine import affine_head
from explain.attribution.catalogue import spec
from explain.attribution.engine import BATCHED_MAPS, Explainer, FaceFeatures, check_compatible
from explain.attribution.family import Method, SideProblem, unflip, upsample
from explain.attribution.implementations import METHODS
from explain.attribution.views import view_inputs
from explain.errors import InvalidOption
from explain.limits import DEFAULT_BUDGET, DEFAULT_TIME_LIMIT_S, CancelSignal, Guard

__all__ = ["METHODS", "SIDES", "AttributionMap", "attribute"]

SIDES = ("query", "gallery")


@dataclass(frozen=True)
class AttributionMap:
    """One method's maps on both faces of a pair, averaged over views.

    query/gallery: (h, w) for feature-resolution methods, (H, W) for pixel
    methods; ``*_aligned`` (H, W) on the aligned crop either way. A side not
    asked for is None. forward_passes counts images through the encoder.
    """

    method: str
    resolution: str
    cosine: float
    query: np.ndarray | None
    gallery: np.ndarray | None
    query_aligned: np.ndarray | None
    gallery_aligned: np.ndarray | None
    forward_passes: int
    seconds: float
    options: tuple[tuple[str, Any], ...]


def attribute(
    method: str,
    explainer: Explainer,
    query: np.ndarray | FaceFeatures,
    hit: np.ndarray | FaceFeatures,
    *,
    budget: int | None = DEFAULT_BUDGET,
    time_limit: float | None = DEFAULT_TIME_LIMIT_S,
    cancel: CancelSignal = None,
    sides: tuple[str, ...] = SIDES,
    relu: bool = False,
    absolute: bool = False,
    normalise: bool = False,
    **options: Any,
) -> AttributionMap:
    """Explain one pair with one method of the family.

    query, hit: (H, W, 3) uint8 aligned crops, or their FaceFeatures (N = 1;
    pixel methods need the crops they carry). budget: most forward passes
    (images through the encoder, the encodes of crops given as arrays
    included); the plan is checked first (BudgetExceeded) and spending is
    enforced while running. time_limit: seconds (TimeLimitExceeded); cancel:
    threading.Event or callable (Cancelled); both polled before every batch and after
    every block of the encoder, forward and backward. sides: the faces to explain.
    ``options`` are the method's own (``catalogue.SPECS[name].defaults``). Raises
    UnknownMethod, InvalidOption.
    """
    impl, opts = _plan(method, sides, {"relu": relu, "absolute": absolute,
                                       "normalise": normalise, **options})
    guard = Guard(budget, time_limit, cancel)
    token = _CALL_GUARD.set(guard)  # what the encoder's block hooks poll (_polled)
    try:
        q, g = _pair(explainer, query, hit, guard)
        with _polled(q.encoders):
            maps = _engine_maps if method in BATCHED_MAPS else _family_maps
            per_side, cosine = maps(impl, opts, explainer, q, g, sides, guard)
    finally:
        _CALL_GUARD.reset(token)
    return _result(impl, opts, per_side, cosine, guard)


# A pair's maps: side -> (native map, the map on the aligned crop), for the sides asked.
SideMaps = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _plan(method: str, sides: tuple[str, ...], given: dict[str, Any]
          ) -> tuple[Method, dict[str, Any]]:
    """The method's implementation and every option of the call, typed and checked."""
    impl = METHODS[spec(method).name]
    if not sides or set(sides) - set(SIDES):
        raise InvalidOption(f"sides must be a non-empty subset of {SIDES}, got {sides}")
    return impl, impl.spec.options(given)


def _pair(explainer: Explainer, query: np.ndarray | FaceFeatures,
          hit: np.ndarray | FaceFeatures, guard: Guard) -> tuple[FaceFeatures, FaceFeatures]:
    """Features of both faces; crops given as arrays are encoded here (counted as passes)."""
    q, g = explainer.features(query, guard), explainer.features(hit, guard)
    check_compatible(q, g)
    if len(q) != 1 or len(g) != 1:
        raise InvalidOption(f"attribute() explains one pair, got {len(q)} x {len(g)} faces")
    return q, g


def _engine_maps(impl: Method, opts: dict[str, Any], explainer: Explainer, q: FaceFeatures,
                 g: FaceFeatures, sides: tuple[str, ...], guard: Guard
                 ) -> tuple[SideMaps, float]:
    """A batched method's maps, from the engine's pass for this one hit."""
    (pair,) = explainer.explain(q, g, maps=(impl.name,), cancel=guard.cancel)
    faces = {"query": pair.query, "gallery": pair.gallery}
    return {side: (torch.as_tensor(faces[side].maps[impl.name]),
                   torch.as_tensor(faces[side].aligned[impl.name])) for side in sides}, \
        pair.cosine


def _family_maps(impl: Method, opts: dict[str, Any], explainer: Explainer, q: FaceFeatures,
                 g: FaceFeatures, sides: tuple[str, ...], guard: Guard
                 ) -> tuple[SideMaps, float]:
    """A per-pair method's maps: ``side_map`` on each face in each view, in aligned
    orientation, averaged over views; the pass plan is checked against the budget first."""
    inputs = _pixel_inputs(impl, explainer, q, g)
    views = len(q.encoders)
    encodes = guard.used  # passes spent encoding crops given as arrays
    per_side: dict[str, list[torch.Tensor]] = {s: [] for s in sides}
    cosines = []
    for v, (encoder, flipped) in enumerate(zip(q.encoders, q.flipped, strict=True)):
        fmaps = torch.cat([q.feature_maps[v], g.feature_maps[v]])
        embs = torch.cat([q.embeddings[v], g.embeddings[v]])
        norms = embs.norm(dim=1)
        units = embs / norms[:, None]
        cosines.append(float(units[0] @ units[1]))
        head = affine_head(encoder, fmaps.device)
        for side in sides:
            me, other = (0, 1) if side == "query" else (1, 0)
            x = None if inputs is None else inputs[v][me : me + 1]
            problem = SideProblem(encoder, x, fmaps[me : me + 1], units[other], norms[me],
                                  head, guard)
            if not v and side == sides[0]:
                planned = encodes + impl.cost(opts, problem) * views * len(sides)
                guard.require(planned, f"{impl.name} with {opts}")
            per_side[side].append(unflip(impl.side_map(problem, opts).detach(), flipped))
    maps = {}
    for side, views_maps in per_side.items():
        mean = torch.stack(views_maps).mean(0)
        aligned = mean if mean.shape == q.crop_size else \
            upsample(mean[None], q.crop_size, q.encoders[0])[0]
        maps[side] = (mean, aligned)
    return maps, float(np.mean(cosines))


def _pixel_inputs(impl: Method, explainer: Explainer, q: FaceFeatures, g: FaceFeatures
                  ) -> list[torch.Tensor] | None:
    """Per view, (2, C, H, W) encoder inputs of both crops for a method that perturbs
    them; None for one that needs features only."""
    if not impl.spec.needs_pixels:
        return None
    if q.crops is None or g.crops is None:
        raise InvalidOption(f"method {impl.name} perturbs the crops; give crops or features "
                            "that carry them")
    return [v.inputs for v in view_inputs(explainer.source, np.concatenate([q.crops, g.crops]))]


def _result(impl: Method, opts: dict[str, Any], maps: SideMaps, cosine: float,
            guard: Guard) -> AttributionMap:
    """The maps as the caller asked to see them, with what the call spent."""
    def shown(m: torch.Tensor) -> np.ndarray:
        if opts["relu"]:
            m = m.clamp_min(0)
        if opts["absolute"]:
            m = m.abs()
        if opts["normalise"]:
            m = m / m.abs().max().clamp_min(1e-12)
        return m.cpu().numpy()

    out: dict[str, np.ndarray | None] = {}
    for side in SIDES:
        native, aligned = maps.get(side, (None, None))
        out[side] = None if native is None else shown(native)
        out[f"{side}_aligned"] = None if aligned is None else shown(aligned)
    return AttributionMap(
        method=impl.name,
        resolution=impl.resolution,
        cosine=cosine,
        query=out["query"],
        gallery=out["gallery"],
        query_aligned=out["query_aligned"],
        gallery_aligned=out["gallery_aligned"],
        forward_passes=guard.used,
        seconds=guard.elapsed,
        options=tuple(sorted(opts.items())),
    )


# The guard of the attribute() call running in this thread (a context variable: each
# gRPC handler thread has its own), polled by hooks inside the encoder (``_polled``).
_CALL_GUARD: contextvars.ContextVar[Guard | None] = contextvars.ContextVar("explain_guard",
                                                                         default=None)
_POLLING: dict[int, tuple[int, list[Any]]] = {}  # id(encoder) -> (calls running, hook handles)
_POLLING_LOCK = threading.Lock()


def _poll(module: nn.Module, inputs: Any, output: Any) -> None:
    """Forward hook: poll the running call's guard after each block of the encoder, and
    again when the backward pass reaches the block, so a late or cancelled call stops
    within one block, not one batch."""
    guard = _CALL_GUARD.get()
    if guard is None:
        return
    guard.check()
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(lambda grad: (guard.check(), grad)[1])


@contextlib.contextmanager
def _polled(encoders: Sequence[nn.Module]) -> Iterator[None]:
    """``_poll`` on every block of ``encoders`` (the children of their Sequential
    containers) while at least one attribute() call runs on them: the first call in
    installs the hooks, the last one out removes them (no hook outlives the calls; a
    hook seen by a thread outside a call does nothing)."""
    encoders = list({id(e): e for e in encoders}.values())
    with _POLLING_LOCK:
        for encoder in encoders:
            count, handles = _POLLING.get(id(encoder), (0, []))
            if not count:
                handles = [block.register_forward_hook(_poll)
                           for module in list(encoder.modules())
                           if isinstance(module, nn.Sequential) for block in module.children()]
            _POLLING[id(encoder)] = (count + 1, handles)
    try:
        yield
    finally:
        with _POLLING_LOCK:
            for encoder in encoders:
                count, handles = _POLLING.pop(id(encoder))
                if count > 1:
                    _POLLING[id(encoder)] = (count - 1, handles)
                else:
                    for handle in handles:
                        handle.remove()

