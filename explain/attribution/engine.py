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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from encoder.spec import FaceEncoder
from explain.attribution.affine import affine_head
from explain.attribution.cam import ViewPair
from explain.attribution.contrast import draw as draw_contrast
from explain.attribution.family import unflip as _unflip
from explain.attribution.family import upsample as _upsample
from explain.attribution.implementations import METHODS
from explain.attribution.views import ViewInput, ViewSource, as_view_source, view_inputs
from explain.errors import IncompatibleViews, InvalidOption
from explain.limits import CancelSignal, Guard


@dataclass(frozen=True)
class FaceFeatures:
    """CAM-layer feature maps and embeddings of N faces, one entry per view.

    feature_maps[v] (N, C, h, w) as the view's encoder saw the (possibly
    flipped) crop; embeddings[v] (N, D) unnormalised; crop_size (H, W) of the
    aligned crop; crops (N, H, W, 3) the aligned crops they were computed from
    (pixel methods of the family perturb them), or None; fine_maps[v]
    (N, C_f, h_f, w_f) the activations at the encoder's ``contrast_layer`` (the
    ``contrast`` maps read them), or None. Cache these for gallery faces to skip
    their forward pass. tail_states[v]: what the encode recorded in the network's
    tail for ``FaceEncoder.fine_vjp`` (``tail_forward``; batch-first tensors), or
    None: a query's contrast maps then need no second forward through the tail.
    Caches need not keep them (only a query's are read).
    """

    feature_maps: tuple[torch.Tensor, ...]
    embeddings: tuple[torch.Tensor, ...]
    encoders: tuple[FaceEncoder, ...]
    flipped: tuple[bool, ...]
    crop_size: tuple[int, int]
    crops: np.ndarray | None = field(default=None, repr=False)
    fine_maps: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    tail_states: tuple[tuple[torch.Tensor, ...] | None, ...] | None = field(default=None,
                                                                             repr=False)

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
            None if self.crops is None else self.crops[index],
            None if self.fine_maps is None else tuple(f[index] for f in self.fine_maps),
            None if self.tail_states is None else tuple(
                None if st is None else tuple(t[index] for t in st) for st in self.tail_states),
        )

    @classmethod
    def concat(cls, faces: Sequence[FaceFeatures]) -> FaceFeatures:
        """Features of N faces (one view scheme, same encoder objects) -> one FaceFeatures."""
        if not faces:
            raise ValueError("concat needs at least one face")
        first = faces[0]
        if len(faces) == 1:
            return first
        views = range(len(first.feature_maps))
        crops = [f.crops for f in faces]
        fine = None
        if all(f.fine_maps is not None for f in faces):
            fine = tuple(torch.cat([f.fine_maps[v] for f in faces]) for v in views)
        states = None
        if all(f.tail_states is not None and all(st is not None for st in f.tail_states)
               for f in faces):
            states = tuple(tuple(torch.cat(parts) for parts in
                                 zip(*(f.tail_states[v] for f in faces), strict=True))
                           for v in views)
        return cls(
            tuple(torch.cat([f.feature_maps[v] for f in faces]) for v in views),
            tuple(torch.cat([f.embeddings[v] for f in faces]) for v in views),
            first.encoders,
            first.flipped,
            first.crop_size,
            None if any(c is None for c in crops) else np.concatenate(crops),
            fine,
            states,
        )


