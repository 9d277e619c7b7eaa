"""Test-time views (flip, gray) and ensembles of encoders.

A :class:`View` is one (encoder, flip, gray) combination; a :class:`ViewScheme`
is the ordered tuple of views whose embeddings a gallery stores, named by a
short id string (``"sface:orig,sface:flip"``) so that a gallery can record
which scheme its vectors came from. GM-Arc's scheme of 3 models x {orig, flip}
x {colour, gray} is ``ViewScheme.product(["r50", "r100", "r100_glint"],
flips=(False, True), grays=(False, True))`` with an :class:`Ensemble` whose
``encoders`` has those three keys (two may be the same architecture with
different weights, so a view names an ensemble *member*, not an architecture).

Embeddings are L2-normalised per view and never averaged across views: GM
averages per-view cosine distances, which the gallery reproduces with one
inner product over the concatenated views (DESIGN §4).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product as _product
from pathlib import Path

import cv2
import numpy as np
import torch

from encoder.spec import FaceEncoder

_MEMBER = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class View:
    """encoder: the ensemble member's key (the registry name for one model per architecture).
    flip: horizontally mirrored crop. gray: luma replicated to the encoder's channels."""

    encoder: str
    flip: bool = False
    gray: bool = False

    def __post_init__(self) -> None:
        if not _MEMBER.match(self.encoder):
            raise ValueError(f"view encoder key {self.encoder!r} must match {_MEMBER.pattern}")

    @property
    def id(self) -> str:
        return f"{self.encoder}:{'flip' if self.flip else 'orig'}{'+gray' if self.gray else ''}"

    @classmethod
    def parse(cls, text: str) -> View:
        """``"sface:orig"``, ``"sface:flip"``, ``"r100:orig+gray"``, ``"r100:flip+gray"``;
        ``"r100"`` alone means orig and ``"r100:gray"`` orig+gray."""
        encoder, sep, mode = text.strip().partition(":")
        parts = mode.split("+") if sep else ["orig"]
        if parts == ["gray"]:
            parts = ["orig", "gray"]
        if parts[0] not in ("orig", "flip") or parts[1:] not in ([], ["gray"]):
            raise ValueError(f"not a view id: {text!r} (expected e.g. 'sface:orig' or 'sface:flip+gray')")
        return cls(encoder, flip=parts[0] == "flip", gray=parts[1:] == ["gray"])


@dataclass(frozen=True)
class ViewScheme:
    """The ordered views of an embedding; ``id`` round-trips through :meth:`parse`."""

    views: tuple[View, ...]

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError("a view scheme needs at least one view")
        ids = [v.id for v in self.views]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate views in scheme: {ids}")

    @property
    def id(self) -> str:
        return ",".join(v.id for v in self.views)

    @property
    def encoders(self) -> tuple[str, ...]:
        """Member keys in first-use order."""
        return tuple(dict.fromkeys(v.encoder for v in self.views))

    def __len__(self) -> int:
        return len(self.views)

    @classmethod
    def parse(cls, text: str) -> ViewScheme:
        return cls(tuple(View.parse(part) for part in text.split(",") if part.strip()))

    @classmethod
    def product(
        cls,
        encoders: Sequence[str],
        flips: Sequence[bool] = (False,),
        grays: Sequence[bool] = (False,),
    ) -> ViewScheme:
        """Every encoder x flip x gray, in that nesting order (GM-Arc's ``encode`` order)."""
        return cls(tuple(View(e, f, g) for e, f, g in _product(encoders, flips, grays)))


@dataclass(frozen=True, eq=False)
class ViewInput:
    """One view of a batch, ready for ``encoder.features``/``encoder.head``.

    inputs: (N, C, H, W) normalised tensor on the encoder's device.
    flipped: the crops were mirrored, so a feature map of this view must be
    flipped along W (``torch.flip(map, dims=[-1])``) to overlay the original crop.
    """

    view: View
    encoder: FaceEncoder
    inputs: torch.Tensor
    flipped: bool


def gray_crops(crops: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, H, W, 3) uint8 luma replicated (OpenCV's RGB2GRAY, as GM-Arc)."""
    gray = np.stack([cv2.cvtColor(np.ascontiguousarray(c), cv2.COLOR_RGB2GRAY) for c in crops])
    return np.repeat(gray[..., None], 3, axis=-1)


def _as_batch(crops: np.ndarray) -> np.ndarray:
    arr = np.asarray(crops)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"crops must be (N, H, W, 3) uint8 RGB, got {arr.shape} {arr.dtype}")
    return arr


