"""Overlays, pair figures and maps drawn back on the photo; the CLI on a real aligned pair."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from encoder.assets import photo
from explain.render import overlay, overlay_png, pair_figure, photo_map, photo_overlay_png


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_zero_map_leaves_the_face_untouched(query_crop):
    out = overlay(query_crop, np.zeros((7, 7)))
    np.testing.assert_array_equal(out, query_crop)


def test_positive_cells_turn_red_and_negative_cells_blue():
    grey = np.full((112, 112, 3), 128, np.uint8)
    signed = np.zeros((112, 112))
    signed[:, :56] = 1.0
    signed[:, 56:] = -1.0
    out = overlay(grey, signed).astype(int)
    assert out[50, 20, 0] > out[50, 20, 2] + 40  # pulls together: red
    assert out[50, 90, 2] > out[50, 90, 0] + 40  # pushes apart: blue


def test_overlay_png_has_the_image_size_and_symmetric_limits(query_crop):
    m = np.linspace(-1, 1, 49).reshape(7, 7)
    a = _decode(overlay_png(query_crop, m))
    b = _decode(overlay_png(query_crop, m * 3.0))  # same picture: limits are ±max|map|
    assert a.shape == query_crop.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 3  # one step of the 256-colour map


def test_pair_figure_is_a_png(pairs, query_crop, hit_crops, tmp_path):
    path = tmp_path / "pair.png"
    data = pair_figure(query_crop, hit_crops[0], pairs[0].query.similarity_aligned,
                       pairs[0].gallery.similarity_aligned, cosine=pairs[0].cosine,
                       label="person_a", path=path)
    image = _decode(data)
    assert path.read_bytes() == data
    assert image.shape[0] > 300 and image.shape[1] > 300


def test_maps_are_drawn_back_inside_the_face_on_the_photo(faces, pairs):
    face = faces["person_a_1.jpg"]
    on_photo = photo_map(pairs[0].query.similarity_aligned, face.alignment)
    assert on_photo.shape == face.alignment.photo_size
    x1, y1, x2, y2 = face.alignment.face_box_photo
    ys, xs = np.nonzero(on_photo)
    assert xs.min() >= np.floor(x1) - 1 and xs.max() <= np.ceil(x2) + 1
    assert ys.min() >= np.floor(y1) - 1 and ys.max() <= np.ceil(y2) + 1
    rgb = np.asarray(Image.open(photo("person_a_1.jpg")).convert("RGB"))
    drawn = _decode(photo_overlay_png(rgb, pairs[0].query.similarity_aligned, face.alignment))
    assert drawn.shape == rgb.shape


def test_cli_explains_a_pair_with_json_residuals(tmp_path):
    tom = photo("Tom_Hanks_54745.png")
    mirrored = tmp_path / "tom_mirrored.png"
    Image.fromarray(np.asarray(Image.open(tom).convert("RGB"))[:, ::-1]).save(mirrored)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "explain", str(tom), "--against", str(mirrored),
         "--aligned", "--no-flip", "--encoder", "sface", "--out", str(out), "--json",
         "--methods", "similarity", "gradcam"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    doc = json.loads(line)
    assert 0.5 < doc["cosine"] <= 1.0
    assert abs(doc["residual"]) <= 1e-4
    q = np.load(out / "match01_similarity_query.npy")
    assert q.shape == (7, 7)
    assert abs(doc["cosine"] - float(q.sum()) - doc["bias_share"] - doc["residual"]) <= 1e-5
    for name in ("pair", "query_photo", "gallery"):
        assert (out / f"match01_gradcam_{name}.png").stat().st_size > 0
