"""Registry, the features/head split, the affine head, and the checkpoint loaders.

The loaders are proved with checkpoints we create in each format GM users
hold, from our own randomly initialised iResNet-50: state dicts (plain with
arcface_torch names, DataParallel, wrapped), an insightface-style ONNX export,
a GM-Arc-style whole pickled onnx2torch module whose classes are not
importable at load time, and a copy with unrelated parameter names.
"""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from encoder.checkpoints import TRUSTED_DIRS_ENV, load_weights
from encoder.errors import CheckpointError, UnknownEncoder
from encoder.models.facenet import FaceNet
from encoder.models.gm_casia import GMCasia
from encoder.models.iresnet import iresnet
from encoder.registry import create_encoder, encoder_spec, list_encoders, shared_encoder

# ---------------------------------------------------------------- registry


def test_registry_lists_the_contract_encoders():
    assert {"sface", "iresnet50", "iresnet100", "facenet", "gm_casia"} <= set(list_encoders())


def test_unknown_encoder_error_names_the_known_ones():
    with pytest.raises(UnknownEncoder, match="sface"):
        create_encoder("no_such_net")


def test_encoder_spec_needs_no_weights():
    spec = encoder_spec("gm_casia")
    assert (spec.input_size, spec.channels, spec.embedding_dim) == ((100, 100), 1, 320)


@pytest.mark.parametrize("name", ["iresnet50", "facenet", "gm_casia"])
def test_encoder_without_bundled_weights_asks_for_a_file(name):
    with pytest.raises(CheckpointError, match="weights file"):
        create_encoder(name)


def test_created_encoder_is_eval_and_frozen(sface):
    assert not sface.training
    assert not any(p.requires_grad for p in sface.parameters())


def test_shared_encoder_is_built_once_across_threads():
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(shared_encoder("sface"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and all(m is seen[0] for m in seen)


def test_requesting_cuda_without_cuda_is_a_clear_error():
    from encoder.runtime import DeviceUnavailable, resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceUnavailable, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailable):
        resolve_device("tpu")


def test_configure_torch_takes_thread_count_from_environment(monkeypatch):
    from encoder.runtime import configure_torch

    before = torch.get_num_threads()
    monkeypatch.setenv("PHENOLENS_TORCH_THREADS", "1")
    try:
        runtime = configure_torch("cpu", threads=2)
        assert runtime.threads == 1 and runtime.device.type == "cpu"
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- split and affine head


def _affine_head_checks(model: nn.Module) -> None:
    """features/head equals forward, and head(a F1 + b F2) = a h(F1) + b h(F2) + (1-a-b) h(0)."""
    torch.manual_seed(0)
    c, (h, w) = model.spec.channels, model.spec.input_size
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        feature_map = model.features(x)
        assert tuple(feature_map.shape[1:]) == model.spec.feature_shape
        embedding = model.head(feature_map)
        assert embedding.shape == (2, model.spec.embedding_dim)
        assert torch.allclose(embedding, model(x), atol=1e-5)
        f1, f2 = feature_map[:1], feature_map[1:]
        a, b = 0.7, -1.3
        lhs = model.head(a * f1 + b * f2)
        rhs = a * model.head(f1) + b * model.head(f2) + (1 - a - b) * model.head(torch.zeros_like(f1))
    scale = embedding.abs().max().item() + 1.0
    assert (lhs - rhs).abs().max().item() <= 1e-4 * scale


def test_sface_features_then_head_equals_forward_and_head_is_affine(sface):
    _affine_head_checks(sface)


@pytest.mark.parametrize("build", [FaceNet, GMCasia], ids=["facenet", "gm_casia"])
def test_random_architectures_split_and_affine_head(build):
    _affine_head_checks(build().eval())


# ---------------------------------------------------------------- checkpoint loaders


def _randomised_iresnet50(seed: int = 0) -> nn.Module:
    """iresnet50 with every BN statistic and PReLU slope random, so a misplaced tensor shows."""
    torch.manual_seed(seed)
    model = iresnet("iresnet50")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0, 0.5)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                m.weight.mul_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def reference():
    """(model, input batch of 2, its output)."""
    model = _randomised_iresnet50()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    return model, x, y


def test_iresnet_split_and_affine_head(reference):
    _affine_head_checks(reference[0])


