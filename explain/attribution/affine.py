"""The encoder head as one matrix: ``e = W vec(F) + b`` (DESIGN.md §5).

For the usual heads (pooling or flatten -> linear -> BatchNorm, in eval mode)
``head`` is affine, so its Jacobian ``W`` is the same for every face. It is
computed once per model, device and weight version from ``head`` itself (one
batched backward at ``F = 0``), checked for affinity on random feature maps,
and cached; the cache holds only immutable tensors.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from encoder.spec import FaceEncoder
from explain.errors import NonAffineHead


@dataclass(frozen=True)
class AffineHead:
    """``head(F) = einsum('dcp,bcp->bd', weight, F.flatten(2)) + bias``.

    weight (D, C, P) with P = h*w, bias (D,), mean_weight (D, C) = weight averaged
    over positions (what Grad-CAM's channel weights are made of).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean_weight: torch.Tensor
    weight_by_position: torch.Tensor  # (P, D, C), for per-position products
    grid: tuple[int, int]  # (h, w) of the feature map

    @property
    def embedding_dim(self) -> int:
        return int(self.weight.shape[0])

    def contributions(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, P, D): position p adds ``m_p = W_p F_p`` to the embedding."""
        per_position = feature_maps.flatten(2).permute(2, 1, 0)  # (P, C, B)
        return torch.bmm(self.weight_by_position, per_position).permute(2, 0, 1)

    def pullback(self, directions: torch.Tensor) -> torch.Tensor:
        """(K, D) -> (K, C, P): ``W^T u``, the gradient of ``<e, u>`` with respect to F.

        One GEMM on the weight as stored (D, C·P): 1.4 ms for K + 1 = 11 directions on one
        thread, against 2.2 ms as ``linear`` on a column-major copy."""
        d, c, p = self.weight.shape
        return (directions @ self.weight.reshape(d, c * p)).reshape(-1, c, p)


_CACHE: weakref.WeakKeyDictionary[FaceEncoder, dict[tuple, AffineHead]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_TENSORS: weakref.WeakKeyDictionary[FaceEncoder, tuple[int, tuple[torch.Tensor, ...]]] = \
    weakref.WeakKeyDictionary()
_registrations = 0  # bumped whenever any module anywhere registers a parameter, buffer or child


def _registered(*_args) -> None:
    global _registrations
    _registrations += 1


for _hook in (nn.modules.module.register_module_parameter_registration_hook,
              nn.modules.module.register_module_buffer_registration_hook,
              nn.modules.module.register_module_module_registration_hook):
    _hook(_registered)


def _weights_version(encoder: FaceEncoder) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place.

    The encoder's tensors are listed once (walking its modules costs ~0.2 ms a call) and
    listed again after any module registers a parameter, buffer or submodule (torch's
    registration hooks; assigning ``module.weight = ...`` goes through them); in-place
    changes and ``.data`` swaps show in each tensor's ``_version`` and ``data_ptr``."""
    seen = _TENSORS.get(encoder)
    if seen is None or seen[0] != _registrations:
        generation = _registrations
        seen = (generation, (*encoder.parameters(), *encoder.buffers()))
        _TENSORS[encoder] = seen
    return tuple((t.data_ptr(), t._version) for t in seen[1])


def affine_head(encoder: FaceEncoder, device: torch.device | str | None = None) -> AffineHead:
    """The cached :class:`AffineHead` of ``encoder`` (thread-safe).

    Raises NonAffineHead when the encoder is in training mode or its head is
    not affine on random feature maps.
    """
    if encoder.training:
        raise NonAffineHead(f"encoder {encoder.spec.name} is in training mode; call .eval()")
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    key = (str(device), _weights_version(encoder))
    with _LOCK:
        per_model = _CACHE.setdefault(encoder, {})
        cached = per_model.get(key)
        if cached is None:
            per_model.clear()  # weights changed: older versions are stale
            cached = _linearise(encoder, device)
            per_model[key] = cached
    return cached


def _linearise(encoder: FaceEncoder, device: torch.device) -> AffineHead:
    c, h, w = encoder.spec.feature_shape
    zero = torch.zeros(1, c, h, w, device=device, requires_grad=True)
    with torch.enable_grad():
        bias_row = encoder.head(zero)  # (1, D)
        d = bias_row.shape[1]
        eye = torch.eye(d, device=device).unsqueeze(1)  # (D, 1, D)
        try:
            (jac,) = torch.autograd.grad(bias_row, zero, eye, is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: one row at a time
            rows = [torch.autograd.grad(bias_row, zero, eye[i], retain_graph=True)[0]
                    for i in range(d)]
            jac = torch.stack(rows)
    weight = jac.reshape(d, c, h * w).detach().contiguous()
    bias = bias_row.detach().reshape(d)
    head = AffineHead(
        weight, bias, weight.mean(dim=2), weight.permute(2, 0, 1).contiguous(), (h, w))
    _check_affine(encoder, head, device)
    return head


def _check_affine(encoder: FaceEncoder, head: AffineHead, device: torch.device) -> None:
    c, h, w = encoder.spec.feature_shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(2, c, h, w, generator=gen).abs().to(device)
    with torch.no_grad():
        exact = encoder.head(probe)
        linear = head.contributions(probe).sum(dim=1) + head.bias
    scale = exact.abs().max().clamp_min(1.0)
    if not torch.allclose(exact, linear, atol=1e-3 * float(scale), rtol=1e-3):
        err = float((exact - linear).abs().max())
        raise NonAffineHead(
            f"encoder {encoder.spec.name}: head is not affine (max deviation {err:.3g})"
        )
