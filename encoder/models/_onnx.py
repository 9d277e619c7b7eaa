"""Read an ONNX file into constants and compute nodes, with weights dequantized.

Weight-only subgraphs (``Constant``, ``DequantizeLinear`` including int8 block
quantization, ``Reshape``, ``Identity``, ``Cast``) are evaluated with numpy, so
what is left in ``OnnxGraph.nodes`` is the network itself: convolutions,
batch norms, activations and the head. Converters walk those nodes to build
plain torch modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoder.errors import CheckpointError

_FOLDABLE = {"Constant", "DequantizeLinear", "Reshape", "Identity", "Cast", "Transpose"}


@dataclass
class OnnxNode:
    """One compute node: op type, input/output names and attributes."""

    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]


@dataclass
class OnnxGraph:
    """The compute nodes of an ONNX graph (topological order) and its constant tensors."""

    nodes: list[OnnxNode]
    constants: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    consumers: dict[str, list[int]] = field(default_factory=dict)

    def const(self, name: str) -> np.ndarray:
        try:
            return self.constants[name]
        except KeyError:
            raise CheckpointError(f"ONNX tensor {name!r} is not a constant weight") from None

    def has_const(self, name: str) -> bool:
        return name in self.constants

    def next_node(self, index: int) -> OnnxNode | None:
        """The only consumer of node ``index``'s first output, or None."""
        users = self.consumers.get(self.nodes[index].outputs[0], [])
        return self.nodes[users[0]] if len(users) == 1 else None


def dequantize_linear(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    axis: int = 1,
    block_size: int = 0,
) -> np.ndarray:
    """ONNX ``DequantizeLinear`` (opset 10-21): per-tensor, per-axis or blocked along ``axis``.

    Blocked: ``scale`` has ``ceil(x.shape[axis] / block_size)`` entries along ``axis``
    and each covers ``block_size`` consecutive elements of ``x``.
    """
    xf = x.astype(np.float64)
    zp = np.zeros_like(scale, dtype=np.float64) if zero_point is None else zero_point.astype(np.float64)
    scale = scale.astype(np.float64)
    if scale.ndim == 0 or scale.size == 1 and block_size == 0:
        y = (xf - zp.reshape(())) * scale.reshape(())
    elif block_size == 0:
        axis = axis % x.ndim
        shape = [1] * x.ndim
        shape[axis] = -1
        y = (xf - zp.reshape(shape)) * scale.reshape(shape)
    else:
        axis = axis % x.ndim
        n = x.shape[axis]
        if scale.ndim != x.ndim or scale.shape[axis] != -(-n // block_size):
            raise CheckpointError(
                f"block-quantized tensor {x.shape} with block_size {block_size} on axis "
                f"{axis} needs {-(-n // block_size)} scales there, got {scale.shape}"
            )
        full_scale = np.repeat(scale, block_size, axis=axis).take(range(n), axis=axis)
        full_zp = np.repeat(zp, block_size, axis=axis).take(range(n), axis=axis)
        y = (xf - full_zp) * full_scale
    return y.astype(np.float32)


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _fold(op: str, args: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray:
    from onnx import numpy_helper

    if op == "Constant":
        if "value" not in attrs:
            raise CheckpointError(f"unsupported ONNX Constant attributes {sorted(attrs)}")
        return numpy_helper.to_array(attrs["value"])
    if op == "DequantizeLinear":
        zero_point = args[2] if len(args) > 2 else None
        return dequantize_linear(
            args[0], args[1], zero_point, attrs.get("axis", 1), attrs.get("block_size", 0)
        )
    if op == "Reshape":
        data, shape = args[0], [int(s) for s in args[1]]
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return data.reshape(shape)
    if op == "Identity":
        return args[0]
    if op == "Cast":
        from onnx import helper

        return args[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Transpose":
        return np.transpose(args[0], attrs.get("perm"))
    raise AssertionError(op)


def read_onnx(path: str | Path) -> OnnxGraph:
    """Load ``path`` and fold its weight subgraphs; raises CheckpointError if it is not ONNX."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise CheckpointError(f"{Path(path).name} is not a readable ONNX model: {exc}") from exc
    graph = model.graph
    if not graph.node:
        raise CheckpointError(f"{Path(path).name} holds no ONNX graph")
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    nodes: list[OnnxNode] = []
    for proto in graph.node:
        attrs = _attrs(proto)
        inputs = list(proto.input)
        if proto.op_type in _FOLDABLE and all(not i or i in constants for i in inputs):
            args = [constants[i] if i else None for i in inputs]
            constants[proto.output[0]] = _fold(proto.op_type, args, attrs)
            continue
        nodes.append(OnnxNode(proto.op_type, inputs, list(proto.output), attrs))
    used = {i for n in nodes for i in n.inputs}
    data_inputs = [i.name for i in graph.input if i.name not in constants and i.name in used]
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.inputs:
            consumers.setdefault(name, []).append(index)
    return OnnxGraph(
        nodes=nodes,
        constants=constants,
        inputs=data_inputs,
        outputs=[o.name for o in graph.output],
        consumers=consumers,
    )
