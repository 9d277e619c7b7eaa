"""Encoders by name, in the manner of timm's model registry.

Each model module registers a builder with :func:`register_encoder`; the
builder takes an optional weights path and returns a :class:`FaceEncoder`.
:func:`create_encoder` returns a fresh module (eval mode, parameters frozen:
explanations need gradients with respect to inputs and feature maps only, and
parameter-randomisation tests need modules they may modify).
:func:`shared_encoder` returns one process-wide instance per
(name, weights, device) for serving, built once under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from encoder.errors import UnknownEncoder
from encoder.named import Registry
from encoder.spec import EncoderSpec, FaceEncoder

DEFAULT_ENCODER = "sface"

Builder = Callable[[Path | None], FaceEncoder]


@dataclass(frozen=True)
class EncoderEntry:
    """A registered encoder: its static spec, its builder, whether it needs a weights file."""

    name: str
    spec: EncoderSpec
    build: Builder
    needs_weights: bool
    description: str


_REGISTRY: Registry[EncoderEntry] = Registry(
    "encoder",
    (
        "encoder.models.sface",
        "encoder.models.iresnet",
        "encoder.models.facenet",
        "encoder.models.gm_casia",
        "encoder.models.finetuned",
    ),
    UnknownEncoder,
)


def register_encoder(
    name: str, spec: EncoderSpec, *, needs_weights: bool = False, description: str = ""
) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_encoder("sface", SFACE_SPEC)`` over ``def build(weights) -> FaceEncoder``."""

    def decorate(build: Builder) -> Builder:
        _REGISTRY.add(name, EncoderEntry(name, spec, build, needs_weights, description))
        return build

    return decorate


def list_encoders() -> list[str]:
    """Names of every registered encoder, sorted."""
    return _REGISTRY.names()


def encoder_spec(name: str) -> EncoderSpec:
    """The static spec of ``name`` without building the model."""
    return _REGISTRY.get(name).spec


def encoder_entry(name: str) -> EncoderEntry:
    return _REGISTRY.get(name)


def create_encoder(
    name: str = DEFAULT_ENCODER, weights: str | Path | None = None, device: str = "cpu"
) -> FaceEncoder:
    """A fresh encoder module in eval mode with frozen parameters, on ``device``.

    ``weights`` is a file in any format the encoder's loaders accept; encoders
    without bundled weights raise CheckpointError when it is missing.
    """
    from encoder.runtime import resolve_device

    entry = _REGISTRY.get(name)
    model = entry.build(Path(weights) if weights is not None else None)
    model.requires_grad_(False)
    return model.to(resolve_device(device)).eval()


_shared: dict[tuple[str, str | None, str], FaceEncoder] = {}
_shared_lock = threading.Lock()


def shared_encoder(
    name: str = DEFAULT_ENCODER, weights: str | Path | None = None, device: str = "cpu"
) -> FaceEncoder:
    """The process-wide instance for (name, weights, device); built once, thread-safe.

    Callers must not modify it (use :func:`create_encoder` for a private copy).
    """
    key = (name, str(Path(weights).resolve()) if weights is not None else None, device)
    with _shared_lock:
        model = _shared.get(key)
        if model is None:
            model = create_encoder(name, weights=weights, device=device)
            _shared[key] = model
        return model