def _arcface_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict under arcface_torch's names (its embedding BN is called ``features``)."""
    return {k.replace("embedding_bn.", "features."): v for k, v in model.state_dict().items()}


def _output_after_loading(path: Path, x: torch.Tensor, name: str = "iresnet50") -> torch.Tensor:
    model = create_encoder(name, weights=path)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("wrap", ["plain", "dataparallel", "model_wrapper", "state_dict_wrapper"])
def test_iresnet_state_dict_formats_load_with_identical_outputs(reference, tmp_path, wrap):
    model, x, y = reference
    sd = _arcface_state_dict(model)
    payload = {
        "plain": sd,
        "dataparallel": {f"module.{k}": v for k, v in sd.items()},
        "model_wrapper": {"model": sd, "epoch": 7},
        "state_dict_wrapper": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / "epoch_7.pt"
    torch.save(payload, path)
    assert (_output_after_loading(path, x) - y).abs().max().item() <= 1e-5


def test_iresnet_loads_a_state_dict_with_unrelated_names_by_structure(reference, tmp_path):
    model, x, y = reference
    sd = model.state_dict()
    modules = list(dict.fromkeys(k.rpartition(".")[0] for k in sd))
    renamed = {f"layer_{modules.index(k.rpartition('.')[0]):03d}.{k.rpartition('.')[2]}": v
               for k, v in sd.items()}
    assert not set(renamed) & set(model.state_dict())
    path = tmp_path / "renamed.pt"
    torch.save(renamed, path)
    assert (_output_after_loading(path, x) - y).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def insightface_onnx(reference, tmp_path_factory):
    """Our reference model exported like arcface_torch's torch2onnx (eval: Conv+BN folded)."""
    model, x, _ = reference
    path = tmp_path_factory.mktemp("onnx") / "glint360k_r50.onnx"
    torch.onnx.export(model, x[:1], str(path), input_names=["data"], output_names=["fc1"],
                      opset_version=11, dynamo=False, do_constant_folding=True)
    return path


def _onnxruntime(path: Path, x: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"data": x[i:i + 1].numpy()})[0] for i in range(len(x))])


def test_iresnet_loads_insightface_onnx_with_folded_batchnorm(reference, insightface_onnx):
    _, x, y = reference
    ours = _output_after_loading(insightface_onnx, x).numpy()
    onnx_out = _onnxruntime(insightface_onnx, x)
    # The exporter folds BN into conv weights in float32; torch and onnxruntime differ by as much.
    scale = np.abs(onnx_out).max()
    assert np.abs(ours - onnx_out).max() <= 1e-5 * scale
    assert np.abs(ours - y.numpy()).max() <= 1e-5 * scale


