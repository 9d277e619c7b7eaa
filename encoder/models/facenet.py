"""FaceNet: facenet-pytorch's InceptionResnetV1 (160x160 RGB, 512-d), user-supplied weights.

facenet-pytorch downloads its VGGFace2/CASIA weights at run time, which is not
possible here, so this encoder loads a weights file the user provides (e.g. a
facenet-pytorch state dict). Parameter names are facenet-pytorch's own.

Split: ``features`` = ``block8`` output (B, 1792, 3, 3); ``head`` =
``avgpool -> flatten -> dropout -> last_linear -> last_bn`` (B, 512), affine in eval.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from encoder.errors import CheckpointError
from encoder.registry import register_encoder
from encoder.spec import EncoderSpec, FaceEncoder

FACENET_SPEC = EncoderSpec(
    name="facenet",
    input_size=(160, 160),
    channels=3,
    mean=127.5,
    std=128.0,
    embedding_dim=512,
    feature_shape=(1792, 3, 3),
    cam_layer="block8",
    alignment="facenet160",
)

_BODY = (
    "conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a",
    "conv2d_4b", "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8",
)


def _inception_resnet_v1() -> nn.Module:
    # facenet_pytorch/__init__ imports MTCNN, which needs torchvision's nms.
    from encoder._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    return InceptionResnetV1(pretrained=None, classify=False)


class FaceNet(FaceEncoder):
    """InceptionResnetV1's layers, registered under facenet-pytorch's names."""

    def __init__(self, spec: EncoderSpec = FACENET_SPEC) -> None:
        super().__init__()
        self.spec = spec
        net = _inception_resnet_v1()
        for name in (*_BODY, "avgpool_1a", "dropout", "last_linear", "last_bn"):
            self.add_module(name, getattr(net, name))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 160, 160) normalised RGB -> (B, 1792, 3, 3)."""
        for name in _BODY:
            x = getattr(self, name)(x)
        return x

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, 1792, 3, 3) -> (B, 512)."""
        x = self.dropout(torch.flatten(self.avgpool_1a(feature_map), 1))
        return self.last_bn(self.last_linear(x))


@register_encoder("facenet", FACENET_SPEC, needs_weights=True,
                  description="facenet-pytorch InceptionResnetV1, user-supplied weights")
def build_facenet(weights: Path | None) -> FaceNet:
    from encoder.checkpoints import load_weights

    if weights is None:
        raise CheckpointError(
            "encoder facenet needs a weights file (facenet-pytorch downloads its weights at run "
            "time, which is not possible here): pass e.g. a saved InceptionResnetV1 state dict"
        )
    with torch.device("meta"):
        model = FaceNet()
    load_weights(model, weights)
    return model.eval()
