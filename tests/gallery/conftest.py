"""Synthetic-vector fixtures for the gallery tests (real SQLite, real FAISS)."""

from __future__ import annotations

import numpy as np
import pytest

from gallery import Entry


def unit_views(rng: np.random.Generator, views: int, dim: int) -> np.ndarray:
    """(V, D) random per-view embeddings (not normalised: the gallery must normalise)."""
    return rng.normal(size=(views, dim)).astype(np.float32) * rng.uniform(0.5, 3.0)


def make_entries(
    n: int, *, views: int = 1, dim: int = 16, syndromes: int = 5, per_subject: int = 2, seed: int = 0,
    prefix: str = "img",
) -> list[Entry]:
    rng = np.random.default_rng(seed)
    return [
        Entry(
            image_id=f"{prefix}{i}",
            subject_id=f"subj{i // per_subject}",
            syndrome_id=f"SYN{i % syndromes}",
            syndrome_name=f"Syndrome {i % syndromes}",
            omim_id=str(100000 + i % syndromes),
            genes=(f"GENE{i % 7}",) + ((f"GENE{i % 3 + 10}",) if i % 2 else ()),
            views=unit_views(rng, views, dim),
            source="synthetic",
        )
        for i in range(n)
    ]


def mean_view_cosine(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """query (V, D), gallery (N, V, D) -> (N,) mean per-view cosine, computed directly."""
    q = query / np.linalg.norm(query, axis=-1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=-1, keepdims=True)
    return np.einsum("vd,nvd->nv", q, g).mean(axis=1)


@pytest.fixture
def gallery_path(tmp_path):
    return tmp_path / "gallery.db"
