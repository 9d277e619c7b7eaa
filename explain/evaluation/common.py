"""What every evaluation protocol shares: photo pairs, the pair target, query maps.

Every protocol explains the QUERY side of a (query, gallery) pair and scores
it against the pair similarity with norms held constant (DESIGN §5):

    s(x) = mean_v <e_v(x), ê_g,v> / ‖e_v(x₀)‖

where x₀ is the unperturbed query crop. At x = x₀ this is the cosine; under
perturbation it is linear in the embedding, so maps that sum to the cosine
(the similarity map) are judged on the quantity they decompose. The plain
cosine of every perturbed image is recorded alongside.

The protocols, one module each (each returns a small frozen dataclass that
``explain.evaluation.report`` turns into JSON, Markdown and PNG):
``faithfulness``, ``sanity``, ``localization``, ``cost``, ``accuracy``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from encoder.spec import FaceEncoder
from explain.attribution.catalogue import METHOD_NAMES
from explain.attribution.engine import Explainer
from explain.attribution.matches import explain_matches
from explain.attribution.views import ViewSource, as_view_source, view_inputs
from explain.evaluation import metrics as M

log = logging.getLogger(__name__)

SIDES: tuple[str, ...] = ("positive", "negative")

# The real photo pairs (encoder.assets.PHOTOS): two same-person pairs taken
# years apart, and impostor pairs among the same photos.
DEFAULT_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("person_a_1.jpg", "person_a_2.jpg", "same"),
    ("person_b_1.jpg", "person_b_2.jpg", "same"),
    ("person_a_1.jpg", "person_b_1.jpg", "impostor"),
    ("person_a_2.jpg", "impostor_1.jpg", "impostor"),
    ("person_b_2.jpg", "impostor_2.jpg", "impostor"),
    ("impostor_1.jpg", "impostor_2.jpg", "impostor"),
)


# ------------------------------------------------------------------ pairs


@dataclass(frozen=True)
class FacePair:
    """An aligned (query, gallery) pair; the query side is the one explained.

    query, gallery: (H, W, 3) uint8 aligned crops; query_landmarks (5, 2) in the crop.
    """

    name: str
    kind: str  # "same" or "impostor"
    query: np.ndarray = field(repr=False)
    gallery: np.ndarray = field(repr=False)
    query_landmarks: np.ndarray = field(repr=False)


def photo_pairs(
    pairs: Sequence[tuple[str, str, str]] = DEFAULT_PAIRS, pipeline=None
) -> list[FacePair]:
    """Detect and align the bundled photos named in ``pairs`` (query, gallery, kind)."""
    from encoder.assets import photo

    if pipeline is None:
        from encoder.pipeline import FacePipeline

        pipeline = FacePipeline()
    cache: dict[str, object] = {}

    def face(name: str):
        if name not in cache:
            cache[name] = pipeline.face(photo(name))
        return cache[name]

    out = []
    for q, g, kind in pairs:
        fq, fg = face(q), face(g)
        out.append(
            FacePair(
                name=f"{q.rsplit('.', 1)[0]}~{g.rsplit('.', 1)[0]}",
                kind=kind,
                query=fq.alignment.crop,
                gallery=fg.alignment.crop,
                query_landmarks=np.asarray(fq.alignment.landmarks_crop, dtype=np.float64),
            )
        )
    return out


# ----------------------------------------------------------- the target


def embed_views(source: ViewSource, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, H, W, 3) pixels (uint8 or float 0..255) -> (N, V, D) unnormalised per-view embeddings."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            chunk = np.asarray(images[i : i + batch_size])
            views = view_inputs(source, chunk)
            out.append(torch.stack([v.encoder(v.inputs) for v in views], dim=1))
    return torch.cat(out).cpu().numpy()


class PairTarget:
    """The held-norm pair similarity of (perturbed) query crops against one fixed target.

    The target is either a gallery crop or per-view target directions
    ``(V, D)`` (e.g. a syndrome centroid). Calls are batched and gradient-free.
    """

    def __init__(
        self,
        model: FaceEncoder | ViewSource,
        query: np.ndarray,
        gallery: np.ndarray | None = None,
        *,
        directions: np.ndarray | None = None,
        batch_size: int = 64,
    ) -> None:
        self.source = as_view_source(model)
        self.batch_size = batch_size
        if (gallery is None) == (directions is None):
            raise ValueError("give exactly one of gallery (a crop) or directions (V, D)")
        if directions is None:
            directions = self.embed(np.asarray(gallery)[None])[0]
        d = torch.as_tensor(np.asarray(directions, dtype=np.float32))
        self.directions = d / d.norm(dim=-1, keepdim=True)  # (V, D)
        self.query_norms = torch.as_tensor(self.embed(np.asarray(query)[None])[0]).norm(dim=-1)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) pixels -> (N, V, D) unnormalised embeddings."""
        return embed_views(self.source, images, self.batch_size)

    def scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) -> ((N,) held-norm similarity, (N,) cosine), both view-averaged."""
        e = torch.as_tensor(self.embed(images))  # (N, V, D)
        dots = (e * self.directions[None]).sum(-1)  # (N, V)
        held = (dots / self.query_norms[None]).mean(1)
        cos = (dots / e.norm(dim=-1)).mean(1)
        return held.numpy().astype(np.float64), cos.numpy().astype(np.float64)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.scores(images)[0]


# ----------------------------------------------------------- method dispatch


def available_methods() -> tuple[str, ...]:
    """Every method of the explain family, in its order."""
    return METHOD_NAMES


def query_map(
    method: str,
    explainer: Explainer,
    query: np.ndarray,
    gallery: np.ndarray,
    native: bool = False,
    **options,
) -> np.ndarray:
    """(H, W) float32 signed map of ``method`` on the query side, in aligned-crop pixels
    (``native=True``: at the method's own resolution, e.g. the 7×7 cells, as the model made
    it — what a sanity check compares, free of how cells are drawn on the crop).

    Goes through ``explain_matches`` (family methods on the query side only);
    ``options`` are passed on (method options; ``budget`` and ``time_limit``
    default to None here: measurements are not requests, so a loaded machine
    must not cut a method short).
    """
    budget = options.pop("budget", None)
    time_limit = options.pop("time_limit", None)
    (match,) = explain_matches(explainer, query, np.asarray(gallery)[None], [method],
                               options={method: options}, budget=budget,
                               time_limit=time_limit, sides=("query",))
    if native:
        return np.asarray(match[method].query, dtype=np.float32)
    amap = np.asarray(match[method].query_aligned, dtype=np.float32)
    return M.upsample_map(amap, query.shape[:2])


# ----------------------------------------------------------- query maps


def query_maps(
    model: FaceEncoder | ViewSource,
    pairs: Sequence[FacePair],
    methods: Sequence[str] | None = None,
    *,
    method_options: dict[str, dict] | None = None,
) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """Every method's (H, W) query map for every pair; failing methods go to the errors."""
    explainer = Explainer(model)
    method_options = method_options or {}
    maps: dict[str, list[np.ndarray]] = {}
    errors: dict[str, str] = {}
    for method in methods or available_methods():
        try:
            maps[method] = [
                query_map(method, explainer, p.query, p.gallery, **method_options.get(method, {}))
                for p in pairs
            ]
        except Exception as exc:
            log.warning("method %s failed: %s", method, exc)
            errors[method] = f"{type(exc).__name__}: {exc}"
    return maps, errors
