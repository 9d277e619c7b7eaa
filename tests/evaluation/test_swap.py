"""The region-swap protocol on real photos and real SFace: pairs, metrics, the CLI."""

from __future__ import annotations

import json
import shutil
import sys

import cv2
import numpy as np
import pytest

from explain.evaluation import swap as S
from explain.regions import region_masks

PHOTOS = ("person_a_1.jpg", "impostor_1.jpg", "grace_hopper.jpg")
REGIONS = ("eyes", "mouth")


@pytest.fixture(scope="module")
def photos(pipeline, photo_paths) -> list[S.SourcePhoto]:
    out = []
    for name in PHOTOS:
        rgb, face = pipeline.photo_face(photo_paths[name])
        out.append(S.SourcePhoto(name, name.split(".")[0], rgb, face))
    return out


@pytest.fixture(scope="module")
def pairs(photos, pipeline) -> list[S.SwapPair]:
    pairs, skipped = S.build_pairs(photos, REGIONS, pipeline, offset=1)
    assert not skipped
    return pairs


@pytest.fixture(scope="module")
def result(sface, pairs) -> tuple[S.SwapResult, dict]:
    maps: dict = {}
    return S.evaluate_swaps(sface, pairs, ["contrast", "similarity"], steps=8, n_random=1,
                            maps_out=maps), maps


def test_donor_is_another_person_from_offset_places_later():
    people = [S.SourcePhoto(f"{p}_{i}.jpg", p, None, None)
              for p, i in (("a", 1), ("a", 2), ("b", 1), ("c", 1))]
    assert S.donor_index(people, 0, offset=1) == 2  # a_2 is the same person
    assert S.donor_index(people, 3, offset=1) == 0
    unknown = [S.SourcePhoto(f"{i}.jpg", None, None, None) for i in range(3)]
    assert S.donor_index(unknown, 2, offset=1) == 0
    with pytest.raises(ValueError):
        S.donor_index(people[:2], 0)


def test_swap_changes_the_region_and_leaves_the_photo_far_outside_it_untouched(photos):
    target, donor = photos[0], photos[1]
    lt = target.face.alignment.landmarks_photo
    for region in REGIONS:
        swapped, alpha = S.swap_region(target.rgb, lt, donor.rgb,
                                       donor.face.alignment.landmarks_photo, region)
        mask = region_masks(lt, size=target.rgb.shape[:2])[region]
        diff = np.abs(swapped.astype(np.int16) - target.rgb.astype(np.int16)).sum(-1)
        assert diff[mask].mean() > 10, (region, diff[mask].mean())
        assert (alpha[mask] > 0.5).mean() > 0.95  # the paste covers the region
        d = float(np.linalg.norm(lt[1] - lt[0]))
        ys, xs = np.nonzero(mask)
        far = np.ones_like(mask)
        top, left = max(0, int(ys.min() - d)), max(0, int(xs.min() - d))
        far[top:int(ys.max() + d), left:int(xs.max() + d)] = False
        assert far.any() and (diff[far] == 0).all()


def test_ground_truth_covers_the_region_in_both_crops(pairs, photos):
    by_name = {p.name: p for p in photos}
    for pair in pairs:
        gallery_region = region_masks(by_name[pair.target].face.alignment.landmarks_crop,
                                      size=pair.gallery.shape[:2])[pair.region]
        assert (pair.truth_gallery[gallery_region]).mean() > 0.95, pair.name
        # The swapped photo is aligned again; its crop shows the same face, nearly in place.
        assert (pair.truth_query[gallery_region]).mean() > 0.8, pair.name
        assert pair.truth_query.mean() < 0.2


def test_lift_and_pointing_of_synthetic_maps():
    truth = np.zeros((112, 112), bool)
    truth[40:60, 30:50] = True
    on_region = np.where(truth, -1.0, 0.2)
    assert S.negative_lift(on_region, truth) == pytest.approx(truth.size / truth.sum())
    assert S.negative_pointing(on_region, truth) == 1.0
    uniform = -np.ones((112, 112))
    assert S.negative_lift(uniform, truth) == pytest.approx(1.0)
    outside = np.where(truth, 0.0, -1.0)
    assert S.negative_lift(outside, truth) == 0.0 and S.negative_pointing(outside, truth) == 0.0
    positive = np.where(truth, 0.1, 1.0)  # no negative mass: nothing found
    assert S.negative_lift(positive, truth) == 0.0 and S.negative_pointing(positive, truth) == 0.0


def test_restoring_every_pixel_gives_the_original(sface, pairs):
    from explain.evaluation.common import PairTarget

    pair = pairs[0]
    target = PairTarget(sface, pair.query, pair.gallery)
    order = np.arange(pair.query.shape[0] * pair.query.shape[1])
    curve = S.restore_curve(target, pair.query, pair.original_in_query, order, steps=4)
    _, cosines = target.scores(np.stack([pair.query, pair.original_in_query]).astype(np.float32))
    assert curve.scores[0] == pytest.approx(cosines[0], abs=1e-5)
    assert curve.scores[-1] == pytest.approx(cosines[1], abs=1e-5)
    assert curve.scores[-1] > curve.scores[0]  # the original is closer to itself


