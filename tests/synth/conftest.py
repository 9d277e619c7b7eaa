"""Fixtures of the synthetic-phenotype tests: real source faces (MTCNN on a few bundled photos)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from encoder.assets import PHOTOS
from research import synth

# Few photos keep detection cheap; t1.jpg adds six subjects in one MTCNN call.
TEST_PHOTOS = ("person_a_1.jpg", "person_a_2.jpg", "person_b_1.jpg", "impostor_1.jpg",
               "impostor_2.jpg", "t1.jpg", "Tom_Hanks_54745.png")


@pytest.fixture(scope="session")
def tom_source(photo_paths) -> synth.SourceFace:
    """The already-aligned Tom Hanks crop as a source (template landmarks, no detection)."""
    crop = np.asarray(Image.open(photo_paths["Tom_Hanks_54745.png"]).convert("RGB"))
    return synth.source_from_crop(crop, None, "tom_hanks", "Tom_Hanks_54745.png")


@pytest.fixture(scope="session")
def sources(pipeline, photo_paths) -> list[synth.SourceFace]:
    """Real source faces of 10 subjects (t1.jpg gives six)."""
    photos = [p for p in PHOTOS if p.name in TEST_PHOTOS]
    return synth.load_source_faces(pipeline, photos)
