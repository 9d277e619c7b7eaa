"""Sanity checks: cascading model-parameter randomisation (Adebayo et al. 2018),
top-down, on a deep copy of the encoder; and label randomisation of a gallery.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from encoder.spec import FaceEncoder
from explain.attribution.engine import Explainer
from explain.attribution.views import ViewSource, as_view_source, view_inputs
from explain.evaluation import metrics as M
from explain.evaluation.common import (
    FacePair,
    PairTarget,
    available_methods,
    embed_views,
    query_map,
)

log = logging.getLogger(__name__)

SANITY_PASS_SPEARMAN = 0.5  # |Spearman| after full randomisation must fall below this
LABEL_METHODS = ("similarity", "gradcam")  # computed towards a direction (a centroid)


# ----------------------------------------------------------- sanity checks


def randomisation_units(encoder: FaceEncoder) -> list[str]:
    """Names of the encoder's parameterised units, top (output) first.

    A unit is a module that owns parameters directly, grouped with its siblings
    under the nearest ancestor that is a child of a ``Sequential`` (so a
    conv-BN-PReLU block is one unit); top-level modules are units on their own.
    """
    owners = [
        name
        for name, mod in encoder.named_modules()
        if name and any(True for _ in mod.parameters(recurse=False))
    ]
    seq_children = set()
    for name, mod in encoder.named_modules():
        if isinstance(mod, torch.nn.Sequential):
            seq_children.update(
                f"{name}.{child}" if name else child for child, _ in mod.named_children()
            )
    units: list[str] = []
    for owner in owners:
        parts = owner.split(".")
        unit = owner
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in seq_children:
                unit = prefix
                break
        if unit not in units:
            units.append(unit)
    return units[::-1]


def randomise_unit_(encoder: FaceEncoder, unit: str, generator: torch.Generator) -> None:
    """Replace every parameter under ``unit`` by Gaussian noise of the same mean and std
    (per tensor), in place. Buffers (BN running statistics) are kept, so activations
    keep a sane scale through the randomised layers."""
    module = encoder.get_submodule(unit)
    with torch.no_grad():
        for p in module.parameters():
            mean, std = p.mean(), p.std() if p.numel() > 1 else p.abs().mean()
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            p.copy_(mean + std.clamp_min(1e-8) * noise)


@dataclass(frozen=True)
class RandomisationStep:
    """Agreement of randomised maps with the original ones after ``n_units`` units."""

    method: str
    n_units: int
    last_unit: str  # "" for the un-randomised copy
    spearman: float  # signed maps, mean over pairs
    spearman_abs: float  # |map|, mean over pairs
    ssim: float
    cosine_mean: float  # mean pair cosine under the randomised model


@dataclass(frozen=True)
class LabelRandomisation:
    """Query maps towards a label centroid before vs after permuting the gallery labels."""

    method: str
    spearman: float
    spearman_abs: float
    ssim: float
    n_permutations: int


@dataclass(frozen=True)
class SanityResult:
    steps: tuple[RandomisationStep, ...]
    units: tuple[str, ...]
    labels: tuple[LabelRandomisation, ...]
    errors: dict[str, str]

    def passed(
        self, threshold: float = SANITY_PASS_SPEARMAN, *, every_stage: bool = False
    ) -> dict[str, bool]:
        """Per method: |Spearman| of signed maps after full randomisation < threshold.

        With ``every_stage`` the bound must hold at every randomised stage
        (N >= 1), as Adebayo et al. ask of a map that depends on the top layers:
        a method whose map survives randomising the head or the top blocks
        (guided backprop's classic failure) does not pass.
        """
        full = len(self.units)
        worst: dict[str, float] = {}
        for s in self.steps:
            if s.n_units == full or (every_stage and s.n_units > 0):
                worst[s.method] = max(worst.get(s.method, 0.0), abs(s.spearman))
        return {m: bool(v < threshold) for m, v in worst.items()}


def default_stages(n_units: int) -> list[int]:
    """0 (copy only), the head units, then 1, 2, 4, ... more units, and all of them."""
    stages = {0, n_units}
    k = 1
    while k < n_units:
        stages.add(k)
        k *= 2
    return sorted(stages)


def cascading_randomisation(
    encoder: FaceEncoder,
    pairs: Sequence[FacePair],
    methods: Sequence[str] | None = None,
    *,
    stages: Sequence[int] | None = None,
    flip: bool = False,
    method_options: dict[str, dict] | None = None,
    seed: int = 0,
) -> tuple[list[RandomisationStep], list[str], dict[str, str]]:
    """Adebayo et al.'s cascading randomisation, top-down, on a deep copy of ``encoder``.

    The shared model is never touched: the copy is randomised cumulatively unit
    by unit (:func:`randomisation_units`) and at each stage in ``stages``
    (number of units randomised) every method's query maps are compared with
    those of the original model (Spearman on signed and absolute maps, SSIM).
    """
    from explain.attribution.views import SingleEncoderViews

    methods = tuple(methods or available_methods())
    method_options = method_options or {}
    units = randomisation_units(encoder)
    stages = sorted(set(stages if stages is not None else default_stages(len(units))))
    errors: dict[str, str] = {}

    def maps_of(model: FaceEncoder) -> tuple[dict[str, list[np.ndarray]], float]:
        explainer = Explainer(SingleEncoderViews(model, flip=flip))
        out: dict[str, list[np.ndarray]] = {}
        for method in methods:
            if method in errors:
                continue
            try:
                out[method] = [
                    query_map(
                        method, explainer, p.query, p.gallery, native=True,
                        **method_options.get(method, {}),
                    )
                    for p in pairs
                ]
            except Exception as exc:
                log.warning("method %s failed under randomisation: %s", method, exc)
                errors[method] = f"{type(exc).__name__}: {exc}"
        cos = np.mean(
            [
                PairTarget(SingleEncoderViews(model, flip=flip), p.query, p.gallery).scores(
                    p.query[None]
                )[1][0]
                for p in pairs
            ]
        )
        return out, float(cos)

    original, _ = maps_of(encoder)
    work = copy.deepcopy(encoder).eval()
    gen = torch.Generator().manual_seed(seed)
    done = 0
    results: list[RandomisationStep] = []
    for stage in stages:
        while done < stage:
            randomise_unit_(work, units[done], gen)
            done += 1
        randomised, cos = maps_of(work)
        for method, maps in randomised.items():
            if method not in original:
                continue
            pairs_ref = original[method]
            results.append(
                RandomisationStep(
                    method=method,
                    n_units=stage,
                    last_unit=units[stage - 1] if stage else "",
                    spearman=float(
                        np.mean([M.spearman(a, b) for a, b in zip(pairs_ref, maps, strict=True)])
                    ),
                    spearman_abs=float(
                        np.mean(
                            [
                                M.spearman(np.abs(a), np.abs(b))
                                for a, b in zip(pairs_ref, maps, strict=True)
                            ]
                        )
                    ),
                    ssim=float(
                        np.mean([M.map_ssim(a, b) for a, b in zip(pairs_ref, maps, strict=True)])
                    ),
                    cosine_mean=cos,
                )
            )
    return results, units, errors


def centroid_directions(embeddings: np.ndarray, members: np.ndarray) -> np.ndarray:
    """(G, V, D) embeddings, (G,) bool -> (V, D) mean of the per-view normalised members."""
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    return e[np.asarray(members, dtype=bool)].mean(axis=0)


def label_randomisation(
    model: FaceEncoder | ViewSource,
    query: np.ndarray,
    gallery_crops: np.ndarray,
    gallery_labels: Sequence[str],
    label: str,
    methods: Sequence[str] = LABEL_METHODS,
    *,
    n_permutations: int = 5,
    seed: int = 0,
) -> list[LabelRandomisation]:
    """The data-randomisation sanity check, adapted to a gallery.

    The query is explained towards the centroid of ``label`` (mean of the
    normalised embeddings of the gallery images carrying it, per view). Then the
    gallery's labels are permuted at random (same label counts) and the query is
    explained towards the centroid of the images that now carry ``label``. An
    explanation that depends on what the syndrome looks like must change:
    low Spearman/SSIM between the true-label and permuted-label maps is a pass.
    Only methods that accept a direction target take part: the CAM family (the
    similarity map and Grad-CAM by default), computed exactly from the affine head.
    """
    from explain.attribution.affine import affine_head
    from explain.attribution.cam import CamMethod
    from explain.attribution.implementations import METHODS

    cams = {m: METHODS[m] for m in methods if isinstance(METHODS.get(m), CamMethod)}
    source = as_view_source(model)
    labels = np.asarray(gallery_labels, dtype=object)
    if not np.any(labels == label):
        raise M.EvaluationError(f"no gallery image carries the label {label!r}")
    g_emb = embed_views(source, np.asarray(gallery_crops))
    views = view_inputs(source, np.asarray(query)[None])

    def maps_towards(directions: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {name: [] for name in cams}
        with torch.no_grad():
            for v, view in enumerate(views):
                head = affine_head(view.encoder)
                fmap = view.encoder.features(view.inputs)  # (1, C, h, w)
                e = head.contributions(fmap).sum(1)[0] + head.bias
                u = torch.as_tensor(directions[v], dtype=torch.float32)
                grads = head.pullback((u / u.norm())[None])[0] / e.norm()  # (C, P) = ∂t/∂F
                for name, method in cams.items():
                    m = method.cam(grads, fmap[0].flatten(1)).reshape(head.grid)
                    out[name].append(torch.flip(m, dims=[-1]) if view.flipped else m)
        return {k: torch.stack(v).mean(0).numpy() for k, v in out.items()}

    true = maps_towards(centroid_directions(g_emb, labels == label))
    rng = np.random.default_rng(seed)
    permuted = [
        maps_towards(centroid_directions(g_emb, rng.permutation(labels) == label))
        for _ in range(n_permutations)
    ]
    results = []
    for method in methods:
        if method not in true:
            continue
        a = true[method]
        results.append(
            LabelRandomisation(
                method=method,
                spearman=float(np.mean([M.spearman(a, p[method]) for p in permuted])),
                spearman_abs=float(
                    np.mean([M.spearman(np.abs(a), np.abs(p[method])) for p in permuted])
                ),
                ssim=float(np.mean([M.map_ssim(a, p[method]) for p in permuted])),
                n_permutations=n_permutations,
            )
        )
    return results