def test_contrast_puts_its_negative_mass_on_the_swapped_region(result):
    res, _ = result
    lifts = [s.lift for s in res.scores if s.method == "contrast"]
    assert len(lifts) == len(PHOTOS) * len(REGIONS)
    assert np.mean(lifts) > 2, lifts
    assert res.summary["contrast"]["mean"]["lift"] > 2
    # The control: the same maps put far less of their mass on the regions left alone.
    assert res.summary["contrast"]["mean"]["off_lift"] < 0.5 * res.summary["contrast"]["mean"]["lift"]
    assert res.summary["contrast"]["mean"]["passes"] == 0  # batched: the pair's 2 encodes


def test_report_has_a_row_per_method_and_a_column_per_region(result, pairs, tmp_path):
    res, maps = result
    md = S.swap_markdown(res)
    for name in ("contrast", "similarity", "random order", "eyes lift / pointing",
                 "mouth lift / pointing"):
        assert name in md
    path = S.plot_examples(pairs, maps, res.methods, tmp_path / "swap_examples.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_json_markdown_and_examples(photo_paths, tmp_path, monkeypatch, capsys):
    from server.cli import main

    folder = tmp_path / "photos"
    people = (("a", "person_a_1.jpg"), ("a", "person_a_2.jpg"), ("g", "grace_hopper.jpg"))
    for person, name in people:
        (folder / person).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo_paths[name], folder / person / name)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["phenolens", "evaluate", "swap"])
    assert main(["evaluate", "swap", "--photos", str(folder), "--out", str(out),
                 "--methods", "contrast", "--regions", "nose", "--steps", "2"]) == 0
    data = json.loads((out / "swap.json").read_text())["result"]
    donors = {(p["target"], p["donor"]) for p in data["pairs"]}
    assert all(t.split("/")[0] != d.split("/")[0] for t, d in donors)  # never the same person
    assert len(data["pairs"]) == 3 and "contrast" in data["summary"]
    assert "| contrast |" in (out / "swap.md").read_text()
    assert (out / "swap_examples.png").stat().st_size > 0


def test_the_research_variants_score_the_shipped_map_as_the_protocol_does(sface, pairs, result):
    """research.contrast_variants must measure the product: its shipped variant and
    placement give the protocol's own contrast scores, and the other variant a different
    map."""
    from research.contrast_variants import score_pairs, table

    scores = score_pairs(sface, pairs, offset=1)
    shipped = [s for s in scores if (s.variant, s.placement) == ("query-jacobian", "changes")]
    protocol = [s for s in result[0].scores if s.method == "contrast"]
    assert len(shipped) == len(protocol) == len(pairs)
    for mine, theirs in zip(shipped, protocol, strict=True):
        assert mine.region == theirs.region
        assert mine.lift == pytest.approx(theirs.lift, rel=1e-4)
        assert mine.pointing == theirs.pointing
        assert mine.off_lift == pytest.approx(theirs.off_lift, rel=1e-4)
    own = [s.lift for s in scores if (s.variant, s.placement) == ("own-jacobians", "changes")]
    assert own != [s.lift for s in shipped]
    rows = [line for line in table(scores, "test").splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[:2] for r in rows[1:]] == [  # the header, then a row per variant × drawing
        ["| query-jacobian", "changes"], ["| query-jacobian", "peak"],
        ["| query-jacobian", "grid"], ["| own-jacobians", "changes"],
        ["| own-jacobians", "peak"], ["| own-jacobians", "grid"]]


def test_photo_variants_give_one_folder_per_person_that_the_protocol_reads(tmp_path, photo_paths):
    from research.photo_variants import ALTERATIONS, write_variants

    chosen = {photo_paths["person_a_1.jpg"]: "person_a", photo_paths["impostor_1.jpg"]: "impostor_1"}
    written = write_variants(chosen, tmp_path)
    assert len(written) == 2 * len(ALTERATIONS)
    photos, skipped = S.load_photos(tmp_path)
    assert not skipped
    assert sorted({p.person for p in photos}) == ["impostor_1", "person_a"]
    original = cv2.imread(str(photo_paths["person_a_1.jpg"]))
    mirrored = cv2.imread(str(tmp_path / "person_a" / "mirror_person_a_1.jpg"))
    # a JPEG of the mirror image, not a copy of the original
    assert np.abs(mirrored.astype(int) - original[:, ::-1].astype(int)).mean() < 3
    assert np.abs(mirrored.astype(int) - original.astype(int)).mean() > 10
    with pytest.raises(ValueError, match="cannot read"):
        write_variants({tmp_path / "person_a" / "missing.jpg": "x"}, tmp_path)
