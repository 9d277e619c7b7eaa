"""``phenolens composite / syndrome-map / fill-in`` on the real entry point (aligned crops of
real photos as inputs, so no detection runs)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from server.cli import main


def _save(crops, tmp_path, names):
    paths = []
    for name in names:
        path = tmp_path / f"{name}.png"
        Image.fromarray(crops[name]).save(path)
        paths.append(str(path))
    return paths


def test_cli_writes_composite_syndrome_map_and_fill_in_pngs(crops, tmp_path, capsys):
    a1, a2, grace = _save(crops, tmp_path, ["person_a_1.jpg", "person_a_2.jpg", "grace_hopper.jpg"])
    out = tmp_path / "composite.png"
    assert main(["composite", "--photos", a1, a2, "--aligned", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["images"] == 2 and doc["warnings"]
    expected = np.rint((crops["person_a_1.jpg"].astype(float) + crops["person_a_2.jpg"]) / 2)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected.astype(np.uint8))

    maps = tmp_path / "maps"
    assert main(["syndrome-map", "--photos", a1, a2, "--query", grace, "--aligned", "--out",
                 str(maps), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["query_cosine_to_centroid"] < doc["mean_cosine_to_centroid"]
    assert (maps / "syndrome_map.png").stat().st_size > 0
    assert np.load(maps / "to_centroid.npy").shape == (7, 7)

    fill = tmp_path / "fill"
    assert main(["fill-in", grace, "--target", a1, "--aligned", "--count", "2", "--out",
                 str(fill), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mean_gain"] > doc["control_mean_gain"]
    for name in ("fill_in.png", "filled.png", "expected_fill.png"):
        assert Image.open(fill / name).size[0] > 0
