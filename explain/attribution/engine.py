"""The explanation engine: two-sided similarity maps and embedding Grad-CAM for a top-K result.

DESIGN.md §5. With the head affine, ``e = Σ_p W_p F_p + b``, position ``p``
contributes ``m_p = W_p F_p``. For a query q and hits g_1..g_K (norms held
constant):

    S_q,k(p) = <m_q,p, ê_g,k> / ‖e_q‖        S_g,k(p) = <m_g,k,p, ê_q> / ‖e_g,k‖

Each map sums to ``cos_k`` minus its bias share ``<b, ê_other>/‖e_self‖``.
Embedding Grad-CAM uses the same held-norm target: its channel weights are
``α = W̄ᵀ ê_other / ‖e_self‖`` (W̄ = W averaged over positions). Everything for
the K hits comes from one forward of the query, one batched forward of the hits
(or their cached feature maps) and a few matrix products; no backward pass and
no hook is involved, and the only state kept between calls is the immutable
cache of head matrices (``explain.attribution.affine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf

from encoder.spec import FaceEncoder
from explain.attribution.affine import AffineHead, affine_head
from explain.attribution.views import ViewInput, ViewSource, as_view_source, view_inputs
from explain.errors import IncompatibleViews, InvalidOption
from explain.limits import CancelSignal, Guard


@dataclass(frozen=True)
class FaceFeatures:
    """CAM-layer feature maps and embeddings of N faces, one entry per view.

    feature_maps[v] (N, C, h, w) as the view's encoder saw the (possibly
    flipped) crop; embeddings[v] (N, D) unnormalised; crop_size (H, W) of the
    aligned crop. Cache these for gallery faces to skip their forward pass.
    """

    feature_maps: tuple[torch.Tensor, ...]
    embeddings: tuple[torch.Tensor, ...]
    encoders: tuple[FaceEncoder, ...]
    flipped: tuple[bool, ...]
    crop_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.feature_maps[0].shape[0])

    def select(self, index: int | Sequence[int] | slice) -> FaceFeatures:
        if isinstance(index, int):
            index = [index]
        return FaceFeatures(
            tuple(f[index] for f in self.feature_maps),
            tuple(e[index] for e in self.embeddings),
            self.encoders,
            self.flipped,
            self.crop_size,
        )


@dataclass(frozen=True)
class SideMaps:
    """The maps on one face of a pair, averaged over views, in aligned-crop orientation.

    similarity (h, w): signed contribution of each cell to the cosine (HiResCAM
    of the held-norm target); sums to ``cosine - bias_share - residual``.
    gradcam (h, w): embedding Grad-CAM, signed. ``*_aligned`` (H, W): the same
    maps bilinearly upsampled to the aligned crop (per-cell values, not
    densities). residual ≈ 0 checks the linearisation of the head.
    """

    similarity: np.ndarray
    gradcam: np.ndarray
    similarity_aligned: np.ndarray
    gradcam_aligned: np.ndarray
    bias_share: float
    residual: float


@dataclass(frozen=True)
class PairExplanation:
    """One query-hit pair: its cosine (mean over views) and the maps on both faces."""

    cosine: float
    view_cosines: tuple[float, ...]
    query: SideMaps
    gallery: SideMaps


@dataclass(frozen=True)
class Correspondence:
    """Where on the other face one cell of this face finds its match.

    map (h, w) over the other face: ``<m_src,i, m_dst,j> / (‖e_q‖ ‖e_g‖)``
    (view-averaged). Its sum equals the source cell's similarity-map value minus
    ``bias_term`` = ``<m_src,i, b>/(‖e_q‖ ‖e_g‖)``. ``cell`` is (row, col) on the
    source grid; map_aligned (H, W) is the upsampled map.
    """

    map: np.ndarray
    map_aligned: np.ndarray
    cell: tuple[int, int]
    source_similarity: float
    bias_term: float


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) -> (K, H, W), bilinear, symmetric under horizontal flips."""
    return nnf.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _unflip(maps: torch.Tensor, flipped: bool) -> torch.Tensor:
    return torch.flip(maps, dims=[-1]) if flipped else maps


