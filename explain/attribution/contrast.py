"""``contrast``: where two faces differ, on both faces, at the encoder's finer layer.

DESIGN.md §5 explains why the raw-cosine gradient is useful: it removes each
face's own direction and keeps what separates the faces. ``contrast`` makes
that self-reference explicit and symmetric. Let ``A_x`` be the activations of
face x at the encoder's contrast layer (``spec.contrast_layer``; SFace: the
last 14×14 block, one stride-2 stage finer than the 7×7 CAM layer), ``e_x``
its embedding and ``ê_x`` the unit embedding. With norms and directions held
constant, each face's *self-referenced* map is gradient × activation of

    t_x(A) = <e(A), ê_y − ê_x> / ‖e_x‖          (y = the other face)

that is ``c_x(p) = Σ_c A_x[c,p] · ∂t_x/∂A[c,p]``: how much cell p of x supports
the other face *minus* how much it supports a match of x with itself. The map
returned for the pair — the same map on both faces, which share the aligned
frame — is their mean,

    contrast(p) = ½ (c_q(p) + c_g(p)).

Features present in both faces cancel between the two halves; what is left is
negative (blue) where the faces differ and positive where a cell of one face
supports the other more than itself.

**Sum rule.** The layers between the contrast layer and the embedding are
piecewise linear (conv, eval-mode BatchNorm, PReLU/ReLU), so
``e_x = J_x A_x + c_x`` with ``J_x`` the Jacobian at ``A_x`` and ``c_x`` the
propagated biases. Hence ``Σ_p c_x(p) = <J_x A_x, ê_y − ê_x>/‖e_x‖ = (s − 1) −
β_x`` with ``β_x = <c_x, ê_y − ê_x>/‖e_x‖``, and

    Σ_p contrast(p) = (s − 1) − ½ (β_q + β_g),

the similarity lost relative to a perfect match, minus a bias share (reported
as ``bias_share``; for an encoder whose contrast layer is the CAM layer it is
the affine head's own bias term). Tests check it against ``J_x A_x`` computed
independently with forward-mode autodiff.

**Cost.** For a query and K hits: the query's tail (contrast layer → embedding)
once with K backward directions in one batched vector-Jacobian product, and the
K hits' tails in one batched forward and backward. Nothing else is encoded
again: the contrast-layer activations come with the faces' ``FaceFeatures``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encoder.spec import FaceEncoder


@dataclass(frozen=True)
class ContrastMaps:
    """One view's contrast maps for a query and K hits (the view's, possibly flipped, frame).

    maps (K, h_f, w_f): the shared map of each pair; self_query, self_hits
    (K, h_f, w_f): the two self-referenced halves; bias_share (K,): ½(β_q + β_g),
    so ``maps[k].sum() == cosine[k] - 1 - bias_share[k]``.
    """

    maps: torch.Tensor
    self_query: torch.Tensor
    self_hits: torch.Tensor
    bias_share: torch.Tensor


def _embed_from_fine(encoder: FaceEncoder, fine: torch.Tensor) -> torch.Tensor:
    return encoder.head(encoder.fine_to_features(fine))


def contrast_maps(
    encoder: FaceEncoder,
    query_fine: torch.Tensor,
    query_embedding: torch.Tensor,
    hits_fine: torch.Tensor,
    hits_embedding: torch.Tensor,
) -> ContrastMaps:
    """Contrast maps of one view.

    query_fine (1, C_f, h_f, w_f) and hits_fine (K, C_f, h_f, w_f): activations
    at ``encoder.spec.contrast_layer``; query_embedding (D,) or (1, D) and
    hits_embedding (K, D): the embeddings they lead to (norms and directions are
    taken from them and held constant).
    """
    eq = query_embedding.reshape(-1).detach()
    eg = hits_embedding.detach()
    nq, ng = eq.norm(), eg.norm(dim=1)
    uq, ug = eq / nq, eg / ng[:, None]
    cos = ug @ uq  # (K,)
    k = eg.shape[0]
    with torch.enable_grad():
        aq = query_fine.detach().requires_grad_(True)
        out_q = _embed_from_fine(encoder, aq)  # (1, D)
        directions_q = ((ug - uq[None]) / nq)[:, None, :]  # (K, 1, D)
        if k > 1:  # K backward directions through the query's tail in one batched VJP
            (grad_q,) = torch.autograd.grad(out_q, aq, directions_q, is_grads_batched=True)
        else:
            (grad_q,) = torch.autograd.grad(out_q, aq, directions_q[0])
        ag = hits_fine.detach().requires_grad_(True)
        out_g = _embed_from_fine(encoder, ag)  # (K, D)
        (grad_g,) = torch.autograd.grad(out_g, ag, (uq[None] - ug) / ng[:, None])
    grad_q = grad_q.reshape(k, *aq.shape[1:])
    self_q = (grad_q * aq.detach()).sum(1)  # (K, h_f, w_f)
    self_g = (grad_g * ag.detach()).sum(1)
    beta_q = (cos - 1) - self_q.sum((1, 2))
    beta_g = (cos - 1) - self_g.sum((1, 2))
    return ContrastMaps(0.5 * (self_q + self_g), self_q, self_g, 0.5 * (beta_q + beta_g))
