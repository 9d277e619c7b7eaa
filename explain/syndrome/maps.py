"""Syndrome-level explanations: composite faces and syndrome-wise similarity maps.

Everything lives in the aligned-crop frame (DESIGN.md §2), so faces and maps of
a group can be averaged pixel by pixel.

- The composite of a group is the mean of its aligned crops (float, then
  rounded to uint8), optionally with every subject weighted equally.
- A syndrome's centroid is, per view, the mean of its members' L2-normalised
  embeddings: ``c_v = (1/N) Σ_i ê_i,v``. A face's map towards it is the
  engine's held-norm similarity map with the centroid's direction as the other
  side: ``S_i(p) = <m_i,p, ĉ_v> / ‖e_i,v‖``, which sums to ``cos(e_i, c)``
  minus the bias share ``<b, ĉ_v>/‖e_i,v‖``. Towards the rest of the syndrome
  the direction is the leave-one-out centroid ``(N c_v − ê_i,v)/(N − 1)``;
  with two members it is the other face's ê, so the map equals the engine's
  pair map.
- The syndrome-wise map is the mean of the members' maps; the query map shows
  the regions that pull a query towards (red) or away from (blue) a syndrome.

Flipped views are unflipped before the views are averaged, as in the engine.
Group loading from a gallery stays with the caller: this module takes crops
(and subject ids), never a gallery, so explain does not depend on gallery.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from explain.attribution.affine import affine_head
from explain.attribution.engine import Explainer, FaceFeatures
from explain.attribution.family import unflip, upsample
from explain.errors import IncompatibleViews, InvalidOption
from explain.limits import CancelSignal, Guard

DEFAULT_MIN_SIZE = 2
SMALL_GROUP = 5  # below this many images a composite or an average is flagged as small
IMBALANCE_RATIO = 3.0  # most/fewest images per subject above this is flagged
ENCODE_BATCH = 32


class GroupTooSmall(InvalidOption):
    """A composite or syndrome-wise map asked of fewer images than the minimum group size."""


@dataclass(frozen=True)
class GroupCheck:
    """Size and balance of a group. warnings: one sentence each (small, imbalanced)."""

    images: int
    subjects: int
    images_per_subject_max: int
    images_per_subject_min: int
    warnings: tuple[str, ...]


def check_group(
    count: int,
    subjects: Sequence[str] | None = None,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    small_size: int = SMALL_GROUP,
    imbalance_ratio: float = IMBALANCE_RATIO,
) -> GroupCheck:
    """Raise GroupTooSmall below ``min_size`` images; warn when small or imbalanced.

    subjects: one subject id per image (None: every image its own subject).
    Imbalanced means one subject dominates: most/fewest images per subject above
    ``imbalance_ratio``, or one subject holding more than half of ≥ 3 images.
    """
    if min_size < 1:
        raise InvalidOption(f"min_size must be at least 1, got {min_size}")
    if count < min_size:
        raise GroupTooSmall(f"the group has {count} image(s); at least {min_size} are needed")
    if subjects is not None and len(subjects) != count:
        raise InvalidOption(f"{len(subjects)} subject ids for {count} images")
    per_subject = Counter(subjects) if subjects is not None else Counter(range(count))
    most, fewest = max(per_subject.values()), min(per_subject.values())
    warnings = []
    if count < small_size:
        warnings.append(
            f"small group: {count} image(s) (fewer than {small_size}); the average reflects "
            "individual faces more than a shared phenotype"
        )
    if len(per_subject) < count and count >= 2:
        if most / fewest > imbalance_ratio or (count >= 3 and most > count / 2):
            warnings.append(
                f"imbalanced group: one subject contributes {most} of {count} images "
                f"(fewest per subject: {fewest}); consider balance by subject"
            )
    return GroupCheck(count, len(per_subject), most, fewest, tuple(warnings))


@dataclass(frozen=True)
class Composite:
    """The composite face of a group.

    image (H, W, 3) uint8: ``mean`` rounded; mean (H, W, 3) float32 in 0..255;
    weights (N,) the weight of each crop (1/N, or 1/(S·n_s) balanced by subject).
    """

    image: np.ndarray
    mean: np.ndarray
    weights: np.ndarray
    check: GroupCheck
    balance: str

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.check.warnings


def _crops(crops: np.ndarray) -> np.ndarray:
    arr = np.asarray(crops)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InvalidOption(f"crops must be (N, H, W, 3) uint8 aligned crops, got {arr.shape} {arr.dtype}")
    return arr


def subject_weights(subjects: Sequence[str] | None, count: int, balance: str) -> np.ndarray:
    """(N,) float64 weights summing to 1: equal per image, or equal per subject."""
    if balance == "image" or subjects is None:
        return np.full(count, 1.0 / count)
    if balance != "subject":
        raise InvalidOption(f"balance must be 'image' or 'subject', got {balance!r}")
    per_subject = Counter(subjects)
    return np.array([1.0 / (len(per_subject) * per_subject[s]) for s in subjects])


def composite(
    crops: np.ndarray,
    *,
    subjects: Sequence[str] | None = None,
    balance: str = "image",
    min_size: int = DEFAULT_MIN_SIZE,
    small_size: int = SMALL_GROUP,
) -> Composite:
    """Mean face of (N, H, W, 3) uint8 aligned crops (one shared alignment template).

    balance: "image" (plain mean) or "subject" (every subject weighs the same).
    Raises GroupTooSmall below ``min_size``.
    """
    arr = _crops(crops)
    check = check_group(len(arr), subjects, min_size=min_size, small_size=small_size)
    weights = subject_weights(subjects, len(arr), balance)
    mean = np.tensordot(weights, arr.astype(np.float64), axes=1).astype(np.float32)
    image = np.clip(np.rint(mean), 0, 255).astype(np.uint8)
    return Composite(image, mean, weights.astype(np.float32), check, balance)


@dataclass(frozen=True)
class Centroid:
    """A target direction per view: the mean of unit embeddings (a syndrome), or one face's ê.

    vectors[v] (D,) unnormalised mean of unit embeddings; units[v] = vectors[v]/‖vectors[v]‖.
    count: faces averaged. flipped: the views' flips (must match the explained faces).
    """

    vectors: tuple[torch.Tensor, ...]
    count: int
    flipped: tuple[bool, ...]

    @property
    def units(self) -> tuple[torch.Tensor, ...]:
        return tuple(v / v.norm().clamp_min(1e-12) for v in self.vectors)

    def as_array(self) -> np.ndarray:
        """(V, D) float32 unit directions."""
        return torch.stack(self.units).cpu().numpy().astype(np.float32)


@dataclass(frozen=True)
class MemberMaps:
    """One member's maps (h, w), view-averaged, aligned orientation.

    to_centroid / to_rest: held-norm similarity maps towards the syndrome
    centroid and towards the leave-one-out centroid (None for a group of one).
    """

    index: int
    cosine_to_centroid: float
    cosine_to_rest: float | None
    to_centroid: np.ndarray
    to_rest: np.ndarray | None
    bias_to_centroid: float
    residual: float


@dataclass(frozen=True)
class SyndromeMaps:
    """Syndrome-wise maps: the members' maps averaged in aligned space.

    to_centroid, to_rest (h, w); *_aligned (H, W) upsampled. members: per-member
    maps in input order. centroid: the target for queries (see :meth:`query_pull`).
    """

    to_centroid: np.ndarray
    to_rest: np.ndarray
    to_centroid_aligned: np.ndarray
    to_rest_aligned: np.ndarray
    mean_cosine_to_centroid: float
    mean_cosine_to_rest: float
    members: tuple[MemberMaps, ...]
    centroid: Centroid
    check: GroupCheck


@dataclass(frozen=True)
class QueryPull:
    """Where a query is pulled towards (positive) or pushed from (negative) a target.

    map (h, w), map_aligned (H, W); sums to ``cosine − bias_share − residual``.
    """

    cosine: float
    view_cosines: tuple[float, ...]
    map: np.ndarray
    map_aligned: np.ndarray
    bias_share: float
    residual: float


def _unit_rows(embeddings: torch.Tensor) -> torch.Tensor:
    return embeddings / embeddings.norm(dim=1, keepdim=True).clamp_min(1e-12)


class SyndromeExplainer:
    """Composites' companions that need the model: centroids, syndrome-wise and query maps.

    Built over an :class:`explain.attribution.engine.Explainer` (one model or a view scheme);
    thread-safe, holds no request state.
    """

    def __init__(self, explainer: Explainer) -> None:
        self.explainer = explainer

    def encode(
        self, crops: np.ndarray | FaceFeatures, *, guard: Guard | None = None,
        cancel: CancelSignal = None,
    ) -> FaceFeatures:
        """(N, H, W, 3) uint8 crops -> FaceFeatures, in batches of 32 (cancel polled per batch)."""
        if isinstance(crops, FaceFeatures):
            return crops
        arr = np.asarray(crops)
        if arr.ndim == 3:
            arr = arr[None]
        arr = _crops(arr)
        guard = guard or Guard(cancel=cancel)
        parts = []
        for start in range(0, len(arr), ENCODE_BATCH):
            guard.check()
            parts.append(self.explainer.encode(arr[start:start + ENCODE_BATCH], cancel=guard.cancel))
        return FaceFeatures.concat(parts)

    def centroid(self, faces: np.ndarray | FaceFeatures, *, cancel: CancelSignal = None) -> Centroid:
        """Per view, the mean of the faces' unit embeddings (one face: its own ê)."""
        features = self.encode(faces, cancel=cancel)
        with torch.no_grad():
            vectors = tuple(_unit_rows(e).mean(0) for e in features.embeddings)
        return Centroid(vectors, len(features), features.flipped)

    def syndrome_maps(
        self,
        crops: np.ndarray | FaceFeatures,
        *,
        subjects: Sequence[str] | None = None,
        min_size: int = DEFAULT_MIN_SIZE,
        cancel: CancelSignal = None,
        time_limit: float | None = None,
    ) -> SyndromeMaps:
        """Each member's map towards the centroid and towards the rest, and their means.

        crops: (N, H, W, 3) uint8 aligned crops of the group (or their features).
        ``to_rest`` needs N ≥ 2; ``min_size`` below 2 is raised to 2.
        """
        guard = Guard(time_limit=time_limit, cancel=cancel)
        count = len(crops)
        check = check_group(count, subjects, min_size=max(2, min_size))
        features = self.encode(crops, guard=guard)
        guard.check()
        per_view_c, per_view_r, cos_c, cos_r, bias_c, res_c = [], [], [], [], [], []
        vectors = []
        with torch.no_grad():
            for enc, fmap, emb, flipped in zip(
                features.encoders, features.feature_maps, features.embeddings, features.flipped,
                strict=True,
            ):
                guard.check()
                head = affine_head(enc, fmap.device)
                h, w = head.grid
                norms = emb.norm(dim=1)  # (N,)
                units = emb / norms[:, None]
                total = units.sum(0)
                centre = total / count
                vectors.append(centre)
                u_c = centre / centre.norm()
                rest = (total[None] - units) / (count - 1)  # (N, D) leave-one-out centroids
                u_r = _unit_rows(rest)
                contrib = head.contributions(fmap)  # (N, P, D)
                s_c = (contrib @ u_c) / norms[:, None]  # (N, P)
                s_r = torch.einsum("npd,nd->np", contrib, u_r) / norms[:, None]
                per_view_c.append(unflip(s_c.reshape(count, h, w), flipped))
                per_view_r.append(unflip(s_r.reshape(count, h, w), flipped))
                cos_c.append(units @ u_c)
                cos_r.append((units * u_r).sum(1))
                b = (head.bias @ u_c) / norms
                bias_c.append(b)
                res_c.append(units @ u_c - s_c.sum(1) - b)
            to_c = torch.stack(per_view_c).mean(0)  # (N, h, w)
            to_r = torch.stack(per_view_r).mean(0)
            cos_c_m = torch.stack(cos_c).mean(0)
            cos_r_m = torch.stack(cos_r).mean(0)
            bias_m = torch.stack(bias_c).mean(0)
            res_m = torch.stack(res_c).mean(0)
            mean_c, mean_r = to_c.mean(0), to_r.mean(0)
            aligned = upsample(torch.stack([mean_c, mean_r]), features.crop_size,
                                features.encoders[0])
        members = tuple(
            MemberMaps(
                i, float(cos_c_m[i]), float(cos_r_m[i]), to_c[i].cpu().numpy(),
                to_r[i].cpu().numpy(), float(bias_m[i]), float(res_m[i]),
            )
            for i in range(count)
        )
        return SyndromeMaps(
            mean_c.cpu().numpy(),
            mean_r.cpu().numpy(),
            aligned[0].cpu().numpy(),
            aligned[1].cpu().numpy(),
            float(cos_c_m.mean()),
            float(cos_r_m.mean()),
            members,
            Centroid(tuple(vectors), count, features.flipped),
            check,
        )

    def query_pull(
        self, query: np.ndarray | FaceFeatures, target: Centroid, *, cancel: CancelSignal = None
    ) -> QueryPull:
        """The query's held-norm similarity map towards ``target`` (a syndrome centroid or a face).

        query: one (H, W, 3) uint8 aligned crop or its FaceFeatures (N = 1).
        """
        q = self.encode(query, cancel=cancel)
        if len(q) != 1:
            raise InvalidOption(f"query_pull takes one query face, got {len(q)}")
        if q.flipped != target.flipped:
            raise IncompatibleViews("the query and the target come from different view schemes")
        maps, cosines, biases = [], [], []
        with torch.no_grad():
            for enc, fmap, emb, flipped, unit in zip(
                q.encoders, q.feature_maps, q.embeddings, q.flipped, target.units, strict=True
            ):
                head = affine_head(enc, fmap.device)
                norm = emb[0].norm()
                s = head.contributions(fmap)[0] @ unit / norm
                maps.append(unflip(s.reshape(1, *head.grid), flipped)[0])
                cosines.append(float(emb[0] @ unit / norm))
                biases.append(float(head.bias @ unit / norm))
            mean = torch.stack(maps).mean(0)
            aligned = upsample(mean[None], q.crop_size, q.encoders[0])[0]
        cosine = float(np.mean(cosines))
        bias = float(np.mean(biases))
        return QueryPull(
            cosine, tuple(cosines), mean.cpu().numpy(), aligned.cpu().numpy(), bias,
            cosine - float(mean.sum()) - bias,
        )


