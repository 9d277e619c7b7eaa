"""Pixel methods of the family: they perturb or differentiate the aligned crop itself.

Each runs the encoder on its own inputs (``SideProblem.target``, which counts forward
passes and polls the guard) and returns a crop-resolution map, channels summed (Score-CAM
returns the cell grid). captum does the work where it has the method, through its public
API only; SFace and iResNet use ``nn.PReLU``, which captum's GuidedBackprop and DeepLift
do not handle, so both run on a private copy of the encoder with the PReLUs treated by
torch's public hooks (``GuidedBackprop``) or rewritten in ReLUs (``DeepLift``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator

import captum.attr as captum
import torch
import torch.nn.functional as nnf
from torch import nn

from explain.attribution.family import Method, SideProblem, checked_backward, upsample
from explain.errors import InvalidOption

# captum announces every hook it sets; ours go on private copies and are removed by captum.
warnings.filterwarnings("ignore", message=r"Setting (forward, )?backward hooks", module="captum")
warnings.filterwarnings("ignore", message=r"\s*Setting forward, backward hooks", module="captum")


class ScoreCAM(Method):
    """Score-CAM: each channel, upsampled and scaled to [0, 1], masks the face
    (towards black); its weight is the similarity gained over the all-black face.
    With C' = 1024 channels the ``channels`` most active ones are used."""

    def cost(self, opts, problem):
        return min(opts["channels"], problem.feature_map.shape[1]) + 1

    def side_map(self, p, opts):
        acts = p.feature_map[0]  # (C', h, w)
        n = min(opts["channels"], acts.shape[0])
        chosen = acts.flatten(1).mean(1).topk(n).indices
        masks = upsample(acts[chosen], tuple(p.x.shape[-2:]))  # (n, H, W)
        lo = masks.flatten(1).min(1).values[:, None, None]
        hi = masks.flatten(1).max(1).values[:, None, None]
        masks = ((masks - lo) / (hi - lo).clamp_min(1e-7))[:, None]
        with torch.no_grad():
            masked = p.baseline + masks * (p.x - p.baseline)
            scores = p.batched_target(masked, opts["batch_size"])
            blank = p.target(torch.full_like(p.x, p.baseline))
        return torch.einsum("c,chw->hw", scores - blank, acts[chosen])


class Occlusion(Method):
    """captum Occlusion: black ``patch``×``patch`` squares every ``stride`` pixels
    (10×10 by default, as in the GestaltMatcher explainability thesis); a pixel's
    value is the mean similarity lost when the squares covering it are black."""

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
            attr = captum.Occlusion(timed_target).attribute(
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


class IntegratedGradients(Method):
    """captum IntegratedGradients from the black face (Gauss-Legendre, ``steps`` points)."""

    def cost(self, opts, problem):
        return opts["steps"]

    def side_map(self, p, opts):
        with p.guard.timed(p.kind(True), opts["steps"]):
            attr = captum.IntegratedGradients(p.target).attribute(
                p.x,
                baselines=p.baseline,
                n_steps=opts["steps"],
                internal_batch_size=p.batch_size(opts["batch_size"], backward=True),
            )
        return attr[0].sum(0)


class Saliency(Method):
    """captum Saliency, signed (abs=False): the held-norm similarity's input gradient."""

    def side_map(self, p, opts):
        return captum.Saliency(p.target).attribute(_leaf(p.x), abs=False)[0].sum(0)


class SmoothGrad(Method):
    """SmoothGrad: the input gradient averaged over ``samples`` noisy copies (σ =
    ``sigma`` × input range). Its own seeded generator, not captum's NoiseTunnel,
    which draws from torch's global RNG and so depends on concurrent requests."""

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



def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


class _TargetModule(nn.Module):
    """t(x) as a module, around a private copy of the encoder (hooks land on the copy)."""

    def __init__(self, p: SideProblem, split_prelu: bool = False) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(p.encoder)
        if split_prelu:
            _split_prelus(self.encoder)
        self.problem = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        guard = self.problem.guard
        guard.spend(int(x.shape[0]))
        return checked_backward(self.encoder(x) @ self.problem.direction / self.problem.norm,
                                guard)


class _SplitPReLU(nn.Module):
    """PReLU(x) = ReLU(x) − a·ReLU(−x), with two ReLU modules of its own. DeepLift's Rescale
    rule on the two ReLUs gives PReLU's own multiplier, (f(x) − f(x₀)) / (x − x₀), so
    summation to delta holds with captum's standard ReLU rule."""

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        self.weight = prelu.weight
        self.positive, self.negative = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.weight
        if a.numel() > 1:
            a = a.reshape(1, -1, *([1] * (x.dim() - 2)))
        # each ReLU its own input tensor: captum reads a ReLU's gradient off its input
        return self.positive(x.clone()) - a * self.negative(-x)


def _split_prelus(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.PReLU):
            setattr(module, name, _SplitPReLU(child))
        else:
            _split_prelus(child)


def _positive_input_grads(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
    """Guided backpropagation's rule: only positive gradients flow back through the unit."""
    return tuple(None if g is None else g.clamp_min(0) for g in grad_input)


@contextlib.contextmanager
def _guided_prelus(module: nn.Module) -> Iterator[None]:
    """captum's GuidedBackprop hooks nn.ReLU only; the same rule on every nn.PReLU of
    ``module`` (a private copy), by torch's public full backward hooks, while it runs."""
    handles = [m.register_full_backward_hook(_positive_input_grads)
               for m in module.modules() if isinstance(m, nn.PReLU)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class GuidedBackprop(Method):
    def side_map(self, p, opts):
        module = _TargetModule(p)
        with _guided_prelus(module):
            return captum.GuidedBackprop(module).attribute(_leaf(p.x))[0].sum(0)


class DeepLift(Method):
    """captum DeepLift (Rescale rule) from the black face, on a private copy of the encoder
    whose PReLUs are rewritten in ReLUs (``_SplitPReLU``)."""

    def cost(self, opts, problem):
        return 2

    def side_map(self, p, opts):
        module = _TargetModule(p, split_prelu=True)
        baseline = torch.full_like(p.x, p.baseline)
        return captum.DeepLift(module).attribute(_leaf(p.x), baselines=baseline)[0].sum(0)