@dataclass(frozen=True)
class SideMaps:
    """The maps on one face of a pair, averaged over views, in aligned-crop orientation.

    maps[name] (h, w): one map of ``BATCHED_MAPS`` per name asked for, signed;
    aligned[name] (H, W): the same maps on the aligned crop, bilinear at the cells'
    receptive-field peaks (per-cell values, not densities), except ``contrast`` when
    both crops are known: each cell's value divided among the pixels where the two
    crops differ (pixel shares that sum to the cell map's sum; ``explain.attribution.contrast``). The similarity map (always computed) is the
    signed contribution of each cell to the cosine (HiResCAM of the held-norm
    target); it sums to ``cosine - bias_share - residual``; residual ≈ 0 checks
    the linearisation of the head.
    """

    maps: dict[str, np.ndarray]
    aligned: dict[str, np.ndarray]
    bias_share: float
    residual: float

    @property
    def similarity(self) -> np.ndarray:
        return self.maps["similarity"]

    @property
    def similarity_aligned(self) -> np.ndarray:
        return self.aligned["similarity"]

    @property
    def gradcam(self) -> np.ndarray:
        return self.maps["gradcam"]

    @property
    def gradcam_aligned(self) -> np.ndarray:
        return self.aligned["gradcam"]


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
        return self._encode_views(view_inputs(self.source, crops), crops, guard)

    def _encode_views(self, views: list[ViewInput], crops: np.ndarray, guard: Guard,
                      fine: bool = True) -> FaceFeatures:
        """One batched forward per encoder. ``fine``: also keep the contrast-layer
        activations and the tail's state (``fine_maps``, ``tail_states``); without, the
        plain ``features`` forward (the same feature maps, no gains recorded)."""
        maps: list[torch.Tensor | None] = [None] * len(views)
        fines: list[torch.Tensor | None] = [None] * len(views)
        states: list[tuple[torch.Tensor, ...] | None] = [None] * len(views)
        embs: list[torch.Tensor | None] = [None] * len(views)
        groups: dict[int, list[int]] = {}
        for index, view in enumerate(views):  # views of one encoder share one batched forward
            groups.setdefault(id(view.encoder), []).append(index)
        with torch.no_grad():
            for indices in groups.values():
                guard.check()
                encoder = views[indices[0]].encoder
                x = views[indices[0]].inputs if len(indices) == 1 else torch.cat(
                    [views[i].inputs for i in indices])
                if fine:
                    activations = encoder.fine_features(x)
                    fmap, state = encoder.tail_forward(activations)
                else:
                    activations, fmap, state = None, encoder.features(x), None
                emb = encoder.head(fmap)
                n = views[indices[0]].inputs.shape[0]
                for j, i in enumerate(indices):
                    part = slice(j * n, (j + 1) * n)
                    maps[i], embs[i] = fmap[part], emb[part]
                    if activations is not None:
                        fines[i] = activations[part]
                    if state is not None:
                        states[i] = tuple(t[part] for t in state)
        grids = {tuple(m.shape[-2:]) for m in maps}
        if len(grids) > 1:
            raise IncompatibleViews(f"views have different feature grids {sorted(grids)}")
        return FaceFeatures(
            tuple(maps),
            tuple(embs),
            tuple(v.encoder for v in views),
            tuple(v.flipped for v in views),
            (int(crops.shape[1]), int(crops.shape[2])),
            crops,
            tuple(fines) if fine else None,
            tuple(states),
        )

    def features(self, faces: np.ndarray | FaceFeatures, guard: Guard | None = None, *,
                 fine: bool = True) -> FaceFeatures:
        """``faces`` as FaceFeatures: given ones as they are, (N, H, W, 3) or (H, W, 3) uint8
        crops encoded here (N forward passes per view, spent on ``guard``; ``fine=False``
        leaves out the contrast-layer activations and tail state, which only the maps of
        ``FINE_MAPS`` read)."""
        if isinstance(faces, FaceFeatures):
            return faces
        crops = np.asarray(faces)
        if crops.ndim == 3:
            crops = crops[None]
        guard = guard or Guard()
        features = self._encode_views(view_inputs(self.source, crops), crops, guard, fine)
        guard.spend(len(crops) * len(features.encoders))
        return features

    # ---- two-sided maps -----------------------------------------------------------

    def explain(
        self,
        query: np.ndarray | FaceFeatures,
        hits: np.ndarray | FaceFeatures,
        *,
        maps: Sequence[str] = ("similarity", "gradcam"),
        cancel: CancelSignal = None,
    ) -> list[PairExplanation]:
        """Two-sided maps of ``BATCHED_MAPS`` (``maps``; similarity always) for a query and K hits.

        query: one aligned crop (H, W, 3) uint8 or its FaceFeatures (N = 1);
        hits: (K, H, W, 3) uint8 crops or their (cached) FaceFeatures.
        Returns K PairExplanation, in the order of ``hits``.
        """
        names = tuple(dict.fromkeys(("similarity", *maps)))
        fine = any(name in FINE_MAPS for name in names)
        guard = Guard(cancel=cancel)
        q, g = self.features(query, guard, fine=fine), self.features(hits, guard, fine=fine)
        check_compatible(q, g)
        if len(q) != 1:
            raise InvalidOption(f"explain() takes one query face, got {len(q)}")
        if fine:
            q, g = self._with_fine_maps(q, guard), self._with_fine_maps(g, guard)
        guard.check()
        no_fine = (None,) * len(q.encoders)
        with torch.no_grad():
            per_view = [
                _two_sided(ViewPair(affine_head(enc, fq.device), fq[0], eq[0], fg, eg, enc,
                                    aq, ag, sq), names)
                for enc, fq, eq, fg, eg, aq, ag, sq in zip(
                    q.encoders,
                    q.feature_maps,
                    q.embeddings,
                    g.feature_maps,
                    g.embeddings,
                    q.fine_maps or no_fine,
                    g.fine_maps or no_fine,
                    q.tail_states or no_fine,
                    strict=True,
                )
            ]
            return _average_views(per_view, names, q.flipped, q.crop_size, q.encoders[0],
                                  (q.crops, g.crops))

    def _with_fine_maps(self, faces: FaceFeatures, guard: Guard) -> FaceFeatures:
        """Features that carry their contrast-layer activations (re-encoded from their crops
        when they were cached without them)."""
        if faces.fine_maps is not None:
            return faces
        if faces.crops is None:
            raise InvalidOption("contrast maps need the faces' contrast-layer activations or "
                                "their crops; these features carry neither")
        return self._encode_views(view_inputs(self.source, faces.crops), faces.crops, guard)

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
        q, g = self.features(query), self.features(hit)
        check_compatible(q, g)
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
            aligned = _upsample(mean_map[None], q.crop_size, q.encoders[0])[0]
        return Correspondence(
            mean_map.cpu().numpy(),
            aligned.cpu().numpy(),
            (min(int(row * h / height), h - 1), min(int(col * w / width), w - 1)),
            float(np.mean(sims)),
            float(np.mean(biases)),
        )


