"""Explain fixtures: aligned crops of the real photos and an Explainer over real SFace."""

from __future__ import annotations

import numpy as np
import pytest

from explain.attribution.engine import Explainer
from explain.attribution.views import SingleEncoderViews

QUERY = "person_a_1.jpg"
HITS = ("person_a_2.jpg", "person_b_1.jpg", "impostor_1.jpg", "grace_hopper.jpg")


@pytest.fixture(scope="session")
def crops(faces) -> dict[str, np.ndarray]:
    """name -> (112, 112, 3) uint8 aligned crop."""
    return {name: face.crop for name, face in faces.items()}


@pytest.fixture(scope="session")
def query_crop(crops) -> np.ndarray:
    return crops[QUERY]


@pytest.fixture(scope="session")
def hit_crops(crops) -> np.ndarray:
    """(4, 112, 112, 3): a same-person hit first, then three other people."""
    return np.stack([crops[n] for n in HITS])


@pytest.fixture(scope="session")
def explainer(sface) -> Explainer:
    return Explainer(sface)


@pytest.fixture(scope="session")
def flip_explainer(sface) -> Explainer:
    return Explainer(SingleEncoderViews(sface, flip=True))


@pytest.fixture(scope="session")
def query_features(explainer, query_crop):
    return explainer.encode(query_crop)


@pytest.fixture(scope="session")
def hit_features(explainer, hit_crops):
    return explainer.encode(hit_crops)


@pytest.fixture(scope="session")
def pairs(explainer, query_crop, hit_crops):
    """The two-sided maps of the query against all four hits, computed once from the crops."""
    return explainer.explain(query_crop, hit_crops)
