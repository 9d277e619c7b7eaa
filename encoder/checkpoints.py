"""Load weights files of any format GestaltMatcher users hold into our encoder modules.

Accepted, for any architecture in ``encoder.models``:

- state dicts: plain, ``module.``-prefixed (DataParallel) or ``_orig_mod.``
  (torch.compile), possibly wrapped as ``{"model": sd}`` / ``{"state_dict": sd}``;
  with our parameter names (or declared aliases, e.g. arcface_torch's
  ``features.`` for the embedding BatchNorm) or with any other names;
- whole pickled modules (``torch.save(model)``), e.g. GM-Arc's fine-tuned
  onnx2torch modules, whose classes need not be importable here. Unpickling
  runs code from the file, so it happens only for trusted files (see
  :func:`trusted_model_dirs`);
- ONNX files (insightface / arcface_torch exports), with Conv+BN pairs folded
  by the exporter or not, and quantized weights.

Tensors whose names are not ours are mapped by *structural order*: the
file's layers (conv, batch norm, PReLU, linear; in file order, which for
traced or exported models is execution order) are matched one by one against
our module's layers in execution order, checking every shape. A conv with a
bias where our conv has none followed by a BatchNorm is a folded Conv+BN: the
bias moves into that BatchNorm. Trailing extra linear layers (classifiers) are
ignored; anything else that does not line up raises :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from encoder.errors import CheckpointError
from encoder.spec import FaceEncoder

TRUSTED_DIRS_ENV = "PHENOLENS_TRUSTED_MODEL_DIRS"
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "module", "ema")
_PREFIXES = ("module.", "_orig_mod.")


# ---------------------------------------------------------------- trust


def trusted_model_dirs() -> list[Path]:
    """Folders whose pickled modules may be unpickled: ``data/models`` and
    every folder in ``PHENOLENS_TRUSTED_MODEL_DIRS`` (``os.pathsep``-separated)."""
    from encoder.assets import MODELS_DIR

    dirs = [MODELS_DIR]
    dirs += [Path(p) for p in os.environ.get(TRUSTED_DIRS_ENV, "").split(os.pathsep) if p]
    return [d.resolve() for d in dirs]


def is_trusted(path: str | Path) -> bool:
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(d) for d in trusted_model_dirs())


# ---------------------------------------------------------------- file layers


@dataclass(frozen=True)
class SourceLayer:
    """One parametric layer read from a weights file, in file order."""

    kind: str  # "conv" | "bn" | "prelu" | "linear"
    origin: str  # its name in the file, for messages
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    eps: float | None = None
    feeds_bn: bool | None = None  # conv whose output goes to a BatchNorm (known for ONNX only)


def _t(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().float().cpu()
    return torch.from_numpy(np.require(array, np.float32, ["C", "W"]))


def layers_from_state_dict(state: Mapping[str, torch.Tensor]) -> list[SourceLayer]:
    """Group ``module.param`` keys by module (in order) and classify each group by its tensors."""
    groups: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        groups.setdefault(prefix, {})[leaf] = value
    layers = []
    for prefix, tensors in groups.items():
        origin = prefix or "<root>"
        if "running_mean" in tensors and "running_var" in tensors:
            mean = tensors["running_mean"]
            layers.append(SourceLayer(
                "bn", origin,
                weight=_t(tensors.get("weight", torch.ones_like(mean))),
                bias=_t(tensors.get("bias", torch.zeros_like(mean))),
                running_mean=_t(mean), running_var=_t(tensors["running_var"]),
            ))
        elif "weight" in tensors and tensors["weight"].dim() in (3, 4, 5):
            bias = tensors.get("bias")
            layers.append(SourceLayer("conv", origin, _t(tensors["weight"]),
                                      None if bias is None else _t(bias)))
        elif "weight" in tensors and tensors["weight"].dim() == 2:
            bias = tensors.get("bias")
            layers.append(SourceLayer("linear", origin, _t(tensors["weight"]),
                                      None if bias is None else _t(bias)))
        elif len(tensors) == 1:
            (value,) = tensors.values()
            layers.append(SourceLayer("prelu", origin, _t(value).reshape(-1)))
        else:
            raise CheckpointError(
                f"cannot tell what layer {origin!r} is from its tensors "
                f"{ {k: tuple(v.shape) for k, v in tensors.items()} }"
            )
    return layers


def layers_from_onnx(path: str | Path, spec_mean: float | None = None,
                     spec_std: float | None = None) -> list[SourceLayer]:
    """The parametric layers of an ONNX graph in node order (Conv, BN, PRelu, Gemm/MatMul+Add)."""
    from encoder.models._onnx import read_onnx

    graph = read_onnx(path)
    data_inputs = set(graph.inputs)
    layers: list[SourceLayer] = []
    matmul_output: str | None = None
    for index, node in enumerate(graph.nodes):
        if node.op in ("Sub", "Mul", "Div", "Add") and data_inputs & set(node.inputs):
            raise CheckpointError(
                f"{Path(path).name} normalises its input inside the graph ({node.op}); "
                f"only graphs that take the spec-normalised input are supported"
            )
        if node.op == "Conv":
            bias = graph.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
            consumer = graph.next_node(index)
            layers.append(SourceLayer("conv", node.outputs[0], _t(graph.const(node.inputs[1])),
                                      None if bias is None else _t(bias),
                                      feeds_bn=consumer is not None and consumer.op == "BatchNormalization"))
        elif node.op == "BatchNormalization":
            gamma, beta, mean, var = (_t(graph.const(n)) for n in node.inputs[1:5])
            layers.append(SourceLayer("bn", node.outputs[0], gamma, beta, mean, var,
                                      eps=float(node.attrs.get("epsilon", 1e-5))))
        elif node.op == "PRelu":
            layers.append(SourceLayer("prelu", node.outputs[0],
                                      _t(graph.const(node.inputs[1])).reshape(-1)))
        elif node.op == "Gemm":
            weight = _t(graph.const(node.inputs[1])) * float(node.attrs.get("alpha", 1.0))
            if not node.attrs.get("transB", 0):
                weight = weight.t().contiguous()
            bias = None
            if len(node.inputs) > 2 and node.inputs[2]:
                bias = _t(graph.const(node.inputs[2])) * float(node.attrs.get("beta", 1.0))
            layers.append(SourceLayer("linear", node.outputs[0], weight, bias))
        elif node.op == "MatMul" and graph.has_const(node.inputs[1]):
            layers.append(SourceLayer("linear", node.outputs[0],
                                      _t(graph.const(node.inputs[1])).t().contiguous()))
            matmul_output = node.outputs[0]
        elif node.op == "Add" and matmul_output in node.inputs:
            other = [n for n in node.inputs if n != matmul_output][0]
            if graph.has_const(other):
                last = layers[-1]
                layers[-1] = SourceLayer("linear", last.origin, last.weight, _t(graph.const(other)))
            matmul_output = None
    if not layers:
        raise CheckpointError(f"{Path(path).name} has no convolution or linear weights")
    return layers


# ---------------------------------------------------------------- our layers


_PARAM_TYPES = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU, nn.Linear)


def execution_order(model: FaceEncoder) -> list[tuple[str, nn.Module]]:
    """Our parametric leaf modules in the order one forward pass runs them."""
    names = {m: n for n, m in model.named_modules()}
    order: list[tuple[str, nn.Module]] = []
    hooks = []
    for module in names:
        has_params = any(True for _ in module.parameters(recurse=False))
        if isinstance(module, _PARAM_TYPES):
            hooks.append(module.register_forward_hook(
                lambda m, _i, _o: order.append((names[m], m))))
        elif has_params:
            raise CheckpointError(f"no structural loader for layer type {type(module).__name__}")
    was_training = model.training
    try:
        model.eval()
        c, (h, w) = model.spec.channels, model.spec.input_size
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, c, h, w, dtype=param.dtype, device=param.device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return order


def _describe(layer: SourceLayer) -> str:
    return f"{layer.kind} {layer.origin!r} {tuple(layer.weight.shape)}"


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return "bn"
    return "prelu" if isinstance(module, nn.PReLU) else "linear"


def _conv_feeds_file_bn(conv: SourceLayer, rest: list[SourceLayer],
                        targets_after_bn: list[tuple[str, nn.Module]]) -> bool:
    """Does the file's next BatchNorm belong to this biased conv (else: Conv+BN were folded)?

    ONNX files say so by their edges; for state dicts, the next file layer
    after that BatchNorm must be the kind of our layer after our BatchNorm.
    """
    if conv.feeds_bn is not None:
        return conv.feeds_bn
    if not rest or rest[0].kind != "bn":
        return False
    if not targets_after_bn:
        return len(rest) == 1 or rest[1].kind == "linear"
    return len(rest) > 1 and rest[1].kind == _kind(targets_after_bn[0][1])


def map_layers(model: FaceEncoder, layers: list[SourceLayer], source: str) -> dict[str, torch.Tensor]:
    """Assign file layers to our layers by structural order -> our state dict."""
    targets = execution_order(model)
    out: dict[str, torch.Tensor] = {}
    i = t = 0

    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"{source} does not fit {model.spec.name}: {why}")

    def take(kind: str, name: str) -> SourceLayer:
        nonlocal i
        if i >= len(layers):
            return_msg = f"the file ran out of layers at our {name} ({len(layers)} layers in file)"
            raise fail(return_msg)
        layer = layers[i]
        if layer.kind != kind:
            raise fail(f"our {name} is a {kind} but the file's layer {i} is {_describe(layer)}")
        i += 1
        return layer

    def set_bn(name: str, module: nn.Module, layer: SourceLayer) -> None:
        if layer.weight.numel() != module.num_features:
            raise fail(f"our {name} has {module.num_features} channels, file {_describe(layer)}")
        out[f"{name}.weight"], out[f"{name}.bias"] = layer.weight, layer.bias
        out[f"{name}.running_mean"], out[f"{name}.running_var"] = layer.running_mean, layer.running_var
        if layer.eps is not None:
            module.eps = layer.eps

    while t < len(targets):
        name, module = targets[t]
        if isinstance(module, nn.Conv2d):
            layer = take("conv", name)
            if tuple(layer.weight.shape) != tuple(module.weight.shape):
                raise fail(f"our {name} weight is {tuple(module.weight.shape)}, file {_describe(layer)}")
            out[f"{name}.weight"] = layer.weight
            folded = layer.bias is not None and module.bias is None
            if module.bias is not None:
                out[f"{name}.bias"] = layer.bias if layer.bias is not None else torch.zeros(module.out_channels)
            if folded:
                nxt = targets[t + 1][1] if t + 1 < len(targets) else None
                if not isinstance(nxt, nn.BatchNorm2d):
                    raise fail(f"file conv {layer.origin!r} has a bias and our {name} neither has one "
                               f"nor is followed by a BatchNorm")
                bn_name = targets[t + 1][0]
                if _conv_feeds_file_bn(layer, layers[i:], targets[t + 2:]):
                    bn = take("bn", bn_name)
                    bn = SourceLayer("bn", bn.origin, bn.weight, bn.bias,
                                     bn.running_mean - layer.bias, bn.running_var, bn.eps)
                else:  # Conv+BN folded by the exporter: an identity BN that adds the bias
                    ones = torch.ones_like(layer.bias)
                    bn = SourceLayer("bn", layer.origin, ones, layer.bias,
                                     torch.zeros_like(layer.bias), ones - nxt.eps)
                set_bn(bn_name, nxt, bn)
                t += 2
                continue
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            set_bn(name, module, take("bn", name))
        elif isinstance(module, nn.PReLU):
            layer = take("prelu", name)
            if layer.weight.numel() != module.weight.numel():
                raise fail(f"our {name} has {module.weight.numel()} slopes, file {_describe(layer)}")
            out[f"{name}.weight"] = layer.weight.reshape(module.weight.shape)
        elif isinstance(module, nn.Linear):
            layer = take("linear", name)
            if tuple(layer.weight.shape) != tuple(module.weight.shape):
                raise fail(f"our {name} weight is {tuple(module.weight.shape)}, file {_describe(layer)}")
            out[f"{name}.weight"] = layer.weight
            if module.bias is not None:
                out[f"{name}.bias"] = layer.bias if layer.bias is not None else torch.zeros(module.out_features)
        t += 1
    unassigned = [n for n, _ in model.named_parameters() if n not in out]
    if unassigned:
        raise fail(f"our layers {unassigned[:4]} do not run in forward and got no weights")
    extra = layers[i:]
    if any(layer.kind != "linear" for layer in extra):
        raise fail(f"the file has {len(extra)} more layers after ours, starting with "
                   f"{_describe(extra[0])} (a deeper architecture?)")
    return out


# ---------------------------------------------------------------- reading files


class _Stub(nn.Module):
    """Stands in for a class the pickle names but this process cannot (or may not) import."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise CheckpointError("a module unpickled without its class cannot run")


