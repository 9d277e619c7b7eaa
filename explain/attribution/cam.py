"""The CAM family: maps at the CAM layer from the affine head's analytic gradient.

With the head affine, ``e = Σ_p W_p F_p + b``, the held-norm target's gradient at the
CAM layer is ``Wᵀ ê_other / ‖e_self‖`` (DESIGN.md §5): no backward pass and no hook.
A CAM method is ``Σ_c w_c ⊙ F_c`` and gives its channel ``weights`` only, as in
pytorch-grad-cam; ``CamMethod.cam`` is the one place that turns weights into a map,
for one pair (``side_map``) and for a query and K hits at once (``batched_maps``, what
the engine runs for ``similarity`` and ``gradcam``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from encoder.spec import FaceEncoder
from explain.attribution.affine import AffineHead
from explain.attribution.contrast import contrast_maps
from explain.attribution.family import Method, SideProblem


@dataclass(frozen=True)
class ViewPair:
    """One view of a query and K hits, with the quantities every batched map uses.

    fq (C, h, w), eq (D,) the query; fg (K, C, h, w), eg (K, D) the hits;
    nq () and ng (K,) embedding norms; uq (D,) and ug (K, D) unit embeddings;
    aq (1, C_f, h_f, w_f) and ag (K, C_f, h_f, w_f) the activations at the
    encoder's contrast layer (None unless a map that reads them is asked for);
    sq the query's tail state from its encode (``FaceFeatures.tail_states``), or None.
    """

    head: AffineHead
    fq: torch.Tensor
    eq: torch.Tensor
    fg: torch.Tensor
    eg: torch.Tensor
    encoder: FaceEncoder | None = None
    aq: torch.Tensor | None = None
    ag: torch.Tensor | None = None
    sq: tuple[torch.Tensor, ...] | None = None

    @cached_property
    def nq(self) -> torch.Tensor:
        return self.eq.norm()

    @cached_property
    def ng(self) -> torch.Tensor:
        return self.eg.norm(dim=1)

    @cached_property
    def uq(self) -> torch.Tensor:
        return self.eq / self.nq

    @cached_property
    def ug(self) -> torch.Tensor:
        return self.eg / self.ng[:, None]

    @cached_property
    def pulled(self) -> torch.Tensor:
        """(K + 1, C, P): ``Wᵀ ê_g,k`` for the K hits, then ``Wᵀ ê_q`` — the gradients of
        ``<e, u>`` at the CAM layer, shared by the similarity and contrast maps (one pass
        over the head's weights)."""
        return self.head.pullback(torch.cat([self.ug, self.uq[None]]))


class CamMethod(Method):
    """Σ_c w_c ⊙ F_c with the held-norm gradient; subclasses give the weights only."""

    def cost(self, opts: dict[str, Any], problem: SideProblem) -> int:
        return 0

    def weights(self, grads: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """grads, acts (..., C, P) -> (..., C) channel weights or (..., C, P) per-position
        weights."""
        raise NotImplementedError

    homogeneous = True
    """Whether the map scales with the gradient (``cam(s·grads) = s·cam(grads)``, s > 0):
    ``batched_maps`` then applies the held norms to the (K, P) maps, not to (K, C, P)
    gradients."""

    channel_weights = True
    """Whether ``weights`` gives one weight per channel (..., C), else one per channel and
    position (..., C, P)."""

    def cam(self, grads: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """grads, acts (..., C, P), broadcast against each other -> (..., P): Σ_c w_c ⊙ F_c."""
        w = self.weights(grads, acts)
        if self.channel_weights:  # one matrix product over the channels
            return (w.unsqueeze(-2) @ acts).squeeze(-2)
        return (w * acts).sum(-2)

    def side_map(self, p: SideProblem, opts: dict[str, Any]) -> torch.Tensor:
        return self.cam(p.gradient(), p.feature_map[0].flatten(1)).reshape(p.head.grid)

    def batched_maps(self, v: ViewPair) -> tuple[torch.Tensor, torch.Tensor]:
        """ViewPair -> ((K, P) query side, (K, P) hit side): each face against the other,
        with the gradients ``Wᵀ ê_g,k / ‖e_q‖`` (query side) and ``Wᵀ ê_q / ‖e_g,k‖``
        (hit side)."""
        fq, fg = v.fq.flatten(1), v.fg.flatten(2)
        if self.homogeneous:  # the norms on the maps: no (K, C, P) copies of the gradients
            return (self.cam(v.pulled[:-1], fq) / v.nq,
                    self.cam(v.pulled[-1], fg) / v.ng[:, None])
        grads_q = v.pulled[:-1] / v.nq  # (K, C, P)
        grads_g = v.pulled[-1] / v.ng[:, None, None]  # (K, C, P)
        return self.cam(grads_q, fq), self.cam(grads_g, fg)


class HiResCAM(CamMethod):
    """grads ⊙ F: each cell's exact contribution to the held-norm similarity."""

    channel_weights = False

    def weights(self, grads, acts):
        return grads


class Similarity(HiResCAM):
    """The similarity map S(p) = <m_p, ê_other>/‖e_self‖, batched by the engine."""


class GradCAM(CamMethod):
    def weights(self, grads, acts):
        return grads.mean(-1)


class GradCAMPlusPlus(CamMethod):
    """Chattopadhyay et al.'s closed form with the exponential-output assumption,
    as pytorch-grad-cam computes it."""

    homogeneous = False  # g²/(2g² + Σ_p F·g³) does not scale with g

    def weights(self, grads, acts):
        g2, g3 = grads**2, grads**3
        denom = 2 * g2 + acts.sum(-1, keepdim=True) * g3
        aij = torch.where(grads != 0, g2 / (denom + 1e-7), torch.zeros_like(grads))
        return (aij * grads.clamp_min(0)).sum(-1)


class XGradCAM(CamMethod):
    def weights(self, grads, acts):
        return (grads * acts).sum(-1) / (acts.sum(-1) + 1e-7)


class LayerCAM(CamMethod):
    channel_weights = False

    def weights(self, grads, acts):
        return grads.clamp_min(0)


class Contrast(Method):
    """What differs: the shared first-order difference map at the encoder's contrast layer
    (``explain.attribution.contrast``), batched by the engine; one map on both faces."""

    reads_fine_maps = True  # the engine hands it the contrast-layer activations

    def cost(self, opts: dict[str, Any], problem: SideProblem) -> int:
        return 0

    def batched_maps(self, v: ViewPair) -> tuple[torch.Tensor, torch.Tensor]:
        """ViewPair -> the same (K, h', w') map for both sides, on the contrast layer's grid."""
        cam = ((v.pulled[:-1] - v.pulled[-1]) / v.nq).reshape(-1, *v.fq.shape)  # Wᵀ(ê_g−ê_q)/‖e_q‖
        maps = contrast_maps(v.encoder, v.aq, v.eq, v.ag, v.eg, cam_grads=cam,
                             tail_state=v.sq).maps
        return maps, maps
