"""Where torch runs: the device and the CPU thread count, from configuration.

Environment overrides: ``PHENOLENS_DEVICE`` (cpu, cuda, cuda:N, mps) and
``PHENOLENS_TORCH_THREADS`` (a positive integer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEVICE_ENV = "PHENOLENS_DEVICE"
THREADS_ENV = "PHENOLENS_TORCH_THREADS"


class DeviceUnavailable(ValueError):
    """A device that is malformed or not present on this machine."""


@dataclass(frozen=True)
class TorchRuntime:
    device: torch.device
    threads: int


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """Validate ``device`` ("cpu", "cuda", "cuda:1", "mps") against this machine."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailable(f"not a torch device: {device!r} (use cpu, cuda, cuda:N or mps)") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {device!r} requested but CUDA is not available in this torch build "
                f"({torch.__version__}); use device 'cpu'"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return resolved
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailable(f"device {device!r} requested but MPS is not available here")
        return resolved
    raise DeviceUnavailable(f"unsupported device type {resolved.type!r} (use cpu, cuda or mps)")


def configure_torch(device: str = "cpu", threads: int | None = None) -> TorchRuntime:
    """Apply the device choice and intra-op thread count; environment variables win.

    ``threads=None`` keeps torch's default. Returns what is in effect.
    """
    device = os.environ.get(DEVICE_ENV, device)
    env_threads = os.environ.get(THREADS_ENV)
    if env_threads is not None:
        try:
            threads = int(env_threads)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {env_threads!r}") from None
    if threads is not None:
        if threads < 1:
            raise ValueError(f"torch thread count must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return TorchRuntime(device=resolve_device(device), threads=torch.get_num_threads())
