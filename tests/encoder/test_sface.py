"""SFace: the dequantized torch module against onnxruntime on the original ONNX file."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from encoder.assets import PHOTOS, photo, sface_onnx_path

SINGLE_FACE = [p.name for p in PHOTOS if p.faces == 1 and not p.aligned]
SAME_PERSON_PAIRS = (("person_a_1.jpg", "person_a_2.jpg"), ("person_b_1.jpg", "person_b_2.jpg"))


@pytest.fixture(scope="module")
def onnx_session():
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(sface_onnx_path()), options, providers=["CPUExecutionProvider"]
    )
    # The file lists its float weights as graph inputs too; nothing reads them.
    dummies = {
        i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
        for i in session.get_inputs()
        if i.name != "data"
    }

    def run(crops: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 -> (N, 128) from the original int8 graph, one at a time."""
        rows = []
        for crop in crops:
            x = crop.transpose(2, 0, 1)[None].astype(np.float32)
            rows.append(session.run(None, {"data": x, **dummies})[0][0])
        return np.stack(rows)

    return run


def _embed(model, crops: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(model.preprocess(crops)).numpy()


def _tom_hanks() -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(photo("Tom_Hanks_54745.png")).convert("RGB"))


def test_sface_matches_onnxruntime_on_random_inputs(sface, onnx_session):
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    ours, reference = _embed(sface, crops), onnx_session(crops)
    assert np.abs(ours - reference).max() <= 1e-4


def test_sface_matches_onnxruntime_on_aligned_real_faces(sface, onnx_session, faces):
    crops = np.stack([_tom_hanks()] + [faces[name].alignment.crop for name in SINGLE_FACE])
    ours, reference = _embed(sface, crops), onnx_session(crops)
    assert np.abs(ours - reference).max() <= 1e-4


def test_sface_feature_map_has_declared_shape(sface):
    x = sface.preprocess(_tom_hanks())
    with torch.no_grad():
        feature_map = sface.features(x)
    assert tuple(feature_map.shape[1:]) == sface.spec.feature_shape == (1024, 7, 7)


def test_sface_normalisation_lives_in_preprocess(sface):
    crop = np.full((112, 112, 3), 255, dtype=np.uint8)
    x = sface.preprocess(crop)
    assert torch.allclose(x, torch.full_like(x, (255 - 127.5) / 128))


def test_sface_same_person_pairs_beat_every_impostor_pair(sface, faces):
    crops = np.stack([faces[name].alignment.crop for name in SINGLE_FACE])
    emb = _embed(sface, crops)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cos = dict(zip(itertools.combinations(SINGLE_FACE, 2), (
        float(emb[i] @ emb[j]) for i, j in itertools.combinations(range(len(SINGLE_FACE)), 2)
    ), strict=True))

    def cosine(a: str, b: str) -> float:
        return cos[(a, b)] if (a, b) in cos else cos[(b, a)]

    person = {p.name: p.person for p in PHOTOS}
    for a, b in SAME_PERSON_PAIRS:
        genuine = cosine(a, b)
        impostors = [
            (x, y) for x, y in itertools.combinations(SINGLE_FACE, 2)
            if person[x] != person[y] and ({x, y} & {a, b})
        ]
        assert impostors
        worst = max(impostors, key=lambda pair: cosine(*pair))
        assert genuine > cosine(*worst), (a, b, genuine, worst, cosine(*worst))


def test_sface_conversion_rejects_a_file_that_is_not_onnx(tmp_path):
    from encoder.errors import CheckpointError
    from encoder.models.sface import load_sface

    bogus = tmp_path / "sface.onnx"
    bogus.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(CheckpointError):
        load_sface(bogus)
