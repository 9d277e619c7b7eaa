"""Evaluation protocols for explanations of the pair similarity, and GM matching accuracy.

Every protocol explains the QUERY side of a (query, gallery) pair and scores
it against the pair similarity with norms held constant (DESIGN §5):

    s(x) = mean_v <e_v(x), ê_g,v> / ‖e_v(x₀)‖

where x₀ is the unperturbed query crop. At x = x₀ this is the cosine; under
perturbation it is linear in the embedding, so maps that sum to the cosine
(the similarity map) are judged on the quantity they decompose. The plain
cosine of every perturbed image is recorded alongside.

Protocols (each returns a small frozen dataclass that ``explain.evaluation.report``
turns into JSON, Markdown and PNG):

- :func:`faithfulness`: deletion and insertion curves (blur and mean
  baselines) for the positive side (most similar first: s should fall) and
  the negative side (most dissimilar first: s should rise), against random
  orders; captum's infidelity and max-sensitivity.
- :func:`sanity`: cascading model-parameter randomisation (Adebayo et al.
  2018), top-down, on a deep copy of the encoder; and label randomisation of a
  gallery (see :func:`label_randomisation`).
- :func:`localisation`: IOU and IOU* against landmark region masks.
- :func:`cost_and_consistency`: run time, spread over repeats and under small
  input noise.
- :func:`accuracy`: GestaltMatcher's macro top-k on subject-disjoint splits.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from encoder.spec import FaceEncoder
from explain.attribution.engine import Explainer
from explain.attribution.views import ViewSource, as_view_source, view_inputs
from explain.evaluation import metrics as M
from explain.regions import EVALUATION_REGIONS, region_masks

log = logging.getLogger(__name__)

ENGINE_METHODS: tuple[str, ...] = ("similarity", "gradcam")
SIDES: tuple[str, ...] = ("positive", "negative")
SANITY_PASS_SPEARMAN = 0.5  # |Spearman| after full randomisation must fall below this

# The real photo pairs (encoder.assets.PHOTOS): two same-person pairs taken
# years apart, and impostor pairs among the same photos.
DEFAULT_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("person_a_1.jpg", "person_a_2.jpg", "same"),
    ("person_b_1.jpg", "person_b_2.jpg", "same"),
    ("person_a_1.jpg", "person_b_1.jpg", "impostor"),
    ("person_a_2.jpg", "impostor_1.jpg", "impostor"),
    ("person_b_2.jpg", "impostor_2.jpg", "impostor"),
    ("impostor_1.jpg", "impostor_2.jpg", "impostor"),
)


# ------------------------------------------------------------------ pairs


@dataclass(frozen=True)
class FacePair:
    """An aligned (query, gallery) pair; the query side is the one explained.

    query, gallery: (H, W, 3) uint8 aligned crops; query_landmarks (5, 2) in the crop.
    """

    name: str
    kind: str  # "same" or "impostor"
    query: np.ndarray = field(repr=False)
    gallery: np.ndarray = field(repr=False)
    query_landmarks: np.ndarray = field(repr=False)


def photo_pairs(
    pairs: Sequence[tuple[str, str, str]] = DEFAULT_PAIRS, pipeline=None
) -> list[FacePair]:
    """Detect and align the bundled photos named in ``pairs`` (query, gallery, kind)."""
    from encoder.assets import photo

    if pipeline is None:
        from encoder.pipeline import FacePipeline

        pipeline = FacePipeline()
    cache: dict[str, object] = {}

    def face(name: str):
        if name not in cache:
            cache[name] = pipeline.face(photo(name))
        return cache[name]

    out = []
    for q, g, kind in pairs:
        fq, fg = face(q), face(g)
        out.append(
            FacePair(
                name=f"{q.rsplit('.', 1)[0]}~{g.rsplit('.', 1)[0]}",
                kind=kind,
                query=fq.alignment.crop,
                gallery=fg.alignment.crop,
                query_landmarks=np.asarray(fq.alignment.landmarks_crop, dtype=np.float64),
            )
        )
    return out


# ----------------------------------------------------------- the target


def embed_views(source: ViewSource, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, H, W, 3) pixels (uint8 or float 0..255) -> (N, V, D) unnormalised per-view embeddings."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            chunk = np.asarray(images[i : i + batch_size])
            views = view_inputs(source, chunk)
            out.append(torch.stack([v.encoder(v.inputs) for v in views], dim=1))
    return torch.cat(out).cpu().numpy()


class PairTarget:
    """The held-norm pair similarity of (perturbed) query crops against one fixed target.

    The target is either a gallery crop or per-view target directions
    ``(V, D)`` (e.g. a syndrome centroid). Calls are batched and gradient-free.
    """

    def __init__(
        self,
        model: FaceEncoder | ViewSource,
        query: np.ndarray,
        gallery: np.ndarray | None = None,
        *,
        directions: np.ndarray | None = None,
        batch_size: int = 64,
    ) -> None:
        self.source = as_view_source(model)
        self.batch_size = batch_size
        if (gallery is None) == (directions is None):
            raise ValueError("give exactly one of gallery (a crop) or directions (V, D)")
        if directions is None:
            directions = self.embed(np.asarray(gallery)[None])[0]
        d = torch.as_tensor(np.asarray(directions, dtype=np.float32))
        self.directions = d / d.norm(dim=-1, keepdim=True)  # (V, D)
        self.query_norms = torch.as_tensor(self.embed(np.asarray(query)[None])[0]).norm(dim=-1)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) pixels -> (N, V, D) unnormalised embeddings."""
        return embed_views(self.source, images, self.batch_size)

    def scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) -> ((N,) held-norm similarity, (N,) cosine), both view-averaged."""
        e = torch.as_tensor(self.embed(images))  # (N, V, D)
        dots = (e * self.directions[None]).sum(-1)  # (N, V)
        held = (dots / self.query_norms[None]).mean(1)
        cos = (dots / e.norm(dim=-1)).mean(1)
        return held.numpy().astype(np.float64), cos.numpy().astype(np.float64)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.scores(images)[0]


# ----------------------------------------------------------- method dispatch


def available_methods() -> tuple[str, ...]:
    """Every method of the explain family (``explain.attribution.methods.METHODS``), in its order."""
    try:
        from explain.attribution.methods import METHODS
    except ImportError:
        return ENGINE_METHODS
    return tuple(METHODS)


def query_map(
    method: str,
    explainer: Explainer,
    query: np.ndarray,
    gallery: np.ndarray,
    **options,
) -> np.ndarray:
    """(H, W) float32 signed map of ``method`` on the query side, in aligned-crop pixels.

    Goes through the family's uniform call ``explain.attribution.methods.attribute`` (query
    side only); ``options`` are passed on (method options; ``budget`` and
    ``time_limit`` default to None here).
    Without the family, ``similarity`` and ``gradcam`` come from the engine.
    """
    try:
        from explain.attribution.methods import attribute
    except ImportError:
        attribute = None
    if attribute is None:
        if method not in ENGINE_METHODS:
            raise M.EvaluationError(f"method {method!r} needs explain.attribution.methods")
        (pair,) = explainer.explain(query, np.asarray(gallery)[None])
        side = pair.query
        amap = side.similarity_aligned if method == "similarity" else side.gradcam_aligned
        return np.asarray(amap, dtype=np.float32)
    # Measurements are not requests: no time limit (a loaded machine must not cut a
    # method short) and no pass budget unless the caller sets them.
    options = {"time_limit": None, "budget": None, **options}
    result = attribute(method, explainer, query, gallery, sides=("query",), **options)
    return M.upsample_map(np.asarray(result.query_aligned, dtype=np.float32), query.shape[:2])


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
                        method, explainer, p.query, p.gallery, **method_options.get(method, {})
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
    methods: Sequence[str] = ENGINE_METHODS,
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
    Only methods that accept a direction target take part (the engine's
    similarity map and Grad-CAM, computed exactly from the affine head).
    """
    from explain.attribution.affine import affine_head

    source = as_view_source(model)
    labels = np.asarray(gallery_labels, dtype=object)
    if not np.any(labels == label):
        raise M.EvaluationError(f"no gallery image carries the label {label!r}")
    g_emb = embed_views(source, np.asarray(gallery_crops))
    views = view_inputs(source, np.asarray(query)[None])

    def maps_towards(directions: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {"similarity": [], "gradcam": []}
        with torch.no_grad():
            for v, view in enumerate(views):
                head = affine_head(view.encoder)
                fmap = view.encoder.features(view.inputs)  # (1, C, h, w)
                e = head.contributions(fmap).sum(1)[0] + head.bias
                u = torch.as_tensor(directions[v], dtype=torch.float32)
                u = u / u.norm()
                sim = head.contributions(fmap)[0] @ u / e.norm()  # (P,)
                cam = (u @ head.mean_weight) @ fmap[0].flatten(1) / e.norm()
                h, w = head.grid
                for name, m in (("similarity", sim), ("gradcam", cam)):
                    m = m.reshape(h, w)
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


# ----------------------------------------------------------- localisation


def query_maps(
    model: FaceEncoder | ViewSource,
    pairs: Sequence[FacePair],
    methods: Sequence[str] | None = None,
    *,
    method_options: dict[str, dict] | None = None,
) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """Every method's (H, W) query map for every pair; failing methods go to the errors."""
    explainer = Explainer(model)
    method_options = method_options or {}
    maps: dict[str, list[np.ndarray]] = {}
    errors: dict[str, str] = {}
    for method in methods or available_methods():
        try:
            maps[method] = [
                query_map(method, explainer, p.query, p.gallery, **method_options.get(method, {}))
                for p in pairs
            ]
        except Exception as exc:
            log.warning("method %s failed: %s", method, exc)
            errors[method] = f"{type(exc).__name__}: {exc}"
    return maps, errors


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


# ----------------------------------------------------------- cost and consistency


def _takes_seed(method: str) -> bool:
    try:
        from explain.attribution.methods import METHODS
    except ImportError:
        return False
    return "seed" in getattr(METHODS.get(method), "defaults", {})


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


# ----------------------------------------------------------- matching accuracy


def accuracy(
    query_embeddings: np.ndarray,
    query_split: M.Split,
    gallery_embeddings: np.ndarray,
    gallery_split: M.Split,
    ks: Sequence[int] = M.TOP_KS,
) -> M.TopKAccuracy:
    """GestaltMatcher's protocol (subject-disjoint, macro top-k); see ``metrics.split_accuracy``."""
    return M.split_accuracy(query_embeddings, query_split, gallery_embeddings, gallery_split, ks)
