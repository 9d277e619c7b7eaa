"""``contrast``: where two faces differ, on both faces, at the encoder's finer layer.

DESIGN.md §5 explains why the raw-cosine gradient is useful: it removes each
face's own direction and keeps what separates the faces. ``contrast`` makes
that self-reference explicit and symmetric. Let ``A_x`` be the activations of
face x at the encoder's contrast layer (``spec.contrast_layer``; SFace: the
last 14×14 block, one stride-2 stage finer than the 7×7 CAM layer), ``e_x``
its embedding and ``ê_x`` the unit embedding. With norms and directions held
constant, the query's *self-referenced* map is gradient × activation of

    t_q(A) = <e(A), ê_g − ê_q> / ‖e_q‖          (g = the gallery face)

that is ``c_q(p) = Σ_c A_q[c,p] · ∂t_q/∂A[c,p]``: how much cell p of the query
supports the other face *minus* how much it supports a match of the query with
itself. The gallery face's cells are read through the same linearisation — the
query's tail Jacobian ``J_q`` at ``A_q``, the one the K backward directions
already give — so nothing of the hit is run again:

    c_q(p) = Σ_c A_q[c,p] · (J_qᵀ (ê_g − ê_q))[c,p] / ‖e_q‖
    c_g(p) = Σ_c A_g[c,p] · (J_qᵀ (ê_q − ê_g))[c,p] / ‖e_g‖

The map returned for the pair — the same map on both faces, which share the
aligned frame — is their mean,

    contrast(p) = ½ (c_q(p) + c_g(p)) = ½ Σ_c (A_q − (‖e_q‖/‖e_g‖) A_g)[c,p] · G[c,p],
    G = J_qᵀ (ê_g − ê_q) / ‖e_q‖,

a first-order difference of the two faces' activations along the direction
that separates them. What the faces share cancels (a face against itself gives
0 everywhere); what is left is negative (blue) where the faces differ and
positive where a cell of one face supports the other more than itself. (Each
face's own Jacobian for its half measured slightly higher lift and similar
pointing on region swaps, at one more tail forward and backward per hit, half
the cost at K = 10; notes of issue 12.)

**Sum rule.** The layers between the contrast layer and the embedding are
piecewise linear (conv, eval-mode BatchNorm, PReLU/ReLU), so
``e_q = J_q A_q + b_q`` with ``b_q`` the propagated biases. Hence

    Σ_p contrast(p) = ½ (<J_q A_q, ê_g − ê_q>/‖e_q‖ + <J_q A_g, ê_q − ê_g>/‖e_g‖)
                    = (s − 1) − bias_share,

the similarity lost relative to a perfect match, minus ``bias_share`` = ½
(<b_q, ê_g − ê_q>/‖e_q‖ + <e_g − J_q A_g, ê_q − ê_g>/‖e_g‖): the biases and
how far the hit is from the query's linearisation (0 for a face against
itself). Tests check ``Σ_p c_q`` and ``Σ_p c_g`` against ``J_q A_q`` and
``J_q A_g`` computed independently with forward-mode autodiff.

**Drawn on the crop: each cell's share goes where the faces differ.** A cell of the
contrast layer sees a wide patch of the face (SFace: receptive-field profiles with a
standard deviation of 15–20 px on a 112-px crop), and the cells on the face's midline
weigh most in the embedding, so an eyes-only change is most negative at the cell
*between* the eyes, whose field covers both. A pixel that is the same in both aligned
crops cannot cause any of the difference (the reference-based attributions — DeepLIFT,
integrated gradients from the other face — give it exactly 0), so ``draw`` divides each
cell's value among the crop's pixels in proportion to a Gaussian of one grid step around
the cell's centre times how much the two crops differ there
(``explain.attribution.placement.spread``; ``change_weights``: per-crop standardised
colours, blurred by ``CHANGE_BLUR_PX`` against sub-pixel misalignment, the per-pixel
distance smoothed by ``CHANGE_SMOOTH_PX``). The model decides how much each cell's
neighbourhood matters and with which sign; the pixels decide where in that
neighbourhood the change lies. The drawn map's pixels sum to the cell map's sum, so the
sum rule holds on the crop too. Without both crops (features cached without them) the
cells are drawn bilinearly at their receptive-field peaks, as the other maps are. On
region swaps this moved the most negative pixel from the nasal bridge into the swapped
eyes (issue 12's notes give the table and the kernel widths tried).

**Cost.** For a query and K hits: K directions back through the query's tail
(contrast layer → embedding; ``FaceEncoder.tail_vjp``; SFace runs the transpose of
its tail explicitly, a few matrix products, about 0.1 encodes per direction, with
the PReLU gains its encode recorded, ``FaceEncoder.tail_forward``, else after one
more forward through the tail), then one product with each hit's activations. The hits'
tails are not run at all: their contrast-layer activations come with their
``FaceFeatures`` (the server's feature store keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from encoder.spec import FaceEncoder
from explain.attribution.placement import place, placement, spread

CHANGE_BLUR_PX = 1.0  # Gaussian blur of each crop before the difference (sub-pixel misalignment)
CHANGE_SMOOTH_PX = 2.0  # Gaussian smoothing of the per-pixel difference


@dataclass(frozen=True)
class ContrastMaps:
    """One view's contrast maps for a query and K hits (the view's, possibly flipped, frame).

    maps (K, h_f, w_f): the shared map of each pair; self_query, self_hits
    (K, h_f, w_f): the two halves c_q and c_g; bias_share (K,), so
    ``maps[k].sum() == cosine[k] - 1 - bias_share[k]`` by definition: bias_share is the
    head's bias term *plus whatever the query's linearisation misses* of ``cosine - 1``.
    The map's sum is a first-order estimate, not the model's total (on pairs of different
    people it holds about 60 % of ``cosine - 1``; ``MatchMaps.contrast_share``).
    """

    maps: torch.Tensor
    self_query: torch.Tensor
    self_hits: torch.Tensor
    bias_share: torch.Tensor


def contrast_maps(
    encoder: FaceEncoder,
    query_fine: torch.Tensor,
    query_embedding: torch.Tensor,
    hits_fine: torch.Tensor,
    hits_embedding: torch.Tensor,
    *,
    cam_grads: torch.Tensor | None = None,
    tail_state: tuple[torch.Tensor, ...] | None = None,
) -> ContrastMaps:
    """Contrast maps of one view.

    query_fine (1, C_f, h_f, w_f) and hits_fine (K, C_f, h_f, w_f): activations
    at ``encoder.spec.contrast_layer``; query_embedding (D,) or (1, D) and
    hits_embedding (K, D): the embeddings they lead to (norms and directions are
    taken from them and held constant). cam_grads (K, C, h, w), optional: the
    gradients at the CAM layer of ``<e, ê_g − ê_q>/‖e_q‖`` (with an affine head,
    ``Wᵀ(ê_g − ê_q)/‖e_q‖``: the engine has them from the similarity map's pullback),
    so that only the blocks between the two layers are run back. tail_state: the
    query's ``FaceEncoder.tail_forward`` record from its encode, so that its tail is not
    run forward again (None: it is).
    """
    eq = query_embedding.reshape(-1).detach()
    eg = hits_embedding.detach()
    nq, ng = eq.norm(), eg.norm(dim=1)
    uq, ug = eq / nq, eg / ng[:, None]
    cos = ug @ uq  # (K,)
    if cam_grads is None:
        grad = encoder.tail_vjp(query_fine, ((ug - uq[None]) / nq)[:, None, :],
                                tail_state)[:, 0]
    else:
        grad = encoder.fine_vjp(query_fine, cam_grads[:, None], tail_state)[:, 0]  # (K, C_f, h_f, w_f)
    self_q = (grad * query_fine.detach()).sum(1)  # (K, h_f, w_f)
    self_g = -(nq / ng)[:, None, None] * (grad * hits_fine.detach()).sum(1)
    bias = (cos - 1) - 0.5 * (self_q + self_g).sum((1, 2))
    return ContrastMaps(0.5 * (self_q + self_g), self_q, self_g, bias)


def change_weights(query_crop: np.ndarray, hit_crops: np.ndarray) -> torch.Tensor:
    """How much each pixel of the aligned crops differs between the query and each hit.

    query_crop (H, W, 3) and hit_crops (K, H, W, 3) uint8. Each crop is blurred by
    ``CHANGE_BLUR_PX`` and its channels standardised (mean and standard deviation over
    the crop: a global change of exposure or colour cast is not a difference of the
    face); the Euclidean distance per pixel is smoothed by ``CHANGE_SMOOTH_PX``. Returns
    (K, H, W) float32 ≥ 0, exactly 0 where the crops are identical.
    """
    q = _standardised(query_crop)
    out = np.empty((len(hit_crops), *q.shape[:2]), np.float32)
    for i, hit in enumerate(hit_crops):
        d = cv2.subtract(_standardised(hit), q)
        distance = cv2.sqrt(cv2.transform(cv2.multiply(d, d), np.ones((1, 3), np.float32)))
        out[i] = cv2.GaussianBlur(distance, (0, 0), CHANGE_SMOOTH_PX)
    return torch.from_numpy(out)


def _standardised(crop: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> blurred, per-channel standardised float32 (cv2 throughout: the
    drawing runs once per hit and must stay a small part of an encode)."""
    crop = np.ascontiguousarray(crop, dtype=np.uint8)
    mean, std = (v[:, 0] for v in cv2.meanStdDev(crop))
    scale = 1.0 / (std + 1e-3)
    affine = np.concatenate([np.diag(scale), (-mean * scale)[:, None]], 1).astype(np.float32)
    blurred = cv2.GaussianBlur(crop, (0, 0), CHANGE_BLUR_PX).astype(np.float32)
    return cv2.transform(blurred, affine)


def draw(maps: torch.Tensor, encoder: FaceEncoder, crop_size: tuple[int, int],
         query_crop: np.ndarray | None = None, hit_crops: np.ndarray | None = None
         ) -> torch.Tensor:
    """(K, h_f, w_f) contrast maps (aligned orientation) -> (K, H, W) on the aligned crop:
    each cell's value divided among the pixels where the crops differ (module docstring),
    or, without both crops, bilinear at the cells' receptive-field peaks."""
    where = placement(encoder, tuple(maps.shape[-2:]))
    if query_crop is None or hit_crops is None:
        return place(maps, where, crop_size)
    return spread(maps, where, crop_size, change_weights(query_crop, hit_crops))
