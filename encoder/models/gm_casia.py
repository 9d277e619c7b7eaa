"""GestaltMatcher v1 (Hsieh et al. 2022): the CASIA-WebFace CNN of Yi et al. (2014).

Ten 3x3 convolutions with BatchNorm and ReLU (the last one plain), four
ceil-mode max pools, then a 7x7 average pool to a 320-d representation; input
100x100 grayscale in 0..1 (``ToTensor``). Layer indices and names follow GM's
``FaceRecogNet.base`` so its state dicts (``base.N.conv.weight`` ...; the
``classifier.`` layers are ignored) load by name.

Split: ``features`` = last conv output (B, 320, 7, 7); ``head`` = average
pool -> flatten (B, 320), linear without bias.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from encoder.errors import CheckpointError
from encoder.registry import register_encoder
from encoder.spec import EncoderSpec, FaceEncoder

GM_CASIA_SPEC = EncoderSpec(
    name="gm_casia",
    input_size=(100, 100),
    channels=1,
    mean=0.0,
    std=255.0,
    embedding_dim=320,
    feature_shape=(320, 7, 7),
    cam_layer="base.13",
    alignment="gm100gray",
)

# (in, out) of each conv-BN-ReLU block; "pool" marks the ceil-mode max pools.
_PLAN = ((1, 32), (32, 64), "pool", (64, 64), (64, 128), "pool", (128, 96), (96, 192), "pool",
         (192, 128), (128, 256), "pool", (256, 160))


class ConvNormAct(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class GMCasia(FaceEncoder):
    def __init__(self, spec: EncoderSpec = GM_CASIA_SPEC) -> None:
        super().__init__()
        self.spec = spec
        self.base = nn.ModuleList(
            nn.MaxPool2d(2, stride=2, ceil_mode=True) if step == "pool" else ConvNormAct(*step)
            for step in _PLAN
        )
        self.base.append(nn.Conv2d(160, 320, 3, stride=1, padding=1))
        self.avg_pool = nn.AvgPool2d(kernel_size=7, stride=1, padding=0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 100, 100) gray in 0..1 -> (B, 320, 7, 7)."""
        for module in self.base:
            x = module(x)
        return x

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, 320, 7, 7) -> (B, 320): the 7x7 average."""
        return torch.flatten(self.avg_pool(feature_map), 1)


@register_encoder("gm_casia", GM_CASIA_SPEC, needs_weights=True,
                  description="GestaltMatcher v1 CASIA-style CNN, 100x100 gray, user-supplied weights")
def build_gm_casia(weights: Path | None) -> GMCasia:
    from encoder.checkpoints import load_weights

    if weights is None:
        raise CheckpointError(
            "encoder gm_casia needs a weights file (a GestaltMatcher v1 FaceRecogNet or "
            "DeepGestalt state dict)"
        )
    with torch.device("meta"):
        model = GMCasia()
    load_weights(model, weights)
    return model.eval()
