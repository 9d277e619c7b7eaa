"""Figures that explain themselves: legends name only the colours a map shows, single
overlays carry words, near-zero values leave the face untouched (no tinted rectangle)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from explain.render import (
    legend_words,
    map_words,
    overlay,
    overlay_legend,
    overlay_png,
    pair_figure,
    present_signs,
)


def _face() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(60, 200, (112, 112, 3), dtype=np.uint8)


def _blob(sign: float) -> np.ndarray:
    ys, xs = np.mgrid[0:112, 0:112]
    return sign * np.exp(-((ys - 51) ** 2 + (xs - 38) ** 2) / 60.0)  # on the left eye


def test_a_map_without_red_gets_no_word_for_red():
    differs = _blob(-1.0)
    assert present_signs(differs) == (True, False)
    words = legend_words("contrast", differs)
    assert "blue: differs from the other face" in words and "red" not in words
    both = differs + _blob(1.0)[:, ::-1]
    assert "red: pulls them together" in legend_words("similarity", both)


def test_the_same_map_on_both_faces_is_described_once_and_different_maps_per_face():
    m = _blob(-1.0)
    query, gallery = map_words(m, m)
    assert query.startswith("both faces") and "eyes" in query and gallery == ""
    query, gallery = map_words(m, np.roll(m, 40, axis=0))
    assert query.startswith("query:") and gallery.startswith("match:") and query[6:] != gallery[6:]


def test_near_zero_values_leave_the_face_untouched():
    face = _face()
    m = np.full((112, 112), 0.01)  # a faint tail everywhere: 1 % of the peak
    m[40:80, 20:60] = 1.0
    drawn = overlay(face, m)
    assert np.array_equal(drawn[:40], face[:40]), "no tint where the map is nearly zero"
    assert not np.array_equal(drawn[40:80, 20:60], face[40:80, 20:60])


def test_single_overlays_and_pair_figures_carry_their_words(tmp_path):
    face, m = _face(), _blob(-1.0)
    legend = overlay_legend("contrast", "query face", m)
    png = Image.open(io.BytesIO(overlay_png(face, m, legend=legend)))
    assert png.size[0] == 112 and png.size[1] > 112, "a strip of words below the face"
    assert Image.open(io.BytesIO(overlay_png(face, m))).size == (112, 112)
    data = pair_figure(face, face[:, ::-1], m, m[:, ::-1], cosine=0.42, label="synthetic x",
                       method="contrast", gallery_name="subject s1 · image i1",
                       path=tmp_path / "pair.png")
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert image.shape[0] > image.shape[1] > 400
    outside = _blob(1.0) * 0
    outside[:10, :] = 1.0  # all of what pulls together on the hair line
    warned = pair_figure(face, face, outside, outside, cosine=0.3, method="similarity")
    assert warned != pair_figure(face, face, outside, outside, cosine=0.3, method="similarity",
                                 warning=""), "the hair/background warning is drawn"
