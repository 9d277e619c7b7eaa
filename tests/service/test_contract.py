"""The wire contract and the client distribution, without a server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_protos():
    from server.protogen import generate, stale_files

    assert stale_files(generate()) == []


def test_client_imports_without_torch_or_faiss():
    code = ("import sys, phenolens, phenolens.aio; "
            "assert 'torch' not in sys.modules, 'torch'; "
            "assert 'faiss' not in sys.modules, 'faiss'; "
            "assert 'server' not in sys.modules; print(phenolens.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO / "client", check=False)
    assert out.returncode == 0, out.stderr


def test_client_distribution_declares_only_light_dependencies():
    import tomllib

    project = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "numpy"}


def test_stub_imports_are_package_relative():
    for path in (REPO / "client" / "phenolens" / "_proto").glob("*.py"):
        assert "from phenolens.v1 import" not in path.read_text(), path.name


def test_float_array_round_trips_shape_and_values():
    from phenolens.arrays import from_float_array, to_float_array

    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    msg = to_float_array(arr)
    assert list(msg.shape) == [2, 3, 4] and len(msg.data) == 4 * 24
    np.testing.assert_array_equal(from_float_array(msg), arr)


def test_float_array_with_wrong_length_is_refused():
    from phenolens._proto import types_pb2
    from phenolens.arrays import from_float_array

    with pytest.raises(ValueError, match="holds 2 values"):
        from_float_array(types_pb2.FloatArray(shape=[3], data=b"\0" * 8))


def test_image_inputs_become_bytes_or_raw_pixels(photo_paths):
    from phenolens.arrays import to_image
    from PIL import Image

    path = photo_paths["astronaut.png"]
    assert to_image(path).encoded == path.read_bytes()
    assert to_image(path.read_bytes(), aligned=True).aligned
    arr = np.zeros((5, 4, 3), np.uint8)
    msg = to_image(arr)
    assert (msg.pixels.height, msg.pixels.width, msg.pixels.channels) == (5, 4, 3)
    msg = to_image(Image.new("L", (4, 5)))
    assert (msg.pixels.height, msg.pixels.width, msg.pixels.channels) == (5, 4, 3)
    with pytest.raises(TypeError):
        to_image(arr.astype(np.float32))


def test_overlay_colours_keep_the_sign():
    from phenolens.overlay import diverging_colors, render_overlay

    red, white, blue = diverging_colors(np.array([1.0, 0.0, -1.0]))
    assert red[0] > red[2] and blue[2] > blue[0]
    assert np.allclose(white, 247)
    base = np.full((8, 8, 3), 128, np.uint8)
    signed = np.zeros((8, 8), np.float32)
    signed[:4] = 1.0
    signed[4:] = -1.0
    out = render_overlay(base, signed)
    assert out[0, 0, 0] > out[0, 0, 2] and out[7, 7, 2] > out[7, 7, 0]


def test_every_rpc_has_a_scope_and_writes_need_admin():
    from phenolens._proto import gallery_pb2, phenolens_pb2, syndrome_pb2

    from server.auth import METHOD_SCOPES

    for file in (phenolens_pb2, gallery_pb2, syndrome_pb2):
        for service in file.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert f"/{service.full_name}/{method.name}" in METHOD_SCOPES
    for write in ("AddImage", "ImportGallery", "DeleteImages"):
        assert METHOD_SCOPES[f"/phenolens.v1.GalleryAdmin/{write}"] == "admin"
