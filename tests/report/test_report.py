"""Confidence, region summaries and the HTML report through a real server on loopback,
and the report rendered in headless Chromium."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from explain.regions import SUMMARY_REGIONS, region_summary
from tests.report import browser
from tests.report.conftest import RARE
from tests.service.conftest import ADMIN_TOKEN, READ_TOKEN


@pytest.fixture(scope="session")
def explained(client, query_path):
    return client.explain(query_path, top_k=3)


@pytest.fixture(scope="session")
def report_page(client, query_path, report_dir):
    out = report_dir / "report.html"
    page = client.report(query_path, out, top_k=3, title="case 17")
    assert out.read_text(encoding="utf-8") == page
    return out


def test_match_carries_calibrated_confidence_for_every_well_sampled_syndrome(client, query_path):
    result = client.match(query_path, top_k=10, top_syndromes=10)
    by_id = {s.syndrome_id: s for s in result.syndromes}
    assert set(by_id) >= {"wide_eyes", "broad_nose", "long_philtrum", "small_chin", RARE}
    calibrated = [s for s in result.syndromes if s.syndrome_id != RARE]
    for s in calibrated:
        c = s.confidence
        assert c.calibrated and 0 < c.probability < 1, s
        assert c.method in ("isotonic", "logistic") and c.samples > 0
        assert c.gallery_version == result.gallery_version
        assert 0 <= c.calibration_error < 0.5
    ordered = sorted(calibrated, key=lambda s: s.cosine)
    probabilities = [s.confidence.probability for s in ordered]
    assert probabilities == sorted(probabilities), "confidence must rise with the cosine"
    assert [s.syndrome_id for s in result.syndromes] == [
        s.syndrome_id for s in sorted(result.syndromes, key=lambda s: -s.cosine)]
    for h in result.hits:
        assert h.confidence.calibrated == (h.syndrome_id != RARE)
    assert result.genes and all(g.confidence.calibrated for g in result.genes)
    assert {g.confidence.method for g in result.genes} <= {"isotonic", "logistic"}


def test_confidence_is_refused_for_a_syndrome_with_one_subject(client, query_path):
    result = client.match(query_path, top_k=1, top_syndromes=10)
    rare = next(s for s in result.syndromes if s.syndrome_id == RARE)
    assert rare.confidence.probability is None
    assert f"'{RARE}' has 1 subject" in rare.confidence.reason


def test_region_summaries_come_with_every_map_and_match_the_maps(explained):
    for e in explained.explanations:
        for m in e.maps:
            assert tuple(r.region for r in m.regions) == SUMMARY_REGIONS
            expected = region_summary(m.aligned)
            np.testing.assert_allclose([r.negative for r in m.regions], expected.negative,
                                       atol=1e-5)
            np.testing.assert_allclose([r.positive for r in m.regions], expected.positive,
                                       atol=1e-5)
            assert m.describe_regions() == expected.describe()
            assert m.pair_figure_png == b"", "pair figures only when asked for"
        assert e.hit.confidence.gallery_version == explained.match.gallery_version


def test_report_is_one_self_contained_page(report_page, explained, synth_samples):
    page = report_page.read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//|file:)", page, re.I)
    sources = re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    # query photo, aligned query face, one pair figure per explained match
    assert len(sources) == 2 + len(explained.explanations)
    top = explained.match.syndromes[0]
    assert top.syndrome_name in page and "How to read this page" in page
    assert "case 17" in page
    assert "differs most:" in page and "alike most:" in page
    assert "person_a" not in page, "the query's file name is not written"
    for e in explained.explanations:  # gallery faces named by the gallery's own labels
        assert f"subject {e.hit.record.subject_id}, image {e.hit.record.image_id}" in page
    assert re.search("\\d+\u00a0%", page), "calibrated confidence in percent"


def test_report_renders_in_chromium_with_every_image_and_no_horizontal_scroll(
        report_page, explained, report_dir):
    chromium = browser.find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (make setup installs Debian's chromium "
                    "where apt-get can): the browser check of the report did not run")
    top = explained.match.syndromes[0].syndrome_name
    seen = browser.probe(chromium, report_page, top)
    assert seen.images == 2 + len(explained.explanations)
    assert seen.broken == ()
    assert seen.target_visible, f"the top syndrome {top!r} is not visible"
    assert seen.inner_width == browser.WIDTH
    assert seen.scroll_width <= seen.inner_width, "the page scrolls horizontally at 1280 px"
    shot = browser.screenshot(chromium, report_page, report_dir / "report.png")
    from PIL import Image

    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[1] == browser.WIDTH
    assert pixels.std() > 20, "the screenshot is blank"


def test_cli_report_writes_the_same_ranking_locally_and_through_the_server(
        report_server, query_path, report_dir, report_backend, capsys):
    from server.cli import main

    remote, local = report_dir / "cli-remote.html", report_dir / "cli-local.html"
    assert main(["report", str(query_path), "--server", report_server.address, "--token",
                 READ_TOKEN, "--out", str(remote), "--top", "2"]) == 0
    assert main(["report", str(query_path), "--gallery", str(report_backend.gallery.path),
                 "--out", str(local), "--top", "2"]) == 0
    rows = [re.findall(r"<table id=syndromes>.*?</table>", p.read_text(), re.S)[0]
            for p in (remote, local)]
    assert rows[0] == rows[1]
    assert "wrote" in capsys.readouterr().out


def test_cli_match_and_explain_print_confidence_and_regions(report_server, query_path,
                                                            report_dir, capsys):
    from server.cli import main

    assert main(["match", str(query_path), "--server", report_server.address, "--token",
                 READ_TOKEN, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["syndromes"][0]["confidence"]["method"] in ("isotonic", "logistic")
    assert all("confidence" in h for h in doc["hits"])
    assert main(["explain", str(query_path), "--server", report_server.address, "--token",
                 READ_TOKEN, "--top", "1", "--out", str(report_dir / "explain"), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert "confidence" in line
    for entry in line["methods"].values():
        assert set(entry["regions"]) == {"query", "gallery"}
        assert set(entry["regions"]["query"]) == set(SUMMARY_REGIONS)


def test_confidence_is_refitted_when_the_gallery_changes(report_server, client, query_path,
                                                         synth_samples):
    from phenolens import Client, GalleryRecord

    before = client.match(query_path, top_k=1)
    sample = synth_samples[0]
    with Client(report_server.address, token=ADMIN_TOKEN, timeout=300) as admin:
        admin.add_image(np.ascontiguousarray(sample.image[::-1, :]), GalleryRecord(
            "", image_id="upside-down", subject_id="new_subject", syndrome_id=sample.label,
            syndrome_name=sample.label), aligned=True)
    after = client.match(query_path, top_k=1)
    assert after.gallery_version > before.gallery_version
    c = after.syndromes[0].confidence
    assert c.gallery_version == after.gallery_version
    assert c.samples > before.syndromes[0].confidence.samples


def test_async_client_writes_the_same_report(report_server, query_path, report_dir):
    import asyncio

    from phenolens import AsyncClient

    async def run() -> str:
        async with AsyncClient(report_server.address, token=READ_TOKEN, timeout=300) as c:
            return await c.report(query_path, report_dir / "async.html", top_k=1)

    page = asyncio.run(run())
    assert (report_dir / "async.html").read_text(encoding="utf-8") == page
    assert page.count("<img") == 3 and "How to read this page" in page
