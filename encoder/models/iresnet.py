"""insightface iResNet-50 / iResNet-100 (arcface_torch), as used by GestaltMatcher-Arc.

Same layers and state-dict names as arcface_torch's ``iresnet.py`` except one:
arcface_torch calls the final BatchNorm1d ``features``, which here would shadow
``FaceEncoder.features()``; it is ``embedding_bn`` and the loaders rename it.

Split: ``features`` = ``layer4`` output (B, 512, 7, 7); ``head`` =
``bn2 -> flatten -> dropout -> fc -> embedding_bn`` (B, 512), affine in eval mode.
Weights (never bundled: GM-Arc releases them only to approved users) come from
insightface ONNX files, GM-Arc pickled modules or state dicts; see
``encoder.checkpoints``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from encoder.errors import CheckpointError
from encoder.registry import register_encoder
from encoder.spec import EncoderSpec, FaceEncoder

ARCFACE_NAME_ALIASES = {"features.": "embedding_bn."}


def _spec(name: str) -> EncoderSpec:
    return EncoderSpec(
        name=name,
        input_size=(112, 112),
        channels=3,
        mean=127.5,
        std=127.5,
        embedding_dim=512,
        feature_shape=(512, 7, 7),
        cam_layer="layer4",
        alignment="arcface112",
    )


IRESNET50_SPEC = _spec("iresnet50")
IRESNET100_SPEC = _spec("iresnet100")
LAYERS = {"iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class IResNet(FaceEncoder):
    def __init__(
        self,
        layers: tuple[int, int, int, int],
        spec: EncoderSpec,
        dropout: float = 0.0,
        num_features: int = 512,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.embedding_bn = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.embedding_bn.weight, 1.0)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, 1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-05),
        )
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) normalised RGB -> (B, 512, 7, 7) ``layer4`` output."""
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, 512, 7, 7) -> (B, 512)."""
        x = self.dropout(torch.flatten(self.bn2(feature_map), 1))
        return self.embedding_bn(self.fc(x))


def iresnet(name: str) -> IResNet:
    """A randomly initialised iresnet50/iresnet100 (the architecture alone)."""
    spec = {"iresnet50": IRESNET50_SPEC, "iresnet100": IRESNET100_SPEC}[name]
    return IResNet(LAYERS[name], spec)


def _build(name: str, weights: Path | None) -> IResNet:
    from encoder.checkpoints import load_weights

    if weights is None:
        raise CheckpointError(
            f"encoder {name} has no bundled weights (GM-Arc releases them only to approved "
            f"users): pass a weights file (insightface .onnx, GM-Arc .pth or a state dict)"
        )
    with torch.device("meta"):
        model = iresnet(name)
    load_weights(model, weights, aliases=ARCFACE_NAME_ALIASES)
    return model.eval()


@register_encoder("iresnet50", IRESNET50_SPEC, needs_weights=True,
                  description="insightface iResNet-50 (GM-Arc), user-supplied weights")
def build_iresnet50(weights: Path | None) -> IResNet:
    return _build("iresnet50", weights)


@register_encoder("iresnet100", IRESNET100_SPEC, needs_weights=True,
                  description="insightface iResNet-100 (GM-Arc), user-supplied weights")
def build_iresnet100(weights: Path | None) -> IResNet:
    return _build("iresnet100", weights)
