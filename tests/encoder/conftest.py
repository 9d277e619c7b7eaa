"""Encoder-area fixtures: one face pipeline per registered detector, built once."""

from __future__ import annotations

import pytest

DETECTORS = ("mtcnn", "yunet")


@pytest.fixture(scope="session")
def pipelines():
    """detector name -> FacePipeline using it (the process-wide detector instance)."""
    from encoder.pipeline import FacePipeline

    return {name: FacePipeline(name) for name in DETECTORS}


@pytest.fixture(scope="session")
def faces_by_detector(pipelines, photo_paths):
    """detector name -> {photo name -> Face} for every single-face real photo."""
    from tests.conftest import SINGLE_FACE_PHOTOS

    return {
        name: {p.name: pipe.face(photo_paths[p.name]) for p in SINGLE_FACE_PHOTOS}
        for name, pipe in pipelines.items()
    }
