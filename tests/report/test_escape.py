"""The report page is a template with autoescaping: gallery labels and the caller's title
are text, never markup; empty columns are left out."""

from __future__ import annotations

import datetime as dt

from phenolens.report import render_report
from phenolens.results import (
    Confidence,
    ExplainResult,
    GalleryRecord,
    GeneRank,
    Hit,
    MatchResult,
    SyndromeRank,
)

EVIL = '<script>alert("x")</script>'


def _result(omim: str = "") -> ExplainResult:
    calibrated = Confidence(0.72, method="isotonic", calibration_error=0.03, samples=900,
                            gallery_version=4)
    refused = Confidence(None, reason=f"only one subject has {EVIL}")
    syndromes = (SyndromeRank(1, "s1", f"syndrome {EVIL}", omim, 0.41, "7", confidence=calibrated),
                 SyndromeRank(2, "s2", "other", "", 0.2, "8", confidence=refused))
    hit = Hit(1, GalleryRecord("7", image_id=f"img {EVIL}", subject_id="S1", syndrome_id="s1"),
              0.41, 0.59)
    match = MatchResult("sface@1", "sface:orig", 4, (hit,), syndromes,
                        (GeneRank(1, f"GENE{EVIL}", 0.41, "7", confidence=calibrated),), None)
    return ExplainResult(match, (), b"")


def test_labels_and_title_are_escaped_and_the_page_keeps_its_numbers():
    page = render_report(_result(), title=f"case {EVIL}",
                         generated=dt.datetime(2026, 12, 2, 17, 0))
    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page
    assert "72\u00a0%" in page and "not calibrated" in page
    assert "expected calibration error is 3.0 percentage points" in page
    assert "<th>OMIM</th>" not in page, "an empty OMIM column is left out"
    assert "<th>OMIM</th>" in render_report(_result("SYN-900001"))
    assert 'id="synthetic"' in render_report(_result("SYN-900001"))
