"""The real ``phenolens`` entry point on the real photos: compare and encode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PHENOLENS = Path(sys.executable).parent / "phenolens"


def _run(*args: str) -> subprocess.CompletedProcess:
    if not PHENOLENS.exists():
        pytest.fail(f"{PHENOLENS} is missing: run `make setup`")
    return subprocess.run([str(PHENOLENS), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def compare_same_person(photo_paths):
    done = _run("compare", str(photo_paths["person_b_1.jpg"]), str(photo_paths["person_b_2.jpg"]),
                "--flip", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compare_json_reports_cosine_scheme_and_faces(compare_same_person):
    out = compare_same_person
    assert out["encoder"] == "sface" and out["view_scheme"] == "sface:orig,sface:flip"
    assert set(out["per_view"]) == {"sface:orig", "sface:flip"}
    assert out["cosine"] == pytest.approx(np.mean(list(out["per_view"].values())), abs=1e-5)
    assert [f["face_count"] for f in out["faces"]] == [1, 1]


def test_encode_embeddings_agree_with_compare_and_rank_the_impostor_lower(
    compare_same_person, photo_paths
):
    names = ["person_b_1.jpg", "person_b_2.jpg", "impostor_2.jpg"]
    done = _run("encode", *(str(photo_paths[n]) for n in names), "--flip", "--json")
    assert done.returncode == 0, done.stderr
    faces = json.loads(done.stdout)["faces"]
    emb = [np.array([f["embeddings"]["sface:orig"], f["embeddings"]["sface:flip"]]) for f in faces]
    assert all(e.shape == (2, 128) for e in emb)
    np.testing.assert_allclose(np.linalg.norm(emb[0], axis=1), 1.0, atol=1e-4)
    genuine = float(np.mean(np.sum(emb[0] * emb[1], axis=1)))
    impostor = float(np.mean(np.sum(emb[0] * emb[2], axis=1)))
    assert genuine == pytest.approx(compare_same_person["cosine"], abs=1e-4)
    assert genuine > impostor
    assert faces[0]["alignment"]["template"] == "arcface112"
    assert faces[0]["alignment"]["template_error_px"] < 5.0


def test_compare_of_a_non_image_exits_2_with_a_message(photo_paths, tmp_path):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("these are notes, not a photo\n" * 20)
    done = _run("compare", str(photo_paths["person_a_1.jpg"]), str(not_image))
    assert done.returncode == 2
    assert "not an image" in done.stderr and "Traceback" not in done.stderr


def test_encode_detector_option_picks_the_detector_and_reports_the_frame(photo_paths, tmp_path):
    from PIL import Image

    with Image.open(photo_paths["person_a_1.jpg"]) as im:
        face = im.convert("RGB")
    gif = tmp_path / "blink.gif"
    Image.new("RGB", face.size).save(gif, save_all=True, append_images=[face])
    docs = {}
    for detector in ("mtcnn", "yunet"):
        done = _run("encode", str(photo_paths["person_a_1.jpg"]), str(gif), "--detector", detector,
                    "--json")
        assert done.returncode == 0, done.stderr
        docs[detector] = json.loads(done.stdout)["faces"]
        assert [f["frame"] for f in docs[detector]] == [0, 1]
        assert [f["face_count"] for f in docs[detector]] == [1, 1]
    scores = {d: docs[d][0]["score"] for d in docs}
    assert scores["mtcnn"] > 0.99 and 0.85 < scores["yunet"] < 0.99  # each detector's own scale
    a, b = (np.array(docs[d][0]["embeddings"]["sface:orig"]) for d in ("mtcnn", "yunet"))
    assert float(a @ b) > 0.9


def test_unknown_detector_exits_2_naming_the_known_ones(photo_paths):
    done = _run("encode", str(photo_paths["person_a_1.jpg"]), "--detector", "haar")
    assert done.returncode == 2
    assert "'haar'" in done.stderr and "mtcnn, yunet" in done.stderr
