"""The attribution family: one uniform call, each method a few lines that say how it differs.

``attribute(method, explainer, query, hit, *, budget, time_limit, cancel, ...)``
explains one pair; query and hit are aligned crops or their precomputed
``FaceFeatures`` (cached gallery faces skip their encode; pixel methods use the
crops the features carry). Maps for a query and K hits, with the engine's
batched maps, go through ``explain.attribution.matches.explain_matches``. Every method targets the pair similarity with the norm of
the explained face held constant (DESIGN.md §5):

    t(x) = <e(x), ê_other> / ‖e_self‖        (‖e_self‖ and ê_other fixed)

so perturbation and gradient methods answer the same question as the
similarity maps. Feature-resolution methods (the CAM family) reuse the
engine's affine head: their gradients are ``Wᵀ ê_other / ‖e_self‖`` and cost
no backward pass; pixel methods (occlusion, RISE, gradients) run the encoder on
perturbed inputs and return crop-resolution maps, channels summed.

Shape: as in pytorch-grad-cam, a CAM method overrides ``weights(grads, acts)``
only. Maps are signed; ``relu``, ``absolute`` and ``normalise`` (divide by
max |map|, keeping the sign) are options, never applied silently. Each call
has a budget of forward passes (images through the encoder) checked before it
starts and while it runs, a time limit, and a cancellation signal: polled before
every batch, and inside the encoder after every block of the forward and backward
passes (``_polled``), so a late or cancelled call stops within one block; batches of
a cancellable call are sized by the time they take (``Guard.batches``).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as nnf
from captum._utils.common import _register_backward_hook
from captum.attr import DeepLift, GuidedBackprop, IntegratedGradients, Occlusion, Saliency
from captum.attr._core.deep_lift import nonlinear
from torch import nn

from encoder.spec import FaceEncoder
from explain.attribution.affine import AffineHead, affine_head
from explain.attribution.engine import Explainer, FaceFeatures, _upsample, check_compatible
from explain.attribution.views import view_inputs
from explain.errors import InvalidOption, UnknownMethod
from explain.limits import DEFAULT_BUDGET, DEFAULT_TIME_LIMIT_S, CancelSignal, Guard

SIDES = ("query", "gallery")
# Largest batch sizes (the ``batch_size`` options): a batch is the unit of work between
# two guard polls, so it bounds how long a cancelled or late call keeps running and the
# memory one call holds. Within these, each batch is sized by the time it takes
# (``Guard.batches``: about ``explain.limits.BATCH_TARGET_S`` per batch at the measured
# rate, never more than the time left); on a shared 2-core CPU (SFace, 112x112) that is
# a few forward-only images or one or two forward and backward.
NO_GRAD_BATCH = 4
GRAD_BATCH = 2

# captum announces every hook it sets; ours go on private copies and are removed by captum.
warnings.filterwarnings("ignore", message=r"Setting (forward, )?backward hooks", module="captum")
warnings.filterwarnings("ignore", message=r"\s*Setting forward, backward hooks", module="captum")


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


@dataclass(frozen=True)
class SideProblem:
    """One face of the pair in one view: what a method needs to explain it.

    x (1, C, H, W) encoder input (already flipped for a flipped view);
    feature_map (1, C', h, w); direction (D,) = ê of the other face; norm = ‖e‖
    of this face; baseline = the encoder-input value of a black pixel.
    """

    encoder: FaceEncoder
    x: torch.Tensor | None  # None when only features were given (CAM methods need no pixels)
    feature_map: torch.Tensor
    direction: torch.Tensor
    norm: torch.Tensor
    head: AffineHead
    baseline: float
    guard: Guard

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B,) held-norm similarity; counts B forward passes.

        The guard is polled before the forward and again before its backward."""
        self.guard.spend(int(x.shape[0]))
        return _checked_backward(self.encoder(x) @ self.direction / self.norm, self.guard)

    def kind(self, backward: bool) -> str:
        """The guard's name for one image of this problem through the encoder (forward
        only, or forward and backward), whose time it measures to size batches."""
        spec = self.encoder.spec
        return f"{spec.name}/{'x'.join(map(str, spec.input_size))}/" + \
            ("backward" if backward else "forward")

    def batched_target(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``target`` of (B, C, H, W) in batches of at most ``batch_size``, each sized
        by the time it takes (``Guard.batches``)."""
        return torch.cat([self.target(x[part]) for part in
                          self.guard.batches(int(x.shape[0]), self.kind(False), batch_size)])

    def batch_size(self, most: int, backward: bool) -> int:
        """A batch size for work run elsewhere in batches (captum): sized by the time an
        image takes, at most ``most``."""
        return self.guard.batch_size(self.kind(backward), most)

    def gradient(self) -> torch.Tensor:
        """(C', P): ∂t/∂F, constant for an affine head."""
        return self.head.pullback(self.direction[None])[0] / self.norm


class Method:
    """Base: ``defaults`` names every option; ``cost`` is forward passes per side and view."""

    name: ClassVar[str]
    resolution: ClassVar[str] = "pixel"
    needs_pixels: ClassVar[bool] = True  # perturbs or differentiates the crop itself
    defaults: ClassVar[dict[str, Any]] = {}

    def cost(self, opts: dict[str, Any], problem: SideProblem) -> int:
        return 1

    def side_map(self, p: SideProblem, opts: dict[str, Any]) -> torch.Tensor:
        """-> (h, w) or (H, W) signed map in the view's (possibly flipped) frame."""
        raise NotImplementedError

    def pair_maps(
        self, explainer: Explainer, q: FaceFeatures, g: FaceFeatures, opts: dict[str, Any]
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """Both faces' maps at once, view-averaged, in aligned orientation, each as (map,
        the map drawn on the aligned crop); None (the default): the method works one face
        and one view at a time (``side_map``)."""
        return None


class CamMethod(Method):
    """Σ_c w_c ⊙ F_c with the held-norm gradient; subclasses give the weights only."""

    resolution: ClassVar[str] = "feature"
    needs_pixels: ClassVar[bool] = False

    def cost(self, opts: dict[str, Any], problem: SideProblem) -> int:
        return 0

    def weights(self, grads: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """grads, acts (C, P) -> (C,) channel weights or (C, P) per-position weights."""
        raise NotImplementedError

    def side_map(self, p: SideProblem, opts: dict[str, Any]) -> torch.Tensor:
        acts = p.feature_map[0].flatten(1)
        w = self.weights(p.gradient(), acts)
        cam = (w[:, None] * acts if w.dim() == 1 else w * acts).sum(0)
        return cam.reshape(p.head.grid)


class Similarity(CamMethod):
    """The engine's similarity map; equals HiResCAM of the held-norm target."""

    name = "similarity"

    def weights(self, grads, acts):
        return grads


class Contrast(Method):
    """What differs: the shared first-order difference map at the encoder's contrast layer
    (``explain.attribution.contrast``); the engine computes it for a pair as for K hits."""

    name = "contrast"
    resolution = "feature"
    needs_pixels = False

    def cost(self, opts, problem):
        return 0

    def pair_maps(self, explainer, q, g, opts):
        (pair,) = explainer.explain(q, g, maps=("contrast",))
        return tuple((torch.as_tensor(side.maps["contrast"]),
                      torch.as_tensor(side.aligned["contrast"]))
                     for side in (pair.query, pair.gallery))


class HiResCAM(Similarity):
    name = "hirescam"


class GradCAM(CamMethod):
    name = "gradcam"

    def weights(self, grads, acts):
        return grads.mean(1)


class GradCAMPlusPlus(CamMethod):
    """Chattopadhyay et al.'s closed form with the exponential-output assumption,
    as pytorch-grad-cam computes it."""

    name = "gradcam++"

    def weights(self, grads, acts):
        g2, g3 = grads**2, grads**3
        denom = 2 * g2 + acts.sum(1, keepdim=True) * g3
        aij = torch.where(grads != 0, g2 / (denom + 1e-7), torch.zeros_like(grads))
        return (aij * grads.clamp_min(0)).sum(1)


class XGradCAM(CamMethod):
    name = "xgradcam"

    def weights(self, grads, acts):
        return (grads * acts).sum(1) / (acts.sum(1) + 1e-7)


class LayerCAM(CamMethod):
    name = "layercam"

    def weights(self, grads, acts):
        return grads.clamp_min(0)


class ScoreCAM(Method):
    """Score-CAM: each channel, upsampled and scaled to [0, 1], masks the face
    (towards black); its weight is the similarity gained over the all-black face.
    With C' = 1024 channels the ``channels`` most active ones are used."""

    name = "scorecam"
    resolution = "feature"
    defaults = {"channels": 64, "batch_size": NO_GRAD_BATCH}

    def cost(self, opts, problem):
        return min(opts["channels"], problem.feature_map.shape[1]) + 1

    def side_map(self, p, opts):
        acts = p.feature_map[0]  # (C', h, w)
        n = min(opts["channels"], acts.shape[0])
        chosen = acts.flatten(1).mean(1).topk(n).indices
        masks = _upsample(acts[chosen], tuple(p.x.shape[-2:]))  # (n, H, W)
        lo = masks.flatten(1).min(1).values[:, None, None]
        hi = masks.flatten(1).max(1).values[:, None, None]
        masks = ((masks - lo) / (hi - lo).clamp_min(1e-7))[:, None]
        with torch.no_grad():
            masked = p.baseline + masks * (p.x - p.baseline)
            scores = p.batched_target(masked, opts["batch_size"])
            blank = p.target(torch.full_like(p.x, p.baseline))
        return torch.einsum("c,chw->hw", scores - blank, acts[chosen])


class OcclusionMethod(Method):
    """captum Occlusion: black ``patch``×``patch`` squares every ``stride`` pixels
    (10×10 by default, as in the GestaltMatcher explainability thesis); a pixel's
    value is the mean similarity lost when the squares covering it are black."""

    name = "occlusion"
    defaults = {"patch": 10, "stride": 10, "batch_size": NO_GRAD_BATCH}

    def cost(self, opts, problem):
        h, w = problem.x.shape[-2:]
        patch, stride = opts["patch"], opts["stride"]
        if not (1 <= patch <= min(h, w)) or stride < 1:
            raise InvalidOption(
                f"occlusion patch {patch} / stride {stride} do not fit a {w}x{h} crop"
            )
        return ((h - patch) // stride + 1) * ((w - patch) // stride + 1) + 1

    def side_map(self, p, opts):
        c = p.x.shape[1]
        size = p.batch_size(opts["batch_size"], backward=False)
        kind = p.kind(False)

        def timed_target(x: torch.Tensor) -> torch.Tensor:
            with p.guard.timed(kind, int(x.shape[0])):
                return p.target(x)

        with torch.no_grad():
            attr = Occlusion(timed_target).attribute(
                p.x,
                sliding_window_shapes=(c, opts["patch"], opts["patch"]),
                strides=(c, opts["stride"], opts["stride"]),
                baselines=p.baseline,
                perturbations_per_eval=size,
            )
        return attr[0].sum(0)


class RISE(Method):
    """RISE (Petsiuk et al. 2018): random smooth masks (``grid``×``grid`` cells kept
    with probability ``p``), the map is Σ_i (t_i − t̄) M_i / (N p). Centring on the
    mean score t̄ makes it signed; ``centre=False`` gives the original estimator."""

    name = "rise"
    defaults = {"masks": 250, "grid": 7, "p": 0.5, "seed": 0, "batch_size": NO_GRAD_BATCH,
                "centre": True}

    def cost(self, opts, problem):
        return opts["masks"]

    def side_map(self, p, opts):
        h, w = p.x.shape[-2:]
        n, s, keep = opts["masks"], opts["grid"], opts["p"]
        gen = torch.Generator().manual_seed(opts["seed"])
        cell = (math.ceil(h / s), math.ceil(w / s))
        coarse = (torch.rand(n, 1, s, s, generator=gen) < keep).float()
        big = nnf.interpolate(
            coarse,
            size=((s + 1) * cell[0], (s + 1) * cell[1]),
            mode="bilinear",
            align_corners=False,
        )
        dy = torch.randint(0, cell[0], (n,), generator=gen)
        dx = torch.randint(0, cell[1], (n,), generator=gen)
        masks = torch.stack([big[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
        masks = masks.to(p.x.device)
        with torch.no_grad():
            scores = p.batched_target(p.baseline + masks * (p.x - p.baseline), opts["batch_size"])
        if opts["centre"]:
            scores = scores - scores.mean()
        return torch.einsum("n,nhw->hw", scores, masks[:, 0]) / (n * keep)


class IntegratedGradientsMethod(Method):
    """captum IntegratedGradients from the black face (Gauss-Legendre, ``steps`` points)."""

    name = "integrated_gradients"
    defaults = {"steps": 32, "batch_size": GRAD_BATCH}

    def cost(self, opts, problem):
        return opts["steps"]

    def side_map(self, p, opts):
        with p.guard.timed(p.kind(True), opts["steps"]):
            attr = IntegratedGradients(p.target).attribute(
                p.x,
                baselines=p.baseline,
                n_steps=opts["steps"],
                internal_batch_size=p.batch_size(opts["batch_size"], backward=True),
            )
        return attr[0].sum(0)


class SaliencyMethod(Method):
    """captum Saliency, signed (abs=False): the held-norm similarity's input gradient."""

    name = "saliency"

    def side_map(self, p, opts):
        return Saliency(p.target).attribute(_leaf(p.x), abs=False)[0].sum(0)


class SmoothGrad(Method):
    """SmoothGrad: the input gradient averaged over ``samples`` noisy copies (σ =
    ``sigma`` × input range). Its own seeded generator, not captum's NoiseTunnel,
    which draws from torch's global RNG and so depends on concurrent requests."""

    name = "smoothgrad"
    defaults = {"samples": 16, "sigma": 0.15, "seed": 0, "batch_size": GRAD_BATCH,
                "times_input": False}

    def cost(self, opts, problem):
        return opts["samples"]

    def side_map(self, p, opts):
        gen = torch.Generator().manual_seed(opts["seed"])
        sigma = opts["sigma"] * float(p.x.max() - p.x.min())
        noise = torch.randn((opts["samples"], *p.x.shape[1:]), generator=gen).to(p.x.device)
        total = torch.zeros_like(p.x[0])
        for part in p.guard.batches(len(noise), p.kind(True), opts["batch_size"]):
            noisy = (p.x + sigma * noise[part]).requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(p.target(noisy).sum(), noisy)
            total += grad.sum(0)
        grad = total / opts["samples"]
        return (grad * p.x[0] if opts["times_input"] else grad).sum(0)


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


def _checked_backward(t: torch.Tensor, guard: Guard) -> torch.Tensor:
    """Poll ``guard`` when a backward pass reaches ``t``, so a cancelled or late call
    stops before spending a batch's backward."""
    if t.requires_grad:
        t.register_hook(lambda grad: (guard.check(), grad)[1])
    return t


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


class _TargetModule(nn.Module):
    """t(x) as a module, around a private copy of the encoder (hooks land on the copy)."""

    def __init__(self, p: SideProblem) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(p.encoder)
        self.problem = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        guard = self.problem.guard
        guard.spend(int(x.shape[0]))
        return _checked_backward(self.encoder(x) @ self.problem.direction / self.problem.norm,
                                 guard)


class _GuidedBackpropPReLU(GuidedBackprop):
    """captum's GuidedBackprop hooks nn.ReLU only; SFace and iResNet use nn.PReLU.
    The same rule (only positive gradients flow back) applies to their PReLUs."""

    def _register_hooks(self, module: nn.Module) -> None:
        if isinstance(module, (nn.ReLU, nn.PReLU)):
            self.backward_hooks.extend(_register_backward_hook(module, self._backward_hook, self))


class _DeepLiftPReLU(DeepLift):
    """captum's DeepLift has no rule for nn.PReLU and would pass plain gradients through
    it (breaking summation-to-delta); PReLU is elementwise, so the Rescale rule applies."""

    def _is_non_linear(self, module: nn.Module) -> bool:
        return type(module) is nn.PReLU or super()._is_non_linear(module)

    def _backward_hook(self, module, grad_input, grad_output):
        if type(module) is not nn.PReLU:
            return super()._backward_hook(module, grad_input, grad_output)
        if not self.satisfies_attribute_criteria(module):
            raise RuntimeError(f"DeepLift: module {module} is used more than once")
        multipliers = nonlinear(
            module, module.input, module.output, grad_input, grad_output, eps=self.eps
        )
        del module.input
        del module.output
        return multipliers


class GuidedBackpropMethod(Method):
    name = "guided_backprop"

    def side_map(self, p, opts):
        module = _TargetModule(p)
        return _GuidedBackpropPReLU(module).attribute(_leaf(p.x))[0].sum(0)


class DeepLiftMethod(Method):
    """captum DeepLift (Rescale rule) from the black face, on a private copy of the encoder."""

    name = "deeplift"

    def cost(self, opts, problem):
        return 2

    def side_map(self, p, opts):
        module = _TargetModule(p)
        baseline = torch.full_like(p.x, p.baseline)
        return _DeepLiftPReLU(module).attribute(_leaf(p.x), baselines=baseline)[0].sum(0)


METHODS: dict[str, Method] = {
    m.name: m()
    for m in (
        Contrast,
        Similarity,
        HiResCAM,
        GradCAM,
        GradCAMPlusPlus,
        XGradCAM,
        LayerCAM,
        ScoreCAM,
        OcclusionMethod,
        RISE,
        IntegratedGradientsMethod,
        SmoothGrad,
        SaliencyMethod,
        GuidedBackpropMethod,
        DeepLiftMethod,
    )
}
# explain.attribution.verification adds xSSAB and CorrRISE (the catalogue, matches.py, imports it).


def list_methods() -> list[str]:
    return list(METHODS)


def _options(method: Method, given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(method.defaults))
    if unknown:
        raise InvalidOption(
            f"method {method.name} has no option {', '.join(unknown)}; "
            f"it takes {sorted(method.defaults) or 'none'}"
        )
    opts = {**method.defaults, **given}
    for key, value in opts.items():
        default = method.defaults[key]
        if (
            isinstance(default, int)
            and not isinstance(default, bool)
            and (not isinstance(value, int) or value < 0)
        ):
            raise InvalidOption(f"option {key} of {method.name} must be a non-negative int")
    return opts


def _postprocess(m: torch.Tensor, relu: bool, absolute: bool, normalise: bool) -> torch.Tensor:
    if relu:
        m = m.clamp_min(0)
    if absolute:
        m = m.abs()
    if normalise:
        m = m / m.abs().max().clamp_min(1e-12)
    return m


def _faces(
    explainer: Explainer, query: np.ndarray | FaceFeatures, hit: np.ndarray | FaceFeatures,
    guard: Guard,
) -> tuple[FaceFeatures, FaceFeatures]:
    """Features of both faces; crops given as arrays are encoded here (counted as passes)."""
    given = [f if isinstance(f, FaceFeatures) else np.asarray(f)[None] for f in (query, hit)]
    crops = [f for f in given if not isinstance(f, FaceFeatures)]
    if crops:
        guard.check()
        encoded = explainer.encode(np.concatenate(crops), cancel=guard.cancel)
        guard.spend(len(crops) * len(encoded.encoders))
        it = iter(range(len(crops)))
        given = [f if isinstance(f, FaceFeatures) else encoded.select(next(it)) for f in given]
    q, g = given
    check_compatible(q, g)
    if len(q) != 1 or len(g) != 1:
        raise InvalidOption(f"attribute() explains one pair, got {len(q)} x {len(g)} faces")
    return q, g


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
    every block of the encoder, forward and backward.
    ``options`` are the method's own (see ``METHODS[name].defaults``). Raises
    UnknownMethod.
    """
    impl = METHODS.get(method)
    if impl is None:
        raise UnknownMethod(f"unknown attribution method {method!r}; known: {', '.join(METHODS)}")
    bad_sides = set(sides) - set(SIDES) if sides else {"(none)"}
    if bad_sides:
        raise InvalidOption(f"sides must be a non-empty subset of {SIDES}, got {sides}")
    opts = _options(impl, options)
    guard = Guard(budget, time_limit, cancel)
    token = _CALL_GUARD.set(guard)  # what the encoder's block hooks poll (_polled)
    try:
        q, g = _faces(explainer, query, hit, guard)
        with _polled(q.encoders):
            return _side_maps(method, impl, opts, guard, explainer, q, g, sides, relu,
                              absolute, normalise)
    finally:
        _CALL_GUARD.reset(token)


def _side_maps(method: str, impl: Method, opts: dict[str, Any], guard: Guard,
               explainer: Explainer, q: FaceFeatures, g: FaceFeatures, sides: tuple[str, ...],
               relu: bool, absolute: bool, normalise: bool) -> AttributionMap:
    """``attribute``'s work once both faces' features are at hand."""
    encodes = guard.used  # passes spent encoding crops given as arrays
    inputs: list[torch.Tensor | None] = [None] * len(q.encoders)
    if impl.needs_pixels:
        if q.crops is None or g.crops is None:
            raise InvalidOption(f"method {method} perturbs the crops; give crops or features "
                                "that carry them")
        inputs = [v.inputs for v in view_inputs(explainer.source, np.concatenate([q.crops, g.crops]))]

    per_side: dict[str, list[torch.Tensor]] = {s: [] for s in sides}
    drawn: dict[str, torch.Tensor] = {}  # aligned maps a pair method drew itself
    cosines = []
    planned = 0
    both = impl.pair_maps(explainer, q, g, opts)
    if both is not None:
        for side, (m, aligned) in zip(SIDES, both, strict=True):
            if side in sides:
                per_side[side].append(m)
                drawn[side] = aligned
    for v, (encoder, flipped) in enumerate(zip(q.encoders, q.flipped, strict=True)):
        if both is not None:
            units = [e[0] / e[0].norm() for e in (q.embeddings[v], g.embeddings[v])]
            cosines.append(float(units[0] @ units[1]))
            continue
        fmaps = torch.cat([q.feature_maps[v], g.feature_maps[v]])
        embs = torch.cat([q.embeddings[v], g.embeddings[v]])
        head = affine_head(encoder, fmaps.device)
        norms = embs.norm(dim=1)
        units = embs / norms[:, None]
        cosines.append(float(units[0] @ units[1]))
        baseline = (0.0 - encoder.spec.mean) / encoder.spec.std
        for side in sides:
            me, other = (0, 1) if side == "query" else (1, 0)
            x = inputs[v]
            problem = SideProblem(
                encoder,
                None if x is None else x[me : me + 1],
                fmaps[me : me + 1],
                units[other],
                norms[me],
                head,
                baseline,
                guard,
            )
            if not planned:
                planned = encodes + impl.cost(opts, problem) * len(q.encoders) * len(sides)
                guard.require(planned, f"{method} with {opts}")
            m = impl.side_map(problem, opts).detach()
            per_side[side].append(torch.flip(m, dims=[-1]) if flipped else m)

    maps: dict[str, np.ndarray | None] = {}
    for side in SIDES:
        if side not in per_side:
            maps[side] = maps[f"{side}_aligned"] = None
            continue
        mean = torch.stack(per_side[side]).mean(0)
        aligned = drawn.get(side)
        if aligned is None:
            aligned = mean if mean.shape == q.crop_size else _upsample(mean[None], q.crop_size,
                                                                       q.encoders[0])[0]
        maps[side] = _postprocess(mean, relu, absolute, normalise).cpu().numpy()
        maps[f"{side}_aligned"] = _postprocess(aligned, relu, absolute, normalise).cpu().numpy()
    given = {"relu": relu, "absolute": absolute, "normalise": normalise, **opts}
    return AttributionMap(
        method=method,
        resolution=impl.resolution,
        cosine=float(np.mean(cosines)),
        query=maps["query"],
        gallery=maps["gallery"],
        query_aligned=maps["query_aligned"],
        gallery_aligned=maps["gallery_aligned"],
        forward_passes=guard.used,
        seconds=guard.elapsed,
        options=tuple(sorted(given.items())),
    )
