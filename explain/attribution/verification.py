"""The field's face-verification explainers as methods of the family: xSSAB and CorrRISE.

Both explain one face of a pair against the other face's fixed unit embedding
(``SideProblem.direction``) and return ONE signed (H, W) map in aligned-crop
pixels of the view, in the family's convention: positive = pulls the two faces
together, negative = pushes them apart. Each follows its paper by default
(the raw cosine of the perturbed face); ``held_norm=True`` switches to the
family's held-norm target ``t(x) = <e(x), ê_other> / ‖e_self‖`` (DESIGN.md §5).

Costs are in images through the encoder per side and view, as ``Guard``
counts them; the two encodes per view are added by ``attribute``. Their names,
options and defaults are declared in ``explain.attribution.catalogue``.
"""

from __future__ import annotations

from typing import Any

import torch

from explain.attribution.family import Method, SideProblem
from explain.errors import InvalidOption

MAX_BATCH = 32


def _scores(p: SideProblem, x: torch.Tensor, held_norm: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B,) similarity to the other face; counts B forward passes."""
    if held_norm:
        return p.target(x)
    p.guard.spend(int(x.shape[0]))
    e = p.encoder(x)
    return e @ p.direction / e.norm(dim=1).clamp_min(1e-12)


def _batch_size(opts: dict[str, Any], name: str) -> int:
    size = opts["batch_size"]
    if not 1 <= size <= MAX_BATCH:
        raise InvalidOption(f"{name} batch_size must be in 1..{MAX_BATCH}, got {size}")
    return size


class XSSAB(Method):
    """xSSAB: Huber, Luu, Terhörst, Damer, "Efficient Explainable Face Verification
    based on Similarity Score Argument Backpropagation", WACV 2024.

    The cosine ``s = Σ_i ê_i ô_i`` (ô = the other face's unit embedding) is a sum
    of per-dimension arguments. Dimensions whose argument is at least
    ``threshold / D`` (D = embedding size, ``threshold`` the encoder's decision
    threshold) are the positive arguments P, the others the negative arguments N.
    Each partial sum is backpropagated to the input: ``g+ = ∂ Σ_{i∈P} ê_i ô_i / ∂x``
    and ``g- = ∂ Σ_{i∈N} ê_i ô_i / ∂x``, with the split fixed at the unperturbed
    face. The paper's combined map is ``|g+| - |g-|`` summed over colour channels
    here (the paper averages them: a factor C): positive where the face's pixels
    drive the agreeing dimensions more than the disagreeing ones, i.e. pulls the
    faces together; negative where they drive the disagreeing ones, i.e. pushes
    them apart. The paper's "about four backward passes per pair" are two per
    face, run as one batched forward+backward of the face twice (one copy per
    argument set), so ``cost`` = 2 images through the encoder per side and view,
    each counted once for its forward and its backward.

    Options: ``threshold`` (cosine, default SFace's 0.363), ``held_norm`` (False:
    the paper's ê = e/‖e‖ inside the graph; True: the family's e/‖e_self‖ with
    the norm held constant).
    """

    def cost(self, opts: dict[str, Any], problem: SideProblem) -> int:
        return 2

    def side_map(self, p: SideProblem, opts: dict[str, Any]) -> torch.Tensor:
        """-> (H, W) ``|g+| - |g-|`` in the view's frame."""
        bound = float(opts["threshold"]) / int(p.direction.shape[0])
        x = p.x.detach().expand(2, -1, -1, -1).clone().requires_grad_(True)  # (2, C, H, W)
        p.guard.spend(2)
        with torch.enable_grad():
            e = p.encoder(x)  # (2, D)
            norm = p.norm if opts["held_norm"] else e.norm(dim=1, keepdim=True)
            arguments = e / norm * p.direction  # (2, D): ê_i ô_i per copy
            positive = (arguments[0].detach() >= bound).float()  # at x, e/‖e_self‖ = ê
            # copy 0 carries the positive arguments, copy 1 the negative ones: one backward
            total = (arguments[0] * positive).sum() + (arguments[1] * (1 - positive)).sum()
            p.guard.check()  # a late or cancelled call skips the backward
            (grad,) = torch.autograd.grad(total, x)
        return grad[0].abs().sum(0) - grad[1].abs().sum(0)


def patch_masks(
    count: int,
    size: tuple[int, int],
    patches: int,
    patch: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """(count, H, W) float keep-masks: 0 inside ``patches`` square black patches of
    ``patch`` pixels placed uniformly so that each lies inside the crop, 1 elsewhere."""
    h, w = size
    rows = torch.randint(0, h - patch + 1, (count, patches), generator=generator)
    cols = torch.randint(0, w - patch + 1, (count, patches), generator=generator)
    ys = torch.arange(h)
    xs = torch.arange(w)
    in_rows = (ys >= rows[..., None]) & (ys < rows[..., None] + patch)  # (N, k, H)
    in_cols = (xs >= cols[..., None]) & (xs < cols[..., None] + patch)  # (N, k, W)
    covered = (in_rows[..., :, None] & in_cols[..., None, :]).any(dim=1)  # (N, H, W)
    return (~covered).float()


def correlation_map(keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """keep (N, H, W), scores (N,) -> (H, W) Pearson correlation per pixel
    (0 where a pixel's mask value never varies)."""
    k = keep - keep.mean(0)
    s = scores - scores.mean()
    cov = torch.einsum("n,nhw->hw", s, k) / len(s)
    spread = k.pow(2).mean(0).sqrt() * s.pow(2).mean().sqrt()
    return torch.where(spread > 0, cov / spread.clamp_min(1e-12), torch.zeros_like(cov))


class CorrRISE(Method):
    """CorrRISE: Lu, Xu, Ebrahimi, "Towards Visual Saliency Explanations of Face
    Verification", WACV 2024.

    ``masks`` copies of the face each get ``patches`` black squares of ``patch``
    pixels at random places (inside the crop); the similarity of each masked
    face to the other, unmasked face is measured, and a pixel's value is the
    correlation over the masks between its keep indicator (1 visible, 0 black)
    and that similarity; with ``rank=True`` (as in the original code) the
    similarities are replaced by their ranks, i.e. Spearman. The paper's
    similarity map is the positive part of the correlation (keeping the pixel
    raises the similarity) and its dissimilarity map the negative part
    (hiding it raises the similarity); the family's single signed map is
    their difference, the correlation itself: positive pulls together,
    negative pushes apart, each value in [-1, 1].

    Defaults follow the paper at 112×112 (3 patches of 30 px) with 250 masks per
    side and view instead of 500: with the server's two views (orig + flip)
    that is the paper's 500 masks per face, and a pair costs 4 + 4 × 250 = 1004
    forward passes, inside the default budget of 1024 (a single view: 502).
    ``cost`` = ``masks`` images per side and view, in batches of at most ``batch_size``
    (≤ 32), each sized by the time it takes (``Guard.batches``) with the Guard checked
    before each batch.
    """

    def cost(self, opts: dict[str, Any], problem: SideProblem) -> int:
        h, w = problem.x.shape[-2:]
        if not 1 <= opts["patch"] <= min(h, w) or opts["patches"] < 1 or opts["masks"] < 2:
            raise InvalidOption(
                f"corrrise needs masks >= 2 and {opts['patches']} patches of "
                f"{opts['patch']} px inside a {w}x{h} crop"
            )
        _batch_size(opts, self.name)
        return opts["masks"]

    def side_map(self, p: SideProblem, opts: dict[str, Any]) -> torch.Tensor:
        """-> (H, W) per-pixel correlation of keep indicator and similarity."""
        gen = torch.Generator().manual_seed(opts["seed"])
        size = (int(p.x.shape[-2]), int(p.x.shape[-1]))
        keep = patch_masks(opts["masks"], size, opts["patches"], opts["patch"], gen)
        keep = keep.to(p.x.device)
        scores = []
        with torch.no_grad():
            for part in p.guard.batches(len(keep), p.kind(False), _batch_size(opts, self.name)):
                masked = p.baseline + keep[part][:, None] * (p.x - p.baseline)
                scores.append(_scores(p, masked, opts["held_norm"]))
        similarity = torch.cat(scores)
        if opts["rank"]:
            similarity = similarity.argsort().argsort().to(keep.dtype)
        return correlation_map(keep, similarity)

