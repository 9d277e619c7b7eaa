"""Region summaries of signed maps (explain.regions.region_summary)."""

from __future__ import annotations

import numpy as np
import pytest

from explain.regions import SUMMARY_REGIONS, region_summary, template_regions


def test_summary_regions_are_nonempty_and_inside_the_face():
    masks = template_regions((112, 112))
    for name in SUMMARY_REGIONS:
        assert masks[name].sum() > 100, name
        assert (masks[name] & masks["background"]).sum() < 0.1 * masks[name].sum(), name


def test_brows_lie_between_forehead_and_eyes_and_cheeks_between_eyes_and_mouth():
    masks = template_regions((112, 112))
    row = {n: np.nonzero(masks[n])[0].mean() for n in SUMMARY_REGIONS}
    assert row["forehead"] < row["brows"] < row["eyes"] < row["nose"] < row["mouth"] < row["chin"]
    assert row["eyes"] < row["cheeks"] < row["mouth"]
    assert row["brows"] < row["nasal_bridge"] < row["nose"]
    col = {n: np.nonzero(masks[n])[1].mean() for n in SUMMARY_REGIONS}
    assert abs(col["nasal_bridge"] - col["nose"]) < 2  # on the midline, between the eyes
    assert not (masks["nasal_bridge"] & (masks["eyes"] | masks["brows"] | masks["nose"])).any()


def test_the_nasal_bridge_is_named_with_a_space():
    masks = template_regions((112, 112))
    m = np.full((112, 112), 0.01)
    m[masks["nasal_bridge"]] = -1.0
    assert region_summary(m).describe(top=1).startswith("differs most: nasal bridge ")


def test_negative_mass_in_the_eyes_is_reported_as_differing_most_there():
    masks = template_regions((112, 112))
    m = np.full((112, 112), 0.01)
    m[masks["eyes"]] = -1.0
    m[masks["mouth"]] = -0.5
    s = region_summary(m)
    eyes, mouth = s.regions.index("eyes"), s.regions.index("mouth")
    expected_eyes = masks["eyes"].sum() / (masks["eyes"].sum() + 0.5 * masks["mouth"].sum())
    assert s.negative[eyes] == pytest.approx(expected_eyes)
    assert s.negative[eyes] + s.negative[mouth] == pytest.approx(1.0)
    assert s.describe() == (f"differs most: eyes {round(100 * s.negative[eyes])} %, "
                            f"mouth {round(100 * s.negative[mouth])} %")
    assert s.ranked("negative")[0][0] == "eyes"


def test_shares_add_up_to_at_most_one_even_where_masks_overlap():
    rng = np.random.default_rng(0)
    s = region_summary(rng.normal(size=(112, 112)))
    assert 0 < sum(s.positive) <= 1 + 1e-9
    assert 0 < sum(s.negative) <= 1 + 1e-9
    nose = SUMMARY_REGIONS.index("nose")
    assert s.to_json()["nose"] == {"positive": s.positive[nose], "negative": s.negative[nose]}


def test_a_feature_resolution_map_is_summarised_in_the_aligned_frame():
    coarse = np.zeros((7, 7))
    coarse[2, 1:3] = -1.0  # the cells over the left eye of the template
    s = region_summary(coarse, template_regions((112, 112)))
    assert s.ranked("negative", top=1)[0][0] in ("eyes", "brows")


def test_an_all_positive_map_differs_nowhere():
    s = region_summary(np.ones((112, 112)))
    assert sum(s.negative) == 0
    assert s.describe() == "differs most: nowhere in particular"


def test_a_sliver_of_negative_mass_is_not_called_the_place_that_differs():
    masks = template_regions((112, 112))
    m = np.ones((112, 112))
    y, x = np.argwhere(masks["cheeks"])[0]
    m[y, x] = -5.0  # 100 % of the negative mass, but 0.04 % of the map's
    s = region_summary(m)
    assert max(s.negative) > 0.9
    assert s.describe() == "differs most: nowhere in particular"