def syndrome_figure(
    composite_image: np.ndarray,
    maps: SyndromeMaps,
    *,
    label: str = "",
    query_crop: np.ndarray | None = None,
    pull: QueryPull | None = None,
    path: str | None = None,
) -> bytes:
    """PNG: the composite, the mean maps towards the centroid and towards the rest drawn on
    it (one ±max|map| scale), and, with a query, the query's pull towards the syndrome."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from explain.render import figure_png, overlay, symmetric_limit

    panels = [(composite_image, None, "composite"),
              (composite_image, maps.to_centroid_aligned, "members → centroid"),
              (composite_image, maps.to_rest_aligned, "members → rest")]
    if query_crop is not None and pull is not None:
        panels += [(query_crop, None, "query"),
                   (query_crop, pull.map_aligned, f"query → syndrome ({pull.cosine:.2f})")]
    limit = symmetric_limit(maps.to_centroid_aligned, maps.to_rest_aligned)
    fig = Figure(figsize=(2.2 * len(panels), 2.7), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for ax, (rgb, signed, name) in zip(axes, panels, strict=True):
        scale = symmetric_limit(signed) if pull is not None and signed is pull.map_aligned else limit
        ax.imshow(rgb if signed is None else overlay(rgb, signed, limit=scale))
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    check = maps.check
    fig.suptitle(
        f"{label or 'group'} · {check.images} images, {check.subjects} subjects · "
        f"cos→centroid {maps.mean_cosine_to_centroid:.2f}, →rest {maps.mean_cosine_to_rest:.2f}",
        fontsize=9,
    )
    return figure_png(fig, path)
