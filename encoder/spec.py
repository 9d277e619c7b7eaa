"""What every encoder declares about itself, and the features/head split.

Like timm's pretrained configs: an encoder carries its input size, its
normalisation, its embedding size and its CAM layer, so nothing else hard-codes
them. Every encoder is split into ``features(x) -> (B, C, H, W)`` and an affine
(in eval mode) ``head(F) -> (B, D)``; explanations rely on that split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class EncoderSpec:
    """Static facts about one encoder.

    ``mean``/``std`` apply to pixel values in 0..255: ``x = (pixel - mean) / std``.
    ``alignment`` names the crop the encoder expects (see ``encoder.align``).
    """

    name: str
    input_size: tuple[int, int]  # (H, W) of the aligned crop
    channels: int  # 3 = RGB, 1 = grayscale
    mean: float
    std: float
    embedding_dim: int
    feature_shape: tuple[int, int, int]  # (C, H, W) of features(x)
    cam_layer: str  # the module whose output features(x) returns
    alignment: str  # "arcface112", "gm100gray", "facenet160"
    version: str = "1"
    # The finer layer the ``contrast`` maps read (e.g. the last 14x14 block); None:
    # the CAM layer itself. ``features(x) == fine_to_features(fine_features(x))``.
    contrast_layer: str | None = None


@dataclass(frozen=True)
class EarlySplit:
    """The network as ``late(early(x))``, with what a windowed ``early`` needs to be exact.

    ``early`` maps (N, C, H, W) inputs to (N, C_e, H/stride, W/stride) activations, and
    each output cell depends only on the input pixels within ``radius`` of its centre
    (``stride * cell``); ``late`` maps those activations to the CAM layer's ``features(x)``
    (the encoder's ``head`` gives the embeddings). A change
    confined to a box of the input changes ``early``'s output only within ``radius`` of
    the box, so ``early`` may be run on a window around it (region effects do).
    """

    early: Callable[[torch.Tensor], torch.Tensor]
    late: Callable[[torch.Tensor], torch.Tensor]
    stride: int
    radius: int


class FaceEncoder(nn.Module):
    """Base class: subclasses implement ``features`` and ``head``."""

    spec: EncoderSpec

    def inference_copy(self) -> FaceEncoder:
        """A copy for no-grad forwards only, its weights in channels-last layout (with
        channels-last inputs oneDNN runs the convolutions in its blocked kernels, AMX/AVX-512
        bf16 where the CPU has them). Subclasses also fold what their layout allows (SFace:
        each block's batch norm into its convolution). Frozen: it does not follow later
        changes to this encoder's weights, and its gradients are not this encoder's."""
        import copy

        return copy.deepcopy(self).eval().to(memory_format=torch.channels_last)

    def early_split(self) -> EarlySplit | None:
        """The encoder as ``late(early(x))`` with early's receptive field known, or None
        (the generic encoder does not know its layers)."""
        return None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised input -> (B, C', h, w) CAM-layer feature map."""
        raise NotImplementedError

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C', h, w) -> (B, D) embedding; affine in eval mode."""
        raise NotImplementedError

    def fine_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) input -> (B, C_f, h_f, w_f) activations of ``spec.contrast_layer``
        (the CAM layer's ``features(x)`` when the encoder declares none)."""
        return self.features(x)

    def fine_to_features(self, fine: torch.Tensor) -> torch.Tensor:
        """The network between the contrast layer and the CAM layer (the identity by default)."""
        return fine

    def tail_forward(self, fine: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """``fine_to_features(fine)`` and what ``fine_vjp`` would otherwise run the tail
        forward again to record (batch-first tensors, sliceable per face), or None. The
        generic version records nothing; SFace keeps each block's gain."""
        return self.fine_to_features(fine), None

    def tail_vjp(self, fine: torch.Tensor, directions: torch.Tensor,
                 state: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Vector-Jacobian products of the tail ``head(fine_to_features(fine))``.

        fine (N, C_f, h_f, w_f): contrast-layer activations of N faces; directions
        (M, N, D): M embedding-space directions per face. Returns (M, N, C_f, h_f, w_f),
        ``[m, n] = J_n^T directions[m, n]`` with ``J_n`` the tail's Jacobian at face n.
        This generic version runs autograd (M directions in one batched backward);
        encoders with a known piecewise-linear tail override it with the explicit
        transpose, which needs no autograd graph (SFace).
        """
        return self._vjp(lambda a: self.head(self.fine_to_features(a)), fine, directions)

    def fine_vjp(self, fine: torch.Tensor, grads: torch.Tensor,
                 state: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Vector-Jacobian products of ``fine_to_features`` alone: grads (M, N, C, h, w)
        at the CAM layer (e.g. an affine head's pullback of M directions) -> (M, N, C_f,
        h_f, w_f) at the contrast layer. Generic autograd version, as ``tail_vjp``
        (``state``, from ``tail_forward``, is for encoders that record one)."""
        return self._vjp(self.fine_to_features, fine, grads)

    @staticmethod
    def _vjp(fn, fine: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            a = fine.detach().requires_grad_(True)
            out = fn(a)
            if grads.shape[0] == 1:
                (grad,) = torch.autograd.grad(out, a, grads[0])
                return grad[None]
            (grad,) = torch.autograd.grad(out, a, grads, is_grads_batched=True)
        return grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def preprocess(self, aligned: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) or (H, W, 3) uint8 RGB aligned crops -> (N, C, H, W) float input.

        Grayscale encoders take the ITU-R 601 luma of the RGB crop.
        """
        arr = np.asarray(aligned)
        if arr.ndim == 3:
            arr = arr[None]
        h, w = self.spec.input_size
        if arr.shape[1:3] != (h, w):
            from encoder.errors import WrongImageSize

            raise WrongImageSize(
                f"encoder {self.spec.name} expects {w}x{h} aligned crops, got "
                f"{arr.shape[2]}x{arr.shape[1]}"
            )
        return self.normalise(arr)

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """(N, h, w, 3) uint8 RGB pixels of any size -> (N, C, h, w) float input on the
        encoder's device, pixel by pixel as ``preprocess`` makes it (so a window of the crop
        gives the same values as the same window of the whole input)."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).float().permute(0, 3, 1, 2)
        if self.spec.channels == 1:
            x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - self.spec.mean) / self.spec.std
        device = next(self.parameters()).device
        return x.to(device)