class Ensemble:
    """Encoders (by member key) and the view scheme they are run under.

    All members must share one alignment template (one crop feeds every view).
    ``embed`` returns (N, V, D) with D the largest member embedding size; views
    of smaller encoders are zero-padded, which changes neither their norms nor
    any inner product, so per-view cosines and the gallery's concatenated
    vectors are exact. ``dims`` gives each view's true size.
    """

    def __init__(self, encoders: Mapping[str, FaceEncoder], scheme: ViewScheme) -> None:
        missing = [k for k in scheme.encoders if k not in encoders]
        if missing:
            raise ValueError(f"view scheme {scheme.id} names encoders not in the ensemble: {missing}")
        self.encoders = {k: encoders[k] for k in scheme.encoders}
        self.scheme = scheme
        alignments = {m.spec.alignment for m in self.encoders.values()}
        if len(alignments) != 1:
            detail = {k: m.spec.alignment for k, m in self.encoders.items()}
            raise ValueError(f"ensemble members need one alignment template, got {detail}")
        (self.alignment,) = alignments
        first = next(iter(self.encoders.values()))
        self.input_size: tuple[int, int] = first.spec.input_size
        self.dims: tuple[int, ...] = tuple(
            self.encoders[v.encoder].spec.embedding_dim for v in scheme.views
        )
        self.embedding_dim = max(self.dims)

    @property
    def encoder_id(self) -> str:
        """The gallery's compatibility key of these encoders (see :func:`encoder_id`)."""
        return encoder_id(self.encoders.values())

    def view_inputs(self, crops: np.ndarray) -> list[ViewInput]:
        """(N, H, W, 3) uint8 aligned crops -> one :class:`ViewInput` per view, in scheme order."""
        batch = _as_batch(crops)
        flipped = np.ascontiguousarray(batch[:, :, ::-1])
        variants = {
            (False, False): batch,
            (True, False): flipped,
        }
        out = []
        for view in self.scheme.views:
            key = (view.flip, view.gray)
            if key not in variants:
                variants[key] = gray_crops(flipped if view.flip else batch)
            encoder = self.encoders[view.encoder]
            out.append(ViewInput(view, encoder, encoder.preprocess(variants[key]), view.flip))
        return out

    def embed_views(self, crops: np.ndarray) -> list[np.ndarray]:
        """Per view, (N, D_v) float32 L2-normalised embeddings; one forward per member."""
        inputs = self.view_inputs(crops)
        by_member: dict[str, list[int]] = {}
        for index, item in enumerate(inputs):
            by_member.setdefault(item.view.encoder, []).append(index)
        results: list[np.ndarray | None] = [None] * len(inputs)
        with torch.inference_mode():
            for member, indices in by_member.items():
                stacked = torch.cat([inputs[i].inputs for i in indices])
                emb = self.encoders[member](stacked).float()
                emb = torch.nn.functional.normalize(emb, dim=1).cpu().numpy()
                for j, chunk in zip(indices, np.split(emb, len(indices)), strict=True):
                    results[j] = chunk.astype(np.float32)
        return [r for r in results if r is not None]

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 aligned crops -> (N, V, D) float32, L2-normalised per view."""
        per_view = self.embed_views(crops)
        n = per_view[0].shape[0]
        out = np.zeros((n, len(per_view), self.embedding_dim), dtype=np.float32)
        for v, emb in enumerate(per_view):
            out[:, v, : emb.shape[1]] = emb
        return out


def ensemble_for(
    scheme: ViewScheme | str,
    *,
    weights: Mapping[str, str | Path] | None = None,
    architectures: Mapping[str, str] | None = None,
    device: str = "cpu",
    shared: bool = True,
) -> Ensemble:
    """Build the encoders a scheme names. ``architectures`` maps member keys to registry
    names (default: the key itself); ``weights`` maps member keys to weights files.
    ``shared=True`` uses the process-wide instances (serving), else private copies."""
    from encoder.registry import create_encoder, shared_encoder

    if isinstance(scheme, str):
        scheme = ViewScheme.parse(scheme)
    make = shared_encoder if shared else create_encoder
    encoders = {
        key: make((architectures or {}).get(key, key), (weights or {}).get(key), device)
        for key in scheme.encoders
    }
    return Ensemble(encoders, scheme)


def encoder_id(encoders: Iterable[FaceEncoder]) -> str:
    """The gallery's compatibility key: ``name@version`` of each encoder, joined by ``+``."""
    return "+".join(f"{e.spec.name}@{e.spec.version}" for e in encoders)


def configured_ensemble(
    name: str,
    scheme_id: str,
    weights: str | Path | None = None,
    device: str = "cpu",
) -> Ensemble:
    """The ensemble a configuration names (server, gallery CLI): the views of
    ``scheme_id``, ``weights`` for the encoder ``name`` (the others with their
    default weights), shared process-wide instances on ``device``."""
    return ensemble_for(scheme_id, weights={name: weights} if weights else None, device=device)


def default_ensemble(flip: bool = False, device: str = "cpu") -> Ensemble:
    """SFace alone, original view (plus the mirrored view with ``flip=True``)."""
    flips = (False, True) if flip else (False,)
    return ensemble_for(ViewScheme.product(["sface"], flips=flips), device=device)
