"""What the engine needs from a view scheme: per view, an encoder, its input batch and the flip.

``encoder.views.Ensemble.view_inputs(crops)`` provides this for a whole
scheme; a bare :class:`FaceEncoder` is the one-view scheme (optionally with its
mirrored view, as in GestaltMatcher's test-time flip).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from encoder.spec import FaceEncoder


@dataclass(frozen=True)
class ViewInput:
    """One view of N aligned crops: ``inputs`` (N, C, H, W) is already flipped when ``flipped``."""

    encoder: FaceEncoder
    inputs: torch.Tensor
    flipped: bool


class ViewSource(Protocol):
    def view_inputs(self, crops: np.ndarray) -> Sequence[Any]: ...


@dataclass(frozen=True)
class SingleEncoderViews:
    """The scheme ``{encoder:orig}`` or ``{encoder:orig, encoder:flip}``."""

    encoder: FaceEncoder
    flip: bool = False

    def view_inputs(self, crops: np.ndarray) -> list[ViewInput]:
        crops = np.asarray(crops)
        views = [ViewInput(self.encoder, self.encoder.preprocess(crops), False)]
        if self.flip:
            mirrored = np.ascontiguousarray(crops[..., :, ::-1, :])
            views.append(ViewInput(self.encoder, self.encoder.preprocess(mirrored), True))
        return views


def as_view_source(model: FaceEncoder | ViewSource) -> ViewSource:
    if isinstance(model, FaceEncoder):
        return SingleEncoderViews(model)
    if not hasattr(model, "view_inputs"):
        raise TypeError(f"expected a FaceEncoder or an object with view_inputs(), got {type(model)}")
    return model


def view_inputs(source: ViewSource, crops: np.ndarray) -> list[ViewInput]:
    """Normalise whatever ``source.view_inputs`` returns to a list of :class:`ViewInput`."""
    out = []
    for item in source.view_inputs(crops):
        if isinstance(item, ViewInput):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 3:
            out.append(ViewInput(item[0], item[1], bool(item[2])))
        else:
            out.append(ViewInput(item.encoder, item.inputs, bool(item.flipped)))
    return out
