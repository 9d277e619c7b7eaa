"""Aligned crops of the real photos used by the syndrome tests (detected once per session).

Groups are people: person_a and person_b have two photos each, years apart.
"""

from __future__ import annotations

import numpy as np
import pytest

GROUP_PHOTOS = ("person_a_1.jpg", "person_a_2.jpg", "person_b_1.jpg", "person_b_2.jpg")
OUTSIDER = "grace_hopper.jpg"


@pytest.fixture(scope="session")
def crops(pipeline, photo_paths) -> dict[str, np.ndarray]:
    """photo name -> (112, 112, 3) uint8 aligned crop (real MTCNN + ArcFace alignment)."""
    return {name: pipeline.face(photo_paths[name]).crop for name in (*GROUP_PHOTOS, OUTSIDER)}


@pytest.fixture(scope="session")
def group(crops) -> tuple[np.ndarray, tuple[str, ...]]:
    """(4, 112, 112, 3) crops of person_a and person_b, and their person labels."""
    return np.stack([crops[n] for n in GROUP_PHOTOS]), ("person_a", "person_a", "person_b", "person_b")