_stubs: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _stubs:
        _stubs[key] = type(name, (_Stub,), {"__module__": module, "__qualname__": name})
    return _stubs[key]


def _graph_module_from_body(body: dict[str, Any], *_args: Any) -> nn.Module:
    """torch.fx GraphModules pickle their generated code; keep only their tensors and children."""
    module = _stub_class("torch.fx.graph_module", "GraphModule")()
    for key in ("_parameters", "_buffers", "_modules"):
        if key in body:
            module.__dict__[key] = body[key]
    return module


_IMPORTABLE_ROOTS = {
    "torch", "collections", "numpy", "builtins", "__builtin__", "copyreg", "copy_reg", "_codecs",
    "argparse",
}


class _HarvestUnpickler(pickle.Unpickler):
    """Imports torch/numpy/stdlib classes; stubs every other class (GM-Arc's, onnx2torch's)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.fx.graph_module" and name.startswith("reduce_"):
            return _graph_module_from_body
        if module.split(".")[0] in _IMPORTABLE_ROOTS:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass
        return _stub_class(module, name)


class _HarvestPickle:
    """The ``pickle_module`` torch.load uses for trusted whole-module files."""

    Unpickler = _HarvestUnpickler

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _HarvestUnpickler(file, **kwargs).load()


def _is_onnx(path: Path) -> bool:
    if path.suffix.lower() == ".onnx":
        return True
    head = path.read_bytes()[:16] if path.stat().st_size else b""
    return head[:1] == b"\x08" and not zipfile.is_zipfile(path)


def read_checkpoint(path: str | Path, *, trusted: bool | None = None) -> Any:
    """torch.load ``path``: tensors only, or (trusted files only) a whole pickled module.

    ``trusted=None`` means :func:`is_trusted`. Raises CheckpointError for files
    that are not torch checkpoints and for untrusted pickled modules.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"weights file {path.name} is empty")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise CheckpointError(
            f"{path.name} is not a torch checkpoint (neither torch's zip format nor a pickle)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"{path.name} is not a torch checkpoint: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"{path.name} is not a torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not (is_trusted(path) if trusted is None else trusted):
        dirs = ", ".join(str(d) for d in trusted_model_dirs())
        raise CheckpointError(
            f"{path.name} is a whole pickled module; unpickling it runs code from the file, so "
            f"it is only loaded from a trusted folder ({dirs}; add folders with "
            f"{TRUSTED_DIRS_ENV})"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_HarvestPickle)
    except Exception as exc:
        raise CheckpointError(f"cannot unpickle {path.name}: {type(exc).__name__}: {exc}") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def state_dict_of(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """A module, a state dict or a wrapper dict -> a flat state dict without DataParallel prefixes."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in _WRAPPER_KEYS:
            if key in obj:
                return state_dict_of(obj[key], source)
        raise CheckpointError(
            f"{source} holds a dict without tensors or a known wrapper key "
            f"({', '.join(_WRAPPER_KEYS)}); its keys: {sorted(map(str, obj))[:8]}"
        )
    if not _is_state_dict(obj):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not weights")
    state = dict(obj)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _apply_aliases(state: dict[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        for old, new in aliases.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


def _load_named(model: FaceEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    ours = model.state_dict()
    wanted = {k for k in ours if not k.endswith("num_batches_tracked")}
    missing = sorted(wanted - set(state))
    unexpected = sorted(k for k in set(state) - set(ours) if not k.endswith("num_batches_tracked"))
    unexpected = [k for k in unexpected if not k.startswith(("classifier.", "head.", "logits."))]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs ours {tuple(ours[k].shape)}"
             for k in sorted(wanted & set(state)) if state[k].shape != ours[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''} ({len(missing)})")
    if wrong:
        problems.append(f"wrong shapes {wrong[:4]}{' ...' if len(wrong) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:6]} ({len(unexpected)})")
    if problems:
        raise CheckpointError(f"{source} does not fit {model.spec.name}: " + "; ".join(problems))
    _assign(model, state)


def _assign(model: FaceEncoder, state: Mapping[str, torch.Tensor]) -> None:
    """Put ``state`` into ``model`` (which may live on the meta device: nothing is copied twice)."""
    merged = {}
    for key, current in model.state_dict().items():
        if key in state:
            merged[key] = state[key].to(current.dtype)
        elif key.endswith("num_batches_tracked"):
            merged[key] = torch.zeros((), dtype=torch.long)
        else:
            raise CheckpointError(f"no weights for {key} of {model.spec.name}")
    model.load_state_dict(merged, strict=True, assign=True)


def load_weights(
    model: FaceEncoder,
    path: str | Path,
    *,
    aliases: Mapping[str, str] | None = None,
    trusted: bool | None = None,
) -> FaceEncoder:
    """Load ``path`` (ONNX, state dict in any wrapper, or a trusted pickled module) into ``model``.

    ``model`` may be built on the meta device (``with torch.device("meta")``):
    its tensors are then assigned, not copied.

    Names that are ours (after ``aliases``, e.g. ``{"features.": "embedding_bn."}``)
    load by name with a precise report of missing keys and wrong shapes;
    otherwise tensors are mapped by structural order (module docstring).
    """
    path = Path(path)
    source = path.name
    if path.is_file() and _is_onnx(path):
        _assign(model, map_layers(model, layers_from_onnx(path), source))
        return model
    state = state_dict_of(read_checkpoint(path, trusted=trusted), source)
    state = _apply_aliases(state, aliases or {})
    ours = set(model.state_dict())
    overlap = len(ours & set(state)) / max(1, len(ours))
    if overlap >= 0.5:
        _load_named(model, state, source)
    else:
        _assign(model, map_layers(model, layers_from_state_dict(state), source))
    return model
