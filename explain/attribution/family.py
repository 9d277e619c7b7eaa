"""What every method of the family shares: the one face a method explains (``SideProblem``)
and the ``Method`` base, whose one step a method overrides.

Every method targets the pair similarity with the norm of the explained face held
constant (DESIGN.md §5):

    t(x) = <e(x), ê_other> / ‖e_self‖        (‖e_self‖ and ê_other fixed)

so perturbation and gradient methods answer the same question as the similarity maps.
As in pytorch-grad-cam, a method says only how it differs: ``side_map`` (one face, one
view), or for the CAM family only the channel ``weights`` (``explain.attribution.cam``).
``explain.attribution.methods.attribute`` runs the steps around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf

from encoder.spec import FaceEncoder
from explain.attribution.affine import AffineHead
from explain.attribution.catalogue import MethodSpec
from explain.attribution.placement import place, placement
from explain.limits import Guard


def upsample(maps: torch.Tensor, size: tuple[int, int],
             encoder: FaceEncoder | None = None) -> torch.Tensor:
    """(K, h, w) -> (K, H, W), bilinear, symmetric under horizontal flips. With the encoder
    that made the grid, each cell is drawn over its receptive field
    (``explain.attribution.placement``); without, the grid is stretched over the crop."""
    if encoder is not None:
        return place(maps, placement(encoder, tuple(maps.shape[-2:])), size)
    return nnf.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def unflip(maps: torch.Tensor, flipped: bool) -> torch.Tensor:
    """A map of a flipped view back in the aligned crop's orientation."""
    return torch.flip(maps, dims=[-1]) if flipped else maps


def checked_backward(t: torch.Tensor, guard: Guard) -> torch.Tensor:
    """Poll ``guard`` when a backward pass reaches ``t``, so a cancelled or late call
    stops before spending a batch's backward."""
    if t.requires_grad:
        t.register_hook(lambda grad: (guard.check(), grad)[1])
    return t


@dataclass(frozen=True)
class SideProblem:
    """One face of the pair in one view: what a method needs to explain it.

    x (1, C, H, W) encoder input (already flipped for a flipped view), or None when only
    features were given (CAM methods need no pixels); feature_map (1, C', h, w);
    direction (D,) = ê of the other face; norm = ‖e‖ of this face.
    """

    encoder: FaceEncoder
    x: torch.Tensor | None
    feature_map: torch.Tensor
    direction: torch.Tensor
    norm: torch.Tensor
    head: AffineHead
    guard: Guard

    @property
    def baseline(self) -> float:
        """The encoder-input value of a black pixel."""
        return (0.0 - self.encoder.spec.mean) / self.encoder.spec.std

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B,) held-norm similarity; counts B forward passes.

        The guard is polled before the forward and again before its backward."""
        self.guard.spend(int(x.shape[0]))
        return checked_backward(self.encoder(x) @ self.direction / self.norm, self.guard)

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
    """One method of the family, bound to its catalogue entry (``spec``).

    ``cost`` is forward passes per side and view (``spec.passes``); ``side_map`` is the
    one step a per-pair method overrides. A batched method (``spec.batched``) is computed
    by the engine instead (``explain.attribution.engine.BATCHED_MAPS``).
    """

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def resolution(self) -> str:
        return self.spec.resolution

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self.spec.defaults)

    def cost(self, opts: dict[str, Any], problem: SideProblem) -> int:
        return 1

    def side_map(self, p: SideProblem, opts: dict[str, Any]) -> torch.Tensor:
        """-> (h, w) or (H, W) signed map in the view's (possibly flipped) frame."""
        raise NotImplementedError(f"{self.name} is computed by the engine, for all hits")