def check_compatible(q: FaceFeatures, g: FaceFeatures) -> None:
    """Raise IncompatibleViews unless both come from one view scheme and crop size."""
    if (
        q.flipped != g.flipped
        or len(q.encoders) != len(g.encoders)
        or any(a is not b for a, b in zip(q.encoders, g.encoders, strict=True))
    ):
        raise IncompatibleViews("query and hit features come from different view schemes")
    if q.crop_size != g.crop_size:
        raise IncompatibleViews(f"crop sizes differ: {q.crop_size} vs {g.crop_size}")


BatchedMap = Callable[[ViewPair], tuple[torch.Tensor, torch.Tensor]]
"""A map computed for all K hits from features alone: ViewPair -> ((K, P) query side,
(K, P) hit side), P = h·w cells of the view's grid — or (K, h', w') on another grid —
in the view's (possibly flipped) frame."""

BATCHED_MAPS: dict[str, BatchedMap] = {
    name: method.batched_maps for name, method in METHODS.items() if method.spec.batched}
"""The maps the engine computes for all K hits in one pass: the catalogue's batched
methods (``MethodSpec.batched``), each its ``batched_maps``; ``explain_matches`` (server,
CLI, evaluation) sends every name found here through the engine."""
FINE_MAPS = frozenset(name for name, method in METHODS.items()
                      if getattr(method, "reads_fine_maps", False))
"""The maps that read the contrast-layer activations (ViewPair.aq/ag)."""


@dataclass(frozen=True)
class _ViewMaps:
    cos: torch.Tensor  # (K,)
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> ((K, h, w) query, hits)
    bias_q: torch.Tensor  # (K,)
    bias_g: torch.Tensor


def _two_sided(v: ViewPair, names: Sequence[str]) -> _ViewMaps:
    """One view of a query and K hits -> its maps, each (K, h, w) on its own grid."""
    k = v.fg.shape[0]

    def grid(m: torch.Tensor) -> torch.Tensor:
        return m if m.dim() == 3 else m.reshape(k, *v.head.grid)

    maps = {}
    for name in names:
        q, g = BATCHED_MAPS[name](v)
        maps[name] = (grid(q), grid(g))
    return _ViewMaps(v.ug @ v.uq, maps, v.ug @ v.head.bias / v.nq, (v.uq @ v.head.bias) / v.ng)


def _average_views(
    per_view: list[_ViewMaps],
    names: Sequence[str],
    flipped: tuple[bool, ...],
    crop_size: tuple[int, int],
    encoder: FaceEncoder,
    crops: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> list[PairExplanation]:
    def mean(values: list[torch.Tensor], unflip: bool) -> torch.Tensor:
        values = [_unflip(t, f) if unflip else t for t, f in zip(values, flipped, strict=True)]
        return values[0] if len(values) == 1 else torch.stack(values).mean(0)

    cos = mean([v.cos for v in per_view], False)
    view_cos = torch.stack([v.cos for v in per_view], dim=1)  # (K, V)
    maps = {
        (name, side): mean([v.maps[name][side] for v in per_view], True)
        for name in names
        for side in (0, 1)
    }
    query_crops, hit_crops = crops
    aligned = {}
    for (name, side), m in maps.items():
        if name != "contrast":
            aligned[name, side] = _upsample(m, crop_size, encoder)
        elif side == 1 and torch.equal(m, maps[name, 0]):
            aligned[name, side] = aligned[name, 0]  # one map on both aligned faces
        else:
            aligned[name, side] = draw_contrast(
                m, encoder, crop_size, None if query_crops is None else query_crops[0], hit_crops)
    bias_q = mean([v.bias_q for v in per_view], False)
    bias_g = mean([v.bias_g for v in per_view], False)
    res_q = cos - maps["similarity", 0].sum((1, 2)) - bias_q
    res_g = cos - maps["similarity", 1].sum((1, 2)) - bias_g
    # to numpy once per batch (each pair's arrays are views of it, as tensor slices were)
    maps_np = {key: m.cpu().numpy() for key, m in maps.items()}
    aligned_np = {key: m.cpu().numpy() for key, m in aligned.items()}
    scalars = [t.cpu().tolist() for t in (bias_q, res_q, bias_g, res_g)]

    def side(s: int, i: int) -> SideMaps:
        bias, res = scalars[2 * s], scalars[2 * s + 1]
        return SideMaps({n: maps_np[n, s][i] for n in names},
                        {n: aligned_np[n, s][i] for n in names}, bias[i], res[i])

    return [
        PairExplanation(c, tuple(vc), side(0, i), side(1, i))
        for i, (c, vc) in enumerate(zip(cos.cpu().tolist(), view_cos.cpu().tolist(), strict=True))
    ]