class Explainer:
    """Explains cosine matches of one model or view scheme. Thread-safe; holds no request state.

    ``model`` is a FaceEncoder (one view) or an ``encoder.views.Ensemble``
    (anything with ``view_inputs(crops)``). All views must share the crop frame
    and the feature grid so that their maps can be averaged.
    """

    def __init__(self, model: FaceEncoder | ViewSource) -> None:
        self.source = as_view_source(model)

    # ---- features -----------------------------------------------------------------

    def encode(self, crops: np.ndarray, *, cancel: CancelSignal = None) -> FaceFeatures:
        """(N, H, W, 3) or (H, W, 3) uint8 aligned crops -> FaceFeatures (one forward per view)."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        guard = Guard(cancel=cancel)
        return self._encode_views(view_inputs(self.source, crops), crops.shape[1:3], guard)

    def _encode_views(
        self, views: list[ViewInput], crop_size: tuple[int, int], guard: Guard
    ) -> FaceFeatures:
        maps: list[torch.Tensor | None] = [None] * len(views)
        embs: list[torch.Tensor | None] = [None] * len(views)
        groups: dict[int, list[int]] = {}
        for index, view in enumerate(views):  # views of one encoder share one batched forward
            groups.setdefault(id(view.encoder), []).append(index)
        with torch.no_grad():
            for indices in groups.values():
                guard.check()
                encoder = views[indices[0]].encoder
                fmap = encoder.features(torch.cat([views[i].inputs for i in indices]))
                emb = encoder.head(fmap)
                n = views[indices[0]].inputs.shape[0]
                for j, i in enumerate(indices):
                    maps[i] = fmap[j * n : (j + 1) * n]
                    embs[i] = emb[j * n : (j + 1) * n]
        grids = {tuple(m.shape[-2:]) for m in maps}
        if len(grids) > 1:
            raise IncompatibleViews(f"views have different feature grids {sorted(grids)}")
        return FaceFeatures(
            tuple(maps),
            tuple(embs),
            tuple(v.encoder for v in views),
            tuple(v.flipped for v in views),
            (int(crop_size[0]), int(crop_size[1])),
        )

    def _features(self, faces: np.ndarray | FaceFeatures, guard: Guard) -> FaceFeatures:
        if isinstance(faces, FaceFeatures):
            return faces
        crops = np.asarray(faces)
        if crops.ndim == 3:
            crops = crops[None]
        return self._encode_views(view_inputs(self.source, crops), crops.shape[1:3], guard)

    # ---- two-sided maps -----------------------------------------------------------

    def explain(
        self,
        query: np.ndarray | FaceFeatures,
        hits: np.ndarray | FaceFeatures,
        *,
        cancel: CancelSignal = None,
    ) -> list[PairExplanation]:
        """Two-sided similarity maps and Grad-CAM for a query and K hits.

        query: one aligned crop (H, W, 3) uint8 or its FaceFeatures (N = 1);
        hits: (K, H, W, 3) uint8 crops or their (cached) FaceFeatures.
        Returns K PairExplanation, in the order of ``hits``.
        """
        guard = Guard(cancel=cancel)
        q = self._features(query, guard)
        g = self._features(hits, guard)
        _check_compatible(q, g)
        if len(q) != 1:
            raise InvalidOption(f"explain() takes one query face, got {len(q)}")
        guard.check()
        with torch.no_grad():
            per_view = [
                _two_sided(affine_head(enc, fq.device), fq[0], eq[0], fg, eg)
                for enc, fq, eq, fg, eg in zip(
                    q.encoders,
                    q.feature_maps,
                    q.embeddings,
                    g.feature_maps,
                    g.embeddings,
                    strict=True,
                )
            ]
            return _average_views(per_view, q.flipped, q.crop_size)

    def similarity_maps(
        self, query: np.ndarray | FaceFeatures, hits: np.ndarray | FaceFeatures, **kwargs
    ) -> list[PairExplanation]:
        """Alias of :meth:`explain` under the name the design notes use."""
        return self.explain(query, hits, **kwargs)

    # ---- point correspondence -----------------------------------------------------

    def correspondence(
        self,
        query: np.ndarray | FaceFeatures,
        hit: np.ndarray | FaceFeatures,
        point: tuple[float, float],
        *,
        source: str = "query",
    ) -> Correspondence:
        """The map over the other face for the cell under ``point`` = (row, col) in
        aligned-crop pixels of the ``source`` face ("query" or "gallery")."""
        if source not in ("query", "gallery"):
            raise InvalidOption(f"source must be 'query' or 'gallery', got {source!r}")
        guard = Guard()
        q = self._features(query, guard)
        g = self._features(hit, guard)
        _check_compatible(q, g)
        src, dst = (q, g) if source == "query" else (g, q)
        height, width = q.crop_size
        row, col = point
        if not (0 <= row < height and 0 <= col < width):
            raise InvalidOption(f"point {point} is outside the {width}x{height} crop")
        maps, sims, biases = [], [], []
        with torch.no_grad():
            for enc, fs, es, fd, ed, flipped in zip(
                src.encoders,
                src.feature_maps,
                src.embeddings,
                dst.feature_maps,
                dst.embeddings,
                src.flipped,
                strict=True,
            ):
                head = affine_head(enc, fs.device)
                h, w = head.grid
                i = min(int(row * h / height), h - 1)
                j = min(int(col * w / width), w - 1)
                if flipped:
                    j = w - 1 - j
                m_src = head.contributions(fs[:1])[0, i * w + j]  # (D,)
                m_dst = head.contributions(fd[:1])[0]  # (P, D)
                norms = es[0].norm() * ed[0].norm()
                corr = (m_dst @ m_src / norms).reshape(1, h, w)
                maps.append(_unflip(corr, flipped)[0])
                sims.append(float(m_src @ ed[0] / norms))  # S_src at the cell
                biases.append(float(m_src @ head.bias / norms))
            mean_map = torch.stack(maps).mean(0)
            aligned = _upsample(mean_map[None], q.crop_size)[0]
        return Correspondence(
            mean_map.cpu().numpy(),
            aligned.cpu().numpy(),
            (min(int(row * h / height), h - 1), min(int(col * w / width), w - 1)),
            float(np.mean(sims)),
            float(np.mean(biases)),
        )

    # ---- the method family --------------------------------------------------------

    def attribute(self, method: str, query: np.ndarray, hit: np.ndarray, **kwargs):
        """One attribution method on one pair; see :func:`explain.attribution.methods.attribute`."""
        from explain.attribution.methods import attribute

        return attribute(method, self, query, hit, **kwargs)


def _check_compatible(q: FaceFeatures, g: FaceFeatures) -> None:
    if (
        q.flipped != g.flipped
        or len(q.encoders) != len(g.encoders)
        or any(a is not b for a, b in zip(q.encoders, g.encoders, strict=True))
    ):
        raise IncompatibleViews("query and hit features come from different view schemes")
    if q.crop_size != g.crop_size:
        raise IncompatibleViews(f"crop sizes differ: {q.crop_size} vs {g.crop_size}")


@dataclass(frozen=True)
class _ViewMaps:
    cos: torch.Tensor  # (K,)
    sim_q: torch.Tensor  # (K, h, w)
    sim_g: torch.Tensor
    cam_q: torch.Tensor
    cam_g: torch.Tensor
    bias_q: torch.Tensor  # (K,)
    bias_g: torch.Tensor


def _two_sided(
    head: AffineHead, fq: torch.Tensor, eq: torch.Tensor, fg: torch.Tensor, eg: torch.Tensor
) -> _ViewMaps:
    """fq (C, h, w), eq (D,), fg (K, C, h, w), eg (K, D) of one view -> its maps."""
    h, w = head.grid
    k = fg.shape[0]
    nq = eq.norm()
    ng = eg.norm(dim=1)  # (K,)
    uq = eq / nq
    ug = eg / ng[:, None]  # (K, D)
    cos = ug @ uq
    fq_flat = fq.flatten(1)  # (C, P)
    fg_flat = fg.flatten(2)  # (K, C, P)
    m_q = head.contributions(fq[None])[0]  # (P, D)
    sim_q = (m_q @ ug.T).T / nq  # (K, P)
    pull_q = head.pullback(uq[None])[0]  # W^T ê_q  (C, P)
    sim_g = (pull_q * fg_flat).sum(1) / ng[:, None]
    alpha_q = ug @ head.mean_weight / nq  # (K, C)
    cam_q = alpha_q @ fq_flat  # (K, P)
    alpha_g = uq @ head.mean_weight  # (C,)
    cam_g = (alpha_g @ fg_flat) / ng[:, None]
    return _ViewMaps(
        cos,
        sim_q.reshape(k, h, w),
        sim_g.reshape(k, h, w),
        cam_q.reshape(k, h, w),
        cam_g.reshape(k, h, w),
        ug @ head.bias / nq,
        (uq @ head.bias) / ng,
    )


def _average_views(
    per_view: list[_ViewMaps], flipped: tuple[bool, ...], crop_size: tuple[int, int]
) -> list[PairExplanation]:
    def mean(name: str, unflip: bool) -> torch.Tensor:
        return torch.stack(
            [
                _unflip(getattr(v, name), f) if unflip else getattr(v, name)
                for v, f in zip(per_view, flipped, strict=True)
            ]
        ).mean(0)

    cos = mean("cos", False)
    view_cos = torch.stack([v.cos for v in per_view], dim=1)  # (K, V)
    maps = {n: mean(n, True) for n in ("sim_q", "sim_g", "cam_q", "cam_g")}
    aligned = {n: _upsample(m, crop_size) for n, m in maps.items()}
    bias_q, bias_g = mean("bias_q", False), mean("bias_g", False)
    res_q = cos - maps["sim_q"].sum((1, 2)) - bias_q
    res_g = cos - maps["sim_g"].sum((1, 2)) - bias_g
    out = []
    for i in range(cos.shape[0]):

        def side(s: str, bias: torch.Tensor, res: torch.Tensor, i: int = i) -> SideMaps:
            return SideMaps(
                maps[f"sim_{s}"][i].cpu().numpy(),
                maps[f"cam_{s}"][i].cpu().numpy(),
                aligned[f"sim_{s}"][i].cpu().numpy(),
                aligned[f"cam_{s}"][i].cpu().numpy(),
                float(bias[i]),
                float(res[i]),
            )

        out.append(
            PairExplanation(
                float(cos[i]),
                tuple(float(c) for c in view_cos[i]),
                side("q", bias_q, res_q),
                side("g", bias_g, res_g),
            )
        )
    return out
