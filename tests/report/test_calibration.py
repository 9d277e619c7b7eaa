"""Calibrated confidence from a gallery's leave-one-subject-out scores (gallery.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from gallery import Entry, Gallery
from gallery.calibration import (
    CalibrationCache,
    expected_calibration_error,
    fit_calibration,
    fit_isotonic,
    fit_logistic,
    loso_samples,
)


def clustered_gallery(syndromes=4, subjects=6, images=3, spread=0.9, seed=0, dim=32):
    """Unit vectors: a syndrome direction + a subject direction + noise (N, D), labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(syndromes, dim))
    vectors, subj, syn = [], [], []
    for s in range(syndromes):
        for p in range(subjects):
            person = rng.normal(size=dim)
            for _ in range(images):
                v = centres[s] + spread * person + 0.6 * rng.normal(size=dim)
                vectors.append(v / np.linalg.norm(v))
                subj.append(f"s{s}p{p}")
                syn.append(f"syn{s}")
    return np.asarray(vectors, np.float32), subj, syn


def test_isotonic_fit_is_monotone_and_pools_violators():
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    y = np.array([0, 1, 0, 0, 1, 1])
    kx, ky = fit_isotonic(x, y)
    assert np.all(np.diff(ky) >= 0)
    assert np.interp(0.1, kx, ky) == 0.0
    assert np.interp(0.3, kx, ky) == pytest.approx(1 / 3)  # (1 + 0 + 0) / 3 pooled
    assert np.interp(0.6, kx, ky) == 1.0


def test_isotonic_knots_are_one_per_cosine_even_where_cosines_tie():
    kx, ky = fit_isotonic(np.array([0.3, 0.2, 0.1, 0.2, 0.3]), np.array([1, 1, 0, 0, 1]))
    assert kx == (0.1, 0.2, 0.3) and ky == (0.0, 0.5, 1.0)
    kx, ky = fit_isotonic(np.array([0.5, 0.5, 0.5]), np.array([1, 0, 0]))
    assert kx == (0.5,) and ky == pytest.approx((1 / 3,))


def test_logistic_fit_recovers_the_generating_curve():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, 20000)
    y = rng.random(x.size) < 1 / (1 + np.exp(-(-1.0 + 4.0 * x)))
    a, b = fit_logistic(x, y)
    assert a == pytest.approx(-1.0, abs=0.1)
    assert b == pytest.approx(4.0, abs=0.2)


def test_ece_is_near_zero_for_calibrated_and_large_for_overconfident_probabilities():
    rng = np.random.default_rng(2)
    p = rng.random(50000)
    y = rng.random(p.size) < p
    assert expected_calibration_error(p, y) < 0.01
    assert expected_calibration_error(np.where(p > 0.5, 1.0, 0.0), y) > 0.2


def test_loso_samples_never_pair_a_subject_with_itself():
    vectors, subj, syn = clustered_gallery(syndromes=3, subjects=4, images=3)
    s = loso_samples(vectors, subj, syn)
    n = len(subj)
    same_subject_pairs = 3 * 4 * 3  # per subject: C(3, 2) = 3 pairs
    assert s.hit_cosine.size == n * (n - 1) // 2 - same_subject_pairs
    # Syndrome samples: every query against every syndrome, own subject left out.
    assert s.syndrome_cosine.size == n * 3
    assert s.syndrome_label.sum() == n


def test_calibration_lowers_the_calibration_error_and_keeps_the_order():
    vectors, subj, syn = clustered_gallery()
    cal = fit_calibration(vectors, subj, syn, gallery_version=7)
    for curve in (cal.hit, cal.syndrome):
        assert curve is not None and curve.kind in ("isotonic", "logistic")
        assert curve.ece < curve.ece_raw
        assert curve.ece == min(dict(curve.candidates).values())
        grid = np.linspace(-1, 1, 201)
        assert np.all(np.diff(curve(grid)) >= 0), "confidence must be monotone in cosine"
    c = cal.syndrome_confidence("syn0", 0.5)
    assert c.calibrated and 0 < c.probability < 1
    assert c.gallery_version == 7 and c.samples == cal.syndrome.samples


def test_confidence_is_refused_for_a_syndrome_with_too_few_subjects():
    vectors, subj, syn = clustered_gallery()
    subj = [("lonely" if s == "syn3" else p) for p, s in zip(subj, syn, strict=True)]
    cal = fit_calibration(vectors, subj, syn, min_subjects=3)
    refused = cal.hit_confidence("syn3", 0.9)
    assert not refused.calibrated
    assert "'syn3' has 1 subject" in refused.reason and "at least 3" in refused.reason
    assert cal.hit_confidence("syn0", 0.9).calibrated


def test_a_gallery_too_small_to_calibrate_says_why():
    vectors, subj, syn = clustered_gallery(syndromes=2, subjects=1, images=4)
    cal = fit_calibration(vectors, subj, syn)
    assert cal.hit is None and cal.syndrome is None
    c = cal.syndrome_confidence("syn0", 0.8)
    assert not c.calibrated and "at least two syndromes" in c.reason


def test_cache_refits_when_the_gallery_version_moves(tmp_path):
    vectors, subj, syn = clustered_gallery()
    cache = CalibrationCache()
    with Gallery.open(tmp_path / "g.sqlite", encoder_id="test@1", view_scheme="test:orig") as g:
        g.add_many([Entry(f"img{i}", s, y, y, v[None]) for i, (v, s, y)
                    in enumerate(zip(vectors, subj, syn, strict=True))])
        first = cache.get(g)
        assert first.gallery_version == g.version and first.hit is not None
        assert cache.get(g) is first, "an unchanged gallery reuses its calibration"
        g.add(Entry("extra", "new_subject", "syn0", "syn0", vectors[0][None]))
        second = cache.get(g)
        assert second is not first and second.gallery_version == g.version
        assert second.hit.samples > first.hit.samples


def test_gene_confidence_is_calibrated_from_carriers_and_refused_without_genes():
    vectors, subj, syn = clustered_gallery()
    genes = [(f"G{s[-1]}",) + (("SHARED",) if s in ("syn0", "syn1") else ()) for s in syn]
    cal = fit_calibration(vectors, subj, syn, genes=genes)
    assert cal.gene is not None and cal.gene.ece < cal.gene.ece_raw
    # per query: 4 single genes + SHARED, own subject left out
    assert cal.gene.samples == len(subj) * 5
    assert cal.gene.positives == len(subj) + 2 * 6 * 3  # own gene, and SHARED for syn0/syn1
    c = cal.gene_confidence("SHARED", 0.6)
    assert c.calibrated and c.probability >= cal.gene_confidence("SHARED", 0.2).probability
    assert not cal.gene_confidence("UNKNOWN", 0.9).calibrated
    bare = fit_calibration(vectors, subj, syn)
    assert bare.hit is not None and bare.gene is None
    assert "carry no genes" in bare.gene_confidence("G0", 0.5).reason
