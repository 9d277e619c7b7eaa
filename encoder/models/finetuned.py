"""Fine-tuned encoders: a frozen pretrained backbone with a trained embedding head.

GestaltMatcher's recipe on a face-recognition backbone: keep the backbone's
feature maps, train ``feature norm -> dropout -> flatten -> FC -> BatchNorm1d``
(plus a linear classifier used only for training). In eval mode the head is
affine, so every explanation method works on it unchanged.

A checkpoint is one ``torch.save`` dict that carries its own config (base
encoder name and weights, head sizes, class names) next to the head's weights;
the backbone's weights are not copied, they come from the base encoder.
``create_encoder("finetuned", weights=path)`` rebuilds it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoder.errors import CheckpointError
from encoder.registry import register_encoder
from encoder.spec import EncoderSpec, FaceEncoder

CHECKPOINT_FORMAT = "phenolens.finetuned-head/1"
FINETUNED_NAME = "finetuned"


@dataclass(frozen=True)
class HeadConfig:
    """Everything needed to rebuild a fine-tuned encoder besides the weights."""

    base_encoder: str
    base_weights: str | None
    feature_shape: tuple[int, int, int]  # (C, h, w) of the base's features()
    embedding_dim: int
    class_names: tuple[str, ...]
    dropout: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_shape"] = list(self.feature_shape)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        try:
            return cls(
                base_encoder=str(d["base_encoder"]),
                base_weights=None if d.get("base_weights") is None else str(d["base_weights"]),
                feature_shape=tuple(int(v) for v in d["feature_shape"]),
                embedding_dim=int(d["embedding_dim"]),
                class_names=tuple(str(c) for c in d["class_names"]),
                dropout=float(d.get("dropout", 0.2)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"fine-tuned checkpoint config is incomplete: {exc}") from None


class EmbeddingHead(nn.Module):
    """(B, C, h, w) -> (B, D): ``norm (fixed) -> dropout -> flatten -> fc -> bn``.

    ``norm`` is a per-channel standardisation with statistics fixed before
    training (it stays in eval mode, so it never changes the head's affinity).
    """

    def __init__(self, feature_shape: tuple[int, int, int], embedding_dim: int,
                 dropout: float = 0.2) -> None:
        super().__init__()
        c, h, w = feature_shape
        self.norm = nn.BatchNorm2d(c, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c * h * w, embedding_dim)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def train(self, mode: bool = True) -> EmbeddingHead:
        super().train(mode)
        self.norm.eval()
        return self

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(torch.flatten(self.dropout(self.norm(feature_map)), 1)))


class FineTunedEncoder(FaceEncoder):
    """The base encoder's ``features`` (frozen) with a trained :class:`EmbeddingHead`.

    ``classifier`` (D -> classes) is kept for training and for class scores;
    matching and explanations use the embedding only.
    """

    def __init__(self, base: FaceEncoder, config: HeadConfig) -> None:
        super().__init__()
        if tuple(base.spec.feature_shape) != tuple(config.feature_shape):
            raise CheckpointError(
                f"head expects features {config.feature_shape}, base {base.spec.name} gives "
                f"{base.spec.feature_shape}"
            )
        self.base = base
        self.base.requires_grad_(False)
        self.config = config
        self.embedding = EmbeddingHead(config.feature_shape, config.embedding_dim, config.dropout)
        self.classifier = nn.Linear(config.embedding_dim, len(config.class_names))
        self.spec = finetuned_spec(base.spec, config.embedding_dim)

    def train(self, mode: bool = True) -> FineTunedEncoder:
        super().train(mode)
        self.base.eval()  # the backbone is frozen, BN statistics included
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised input -> the base's CAM-layer map (B, C', h, w)."""
        return self.base.features(x)

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C', h, w) -> (B, D) embedding; affine in eval mode."""
        return self.embedding(feature_map)

    def class_logits(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C', h, w) -> (B, n_classes)."""
        return self.classifier(self.embedding(feature_map))

    def refresh_version(self) -> str:
        """Set ``spec.version`` to ``<base>+head-<hash of the head weights>`` and return it.

        Galleries record the encoder id (name@version): two different checkpoints
        must never pass for the same encoder.
        """
        digest = hashlib.sha256()
        for key, value in sorted(self.head_state().items()):
            digest.update(key.encode())
            digest.update(value.to(torch.float32).contiguous().numpy().tobytes())
        version = f"{self.config.base_encoder}+head-{digest.hexdigest()[:12]}"
        self.spec = replace(self.spec, version=version)
        return version

    def head_state(self) -> dict[str, torch.Tensor]:
        """The trained weights only (embedding head + classifier), detached copies."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()
                if not k.startswith("base.")}


def finetuned_spec(base: EncoderSpec, embedding_dim: int) -> EncoderSpec:
    return replace(base, name=FINETUNED_NAME, embedding_dim=embedding_dim,
                   version=f"{base.name}+head")


def save_checkpoint(model: FineTunedEncoder, path: str | Path,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write the head's weights with its config (and optional training metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.refresh_version()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_dict(),
        "state_dict": model.head_state(),
        "metadata": metadata or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> tuple[HeadConfig, dict[str, torch.Tensor], dict]:
    """(config, head state dict, metadata) of a fine-tuned checkpoint; CheckpointError if not one."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{Path(path).name} is not a readable torch checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{Path(path).name} is not a {CHECKPOINT_FORMAT} checkpoint")
    return HeadConfig.from_dict(payload["config"]), payload["state_dict"], payload.get("metadata", {})


def load_finetuned(path: str | Path, device: str = "cpu") -> FineTunedEncoder:
    """Rebuild a fine-tuned encoder from its checkpoint (base encoder from the registry)."""
    from encoder.registry import create_encoder

    config, state, _ = read_checkpoint(path)
    base = create_encoder(config.base_encoder, weights=config.base_weights, device="cpu")
    model = FineTunedEncoder(base, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("base.")]
    if missing or unexpected:
        raise CheckpointError(
            f"fine-tuned checkpoint does not match its config: missing {missing}, "
            f"unexpected {list(unexpected)}"
        )
    model.refresh_version()
    return model.to(device).eval()


def _default_spec() -> EncoderSpec:
    # The registry needs a spec before any checkpoint is read: the SFace-based head.
    # A checkpoint's own spec (embedding size, base) is on the built model.
    from encoder.models.sface import SFACE_SPEC

    return finetuned_spec(SFACE_SPEC, SFACE_SPEC.embedding_dim)


@register_encoder(
    FINETUNED_NAME,
    _default_spec(),
    needs_weights=True,
    description="frozen backbone + fine-tuned FC+BN head (phenolens train); weights = checkpoint",
)
def build(weights: Path | None) -> FineTunedEncoder:
    if weights is None:
        raise CheckpointError(
            "the finetuned encoder needs a checkpoint written by `phenolens train` (weights=PATH)"
        )
    return load_finetuned(weights)