def _onnx2torch_like_module(onnx_path: Path) -> nn.Module:
    """An imitation of GM-Arc's fine-tuned model: onnx2torch's flat ``Conv_0``/``PRelu_1``...
    fx GraphModule with Conv+BN folded, Gemm + last BN moved to ``features``, and a classifier."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in tensors:
            tensors[node.output[0]] = tensors[node.input[0]]
    root, names, counts = nn.Module(), [], {}

    def param(name: str) -> nn.Parameter:
        return nn.Parameter(torch.from_numpy(tensors[name].copy()))

    for node in graph.node:
        if node.op_type not in ("Conv", "BatchNormalization", "PRelu", "Gemm"):
            continue
        name = f"{node.op_type}_{counts.setdefault(node.op_type, 0)}"
        counts[node.op_type] += 1
        if node.op_type == "Conv":
            w = tensors[node.input[1]]
            layer = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], bias=True)
            layer.weight, layer.bias = param(node.input[1]), param(node.input[2])
        elif node.op_type == "BatchNormalization":
            layer = nn.BatchNorm2d(tensors[node.input[1]].shape[0])
            layer.weight, layer.bias = param(node.input[1]), param(node.input[2])
            layer.running_mean.copy_(torch.tensor(tensors[node.input[3]]))
            layer.running_var.copy_(torch.tensor(tensors[node.input[4]]))
        elif node.op_type == "PRelu":
            layer = nn.PReLU(tensors[node.input[1]].size)
            layer.weight = nn.Parameter(torch.from_numpy(tensors[node.input[1]].reshape(-1).copy()))
        else:
            w = tensors[node.input[1]]
            layer = nn.Linear(w.shape[1], w.shape[0])
            layer.weight, layer.bias = param(node.input[1]), param(node.input[2])
        root.add_module(name, layer)
        names.append(name)
    fx_graph = torch.fx.Graph()
    value = fx_graph.placeholder("x")
    last_bn = f"BatchNormalization_{counts['BatchNormalization'] - 1}"
    for name in names:
        if name not in ("Gemm_0", last_bn):
            value = fx_graph.call_module(name, (value,))
    fx_graph.output(value)
    base = torch.fx.GraphModule(root, fx_graph)

    module = types.ModuleType("lib.models.my_arcface")

    class MyArcFace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base
            self.features = nn.Sequential()
            self.features.add_module("Gemm_0", root.Gemm_0)
            self.features.add_module(last_bn, getattr(root, last_bn))
            self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(512, 9))

    MyArcFace.__module__ = module.__name__
    MyArcFace.__qualname__ = "MyArcFace"
    module.MyArcFace = MyArcFace
    return MyArcFace(), module


def test_iresnet_loads_gm_arc_pickled_module_without_its_classes(
    reference, insightface_onnx, tmp_path, monkeypatch
):
    _, x, y = reference
    gm_model, fake_module = _onnx2torch_like_module(insightface_onnx)
    path = tmp_path / "s1_glint360k_r50_512d_gmdb__v1.0.3_bs64_size112_channels3_last_model.pth"
    fake_packages = {"lib": types.ModuleType("lib"), "lib.models": types.ModuleType("lib.models"),
                     "lib.models.my_arcface": fake_module}
    for name, fake in fake_packages.items():
        monkeypatch.setitem(sys.modules, name, fake)
    torch.save(gm_model, path)
    monkeypatch.undo()
    assert "lib.models.my_arcface" not in sys.modules

    with pytest.raises(CheckpointError, match="trusted folder"):
        create_encoder("iresnet50", weights=path)
    monkeypatch.setenv(TRUSTED_DIRS_ENV, str(tmp_path))
    ours = _output_after_loading(path, x).numpy()
    scale = np.abs(y.numpy()).max()
    assert np.abs(ours - y.numpy()).max() <= 1e-5 * scale


def test_checkpoint_errors_say_what_is_wrong(reference, tmp_path):
    model, _, _ = reference
    sd = _arcface_state_dict(model)
    cases = {
        "garbage.pt": (b"\x00not a checkpoint" * 64, "not a torch checkpoint"),
        "empty.pt": (b"", "empty"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            load_weights(iresnet("iresnet50"), tmp_path / name)

    missing = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['fc.bias', 'fc.weight'\]"):
        create_encoder("iresnet50", weights=tmp_path / "missing.pt")

    wrong = {**sd, "fc.weight": torch.zeros(512, 100)}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="wrong shapes.*fc.weight"):
        create_encoder("iresnet50", weights=tmp_path / "wrong.pt")

    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="known wrapper key"):
        create_encoder("iresnet50", weights=tmp_path / "meta.pt")

    with pytest.raises(CheckpointError, match="not found"):
        create_encoder("iresnet50", weights=tmp_path / "nope.pt")


def test_iresnet100_rejects_iresnet50_weights_by_structure(reference, tmp_path):
    model, _, _ = reference
    renamed = {f"w{i}.{k.rpartition('.')[2]}": v for i, (k, v) in enumerate(model.state_dict().items())}
    torch.save(renamed, tmp_path / "r50.pt")
    with pytest.raises(CheckpointError, match="does not fit iresnet100"):
        create_encoder("iresnet100", weights=tmp_path / "r50.pt")


@pytest.mark.parametrize("cls", [FaceNet, GMCasia], ids=["facenet", "gm_casia"])
def test_user_supplied_weights_round_trip(cls, tmp_path):
    torch.manual_seed(3)
    model = cls().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    c, (h, w) = model.spec.channels, model.spec.input_size
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        y = model(x)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    loaded = create_encoder(model.spec.name, weights=tmp_path / "weights.pt")
    with torch.no_grad():
        assert (loaded(x) - y).abs().max().item() <= 1e-5
