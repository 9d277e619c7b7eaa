"""Region effects (explain.effects) on real SFace and real aligned faces."""

from __future__ import annotations

import numpy as np
import pytest

from explain.attribution.matches import explain_matches
from explain.effects import (
    EFFECT_REGIONS,
    OUTSIDE_FACE,
    KeptEdits,
    RegionEffects,
    SideEffects,
    edit_masks,
    edited_crops,
    effect_region_stack,
    forget_query_edits,
    mean_face,
    paste_region,
    region_effects,
    weighted_map,
)
from explain.errors import BudgetExceeded


@pytest.fixture(scope="module")
def neutral(crops) -> np.ndarray:
    return mean_face(np.stack(list(crops.values())))


@pytest.fixture(autouse=True)
def _no_kept_query_edits():
    """Each test counts its own passes: no query's neutral edits kept from another test."""
    forget_query_edits()
    yield
    forget_query_edits()


def test_words_name_regions_by_effect_and_skip_the_noise():
    side = SideEffects(EFFECT_REGIONS,
                       differs=(0.12, 0.004, 0, 0, 0.04, 0, 0, 0, 0.3),
                       alike=(-0.02, 0, 0, -0.05, 0.003, 0, -0.009, 0, -0.01))
    assert side.ranked("differs") == (("eyes", 0.12), ("mouth", 0.04))
    assert side.ranked("alike") == (("nose", -0.05), ("eyes", -0.02))
    assert side.describe() == ("differs most: eyes (+0.12), mouth (+0.04) · "
                               "alike most: nose (\u22120.05), eyes (\u22120.02)")
    assert not side.leans_on_outside()
    leaning = SideEffects(EFFECT_REGIONS, (0,) * 9, (-0.02,) + (0,) * 7 + (-0.2,))
    assert leaning.leans_on_outside()
    assert leaning.describe().endswith("leans on hair/background (\u22120.20)")
    quiet = SideEffects(EFFECT_REGIONS, (0.005,) * 9, (-0.005,) * 9)
    assert quiet.describe().startswith("differs: no facial region moves the match by 0.01")


def test_client_words_are_the_servers():
    from phenolens.results import FaceEffects, RegionEffect

    rng = np.random.default_rng(3)
    for _ in range(20):
        d, a = rng.normal(0, 0.05, 9), rng.normal(0, 0.05, 9)
        server = SideEffects(EFFECT_REGIONS, tuple(d), tuple(a))
        client = FaceEffects("query", tuple(RegionEffect(r, float(x), float(y))
                                            for r, x, y in zip(EFFECT_REGIONS, d, a, strict=True)))
        assert client.describe() == server.describe()
        assert client.leans_on_outside() == server.leans_on_outside()


def test_edit_masks_are_disjoint_before_feathering_and_cover_the_crop():
    masks = edit_masks((112, 112))
    assert masks.regions == EFFECT_REGIONS
    hard = masks.colour.sum(0)  # grown masks overlap; the feathered alphas stay in 0..1
    assert hard.max() >= 2 and masks.alpha.min() >= 0 and masks.alpha.max() <= 1
    cells = masks.cells((14, 14))
    assert cells.shape == (len(EFFECT_REGIONS), 14, 14)
    eyes = EFFECT_REGIONS.index("eyes")
    assert cells[eyes, 5:8].sum() > 0.9 * cells[eyes].sum()  # the eye line, rows 5-7


def test_pasting_a_face_into_itself_changes_nothing(crops):
    crop = crops["person_a_1.jpg"]
    masks = edit_masks((112, 112))
    same = edited_crops(crop, crop, masks)
    assert np.abs(same.astype(int) - crop[None].astype(int)).max() <= 1


def test_a_face_against_itself_has_no_differs_effect(explainer, crops, neutral):
    features = explainer.encode(crops["person_b_1.jpg"])
    (pair,) = region_effects(explainer, features, features, neutral=neutral)
    assert pair.cosine == pytest.approx(1.0, abs=1e-5)
    assert max(abs(v) for v in pair.query.differs + pair.gallery.differs) < 0.01
    assert min(pair.query.alike) < -0.02  # a neutral region does lower a perfect match


@pytest.mark.parametrize("region", ["eyes", "mouth"])
def test_the_region_that_was_swapped_differs_most(flip_explainer, crops, neutral, region):
    """The gallery face is the query with one region of another person pasted in: giving
    the query that region back must gain the most, close to all of 1 − cosine."""
    query = crops["person_b_1.jpg"]
    masks = edit_masks((112, 112))
    i = masks.regions.index(region)
    # the donor must change the match: impostor_1's mouth moved it by 0.01 on these crops
    swapped = paste_region(query, crops["grace_hopper.jpg"], masks.alpha[i], masks.colour[i])
    q, g = flip_explainer.encode(query), flip_explainer.encode(swapped)
    (pair,) = region_effects(flip_explainer, q, g, neutral=neutral)
    assert pair.cosine < 0.97
    assert pair.query.ranked("differs", top=1)[0][0] == region
    assert pair.gallery.ranked("differs", top=1)[0][0] == region
    assert pair.query.differs[i] > 0.8 * (1 - pair.cosine)


def test_pixel_effects_average_the_views_like_the_cosine(flip_explainer, crops, neutral):
    q = flip_explainer.encode(crops["person_a_1.jpg"])
    g = flip_explainer.encode(np.stack([crops["person_a_2.jpg"], crops["impostor_1.jpg"]]))
    pairs = region_effects(flip_explainer, q, g, neutral=neutral)
    engine = flip_explainer.explain(q, g)
    for pair, exp in zip(pairs, engine, strict=True):
        assert pair.cosine == pytest.approx(exp.cosine, abs=1e-5)
        assert len(pair.query.differs) == len(EFFECT_REGIONS)
    # the same person leans on the face more than an impostor does
    assert min(pairs[0].query.alike) < min(pairs[1].query.alike)


def test_the_query_neutral_edits_are_made_once_for_all_hits(explainer, crops, neutral):
    from explain.limits import Guard

    q = explainer.encode(crops["person_a_1.jpg"])
    g = explainer.encode(np.stack([crops["person_a_2.jpg"], crops["impostor_1.jpg"]]))
    guard = Guard()
    effects = RegionEffects(explainer, q, neutral=neutral, guard=guard)
    first = effects.of(g.select(0))
    used = guard.used
    second = effects.of(g.select(1))
    regions = len(EFFECT_REGIONS)
    assert used == 4 * regions and guard.used - used == 3 * regions
    together = region_effects(explainer, q, g, neutral=neutral)
    np.testing.assert_allclose(together[0].query.alike, first[0].query.alike, atol=1e-5)
    np.testing.assert_allclose(together[1].gallery.differs, second[0].gallery.differs, atol=1e-5)


def test_feature_mode_gives_the_same_shape_of_answer(explainer, crops, neutral):
    q = explainer.encode(crops["person_a_1.jpg"])
    g = explainer.encode(crops["person_a_2.jpg"])
    (pixels,) = region_effects(explainer, q, g, neutral=neutral, mode="pixels")
    (features,) = region_effects(explainer, q, g, neutral=neutral, mode="features")
    assert features.mode == "features" and pixels.mode == "pixels"
    assert features.cosine == pytest.approx(pixels.cosine)
    assert features.query.regions == pixels.query.regions
    outside = EFFECT_REGIONS.index(OUTSIDE_FACE)
    assert features.query.alike[outside] < 0 and pixels.query.alike[outside] < 0


def test_effects_obey_the_budget(explainer, crops, neutral):
    q = explainer.encode(crops["person_a_1.jpg"])
    with pytest.raises(BudgetExceeded):
        list(explain_matches(explainer, q, explainer.encode(crops["person_a_2.jpg"]),
                             ["similarity"], effects=1, neutral=neutral, budget=10))


def test_explain_matches_measures_effects_for_the_first_hits_only(explainer, crops, neutral):
    q = crops["person_a_1.jpg"]
    hits = np.stack([crops["person_a_2.jpg"], crops["impostor_1.jpg"]])
    matches = list(explain_matches(explainer, q, hits, ["contrast"], effects=1,
                                   neutral=neutral))
    assert matches[0].effects is not None and matches[1].effects is None
    assert matches[0].effects.cosine == pytest.approx(matches[0].cosine, abs=1e-5)
    share = matches[0].contrast_share
    assert share is not None and 0.2 < share < 2.0  # a first-order estimate, stated as one


def test_a_contrast_figure_says_how_much_of_the_cosine_lost_its_sum_holds():
    from explain.render import sum_note

    assert "58 %" in sum_note("contrast", 0.58) and "first-order" in sum_note("contrast", 0.58)
    assert sum_note("similarity", 0.58) is None and sum_note("contrast", None) is None


def test_kept_neutral_edits_of_the_hits_are_not_made_again(explainer, crops, neutral):
    from explain.limits import Guard

    q = explainer.encode(crops["person_a_1.jpg"])
    g = explainer.encode(np.stack([crops["person_a_2.jpg"], crops["impostor_1.jpg"]]))
    kept = KeptEdits()
    cold, warm = Guard(), Guard()
    first = RegionEffects(explainer, q, neutral=neutral, guard=cold).of(g, kept)
    forget_query_edits()  # only the hits' edits are kept here (the query's: the test below)
    second = RegionEffects(explainer, q, neutral=neutral, guard=warm).of(g, kept)
    assert sorted(kept) == [0, 1]
    assert cold.used - warm.used == 2 * len(EFFECT_REGIONS)  # each hit's 9 neutral edits
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a.gallery.alike, b.gallery.alike, atol=1e-6)
        np.testing.assert_allclose(a.query.differs, b.query.differs, atol=1e-6)


def test_edits_through_early_windows_equal_whole_forwards(flip_explainer, crops, neutral):
    """The early layers run only around each region (``EarlySplit``): the same embeddings
    as encoding every edited crop whole."""
    q = flip_explainer.encode(crops["person_a_1.jpg"])
    g = flip_explainer.encode(crops["impostor_1.jpg"])
    effects = RegionEffects(flip_explainer, q, neutral=neutral, precision="fp32")
    splits = effects._splits()
    assert splits is not None  # SFace declares its early layers
    edited = np.concatenate([edited_crops(crops["person_a_1.jpg"], crops["impostor_1.jpg"],
                                          effects.masks),
                             edited_crops(crops["impostor_1.jpg"], neutral, effects.masks)])
    targets = np.repeat([0, 1], len(EFFECT_REGIONS))
    regions = np.tile(np.arange(len(EFFECT_REGIONS)), 2)
    windows = effects._encode_windows(edited, targets, regions, g, splits)
    whole = effects._encode(edited)
    for a, b in zip(windows, whole, strict=True):
        assert (a * b).sum(-1).min() > 1 - 1e-5


def test_a_weighted_map_carries_each_regions_effect_where_the_method_put_its_mass():
    stack = effect_region_stack((56, 56))
    rng = np.random.default_rng(0)
    drawn = rng.normal(size=(56, 56))
    values = np.linspace(0.12, -0.04, len(EFFECT_REGIONS))  # differs on most, alike on two
    weighted = weighted_map(drawn, values)
    for mask, value in zip(stack, values, strict=True):
        inside = weighted[mask]
        assert inside.sum() == pytest.approx(-value, abs=1e-5)
        if value == 0:
            assert not inside.any()
            continue
        # a region's mass has the effect's sign, and is heaviest where the map is strongest
        assert (-np.sign(value) * inside >= 0).all()
        strong = np.abs(drawn[mask]) > np.median(np.abs(drawn[mask]))
        assert np.abs(inside[strong]).mean() > 2 * np.abs(inside[~strong]).mean()
        assert np.abs(inside).min() > 0  # the floor: no pixel of the region left blank
    assert float(weighted[~stack.any(0)].sum()) == 0.0  # nothing outside every region


def test_a_region_the_map_leaves_empty_gets_its_effect_spread_evenly():
    stack = effect_region_stack((112, 112))
    eyes = EFFECT_REGIONS.index("eyes")
    values = np.zeros(len(EFFECT_REGIONS))
    values[eyes] = 0.1
    weighted = weighted_map(np.ones((112, 112)), values)  # no negative mass anywhere
    inside = weighted[stack[eyes]]
    assert inside.sum() == pytest.approx(-0.1, abs=1e-6)
    np.testing.assert_allclose(inside, inside[0], rtol=1e-5)
    assert not weighted[~stack[eyes]].any()


def test_pictures_of_a_match_with_effects_carry_its_effects_as_region_totals(explainer, crops,
                                                                            neutral):
    from server.present import drawn_maps

    hits = np.stack([crops["person_a_2.jpg"], crops["impostor_1.jpg"]])
    measured, plain = explain_matches(explainer, crops["person_a_1.jpg"], hits,
                                      ["contrast", "similarity", "gradcam"], effects=1,
                                      neutral=neutral)
    for m in measured.maps:
        q_drawn, g_drawn, note = drawn_maps(measured, m)
        if m.method == "gradcam":  # no kind of effect weighs it: drawn as it is
            np.testing.assert_array_equal(q_drawn, m.query_aligned)
            continue
        kind = "differs" if m.method == "contrast" else "alike"
        stack = effect_region_stack(q_drawn.shape)
        for drawn, side in ((q_drawn, measured.effects.query),
                            (g_drawn, measured.effects.gallery)):
            values = side.differs if kind == "differs" else side.alike
            np.testing.assert_allclose([drawn[r].sum() for r in stack], -np.asarray(values),
                                       atol=1e-4)
        assert "measured effects" in note
    for m in plain.maps:  # no effects measured: the method's own maps and sum note
        q_drawn, _, note = drawn_maps(plain, m)
        np.testing.assert_array_equal(q_drawn, m.query_aligned)
        assert note is None or "first-order" in note


def test_neutral_edits_made_apart_are_the_ones_the_effects_use(explainer, crops, neutral):
    from explain.effects import neutral_edits

    q = explainer.encode(crops["person_a_1.jpg"])
    g = explainer.encode(np.stack([crops["person_a_2.jpg"], crops["impostor_1.jpg"]]))
    apart = neutral_edits(explainer, g, neutral=neutral)
    kept = KeptEdits(enumerate(apart))
    with_kept = RegionEffects(explainer, q, neutral=neutral).of(g, kept)
    fresh = RegionEffects(explainer, q, neutral=neutral).of(g)
    assert len(apart) == 2 and apart[0][0].shape == (len(EFFECT_REGIONS), 128)
    for a, b in zip(with_kept, fresh, strict=True):
        np.testing.assert_allclose(a.gallery.alike, b.gallery.alike, atol=1e-4)


def test_served_edits_equal_float32_whole_crop_edits(flip_explainer, crops, neutral):
    """The served path (bf16, early layers in windows, both views in one pass) measures the
    effects of float32 forwards of the whole edited crops, up to bf16 rounding."""
    q = flip_explainer.encode(crops["person_a_1.jpg"])
    g = flip_explainer.encode(np.stack([crops["person_a_2.jpg"], crops["impostor_1.jpg"]]))
    served = RegionEffects(flip_explainer, q, neutral=neutral).of(g)
    whole = RegionEffects(flip_explainer, q, neutral=neutral, precision="fp32")
    whole._splits = lambda: None  # every edited crop through the whole encoder
    for a, b in zip(served, whole.of(g), strict=True):
        for side in ("query", "gallery"):
            for kind in ("differs", "alike"):
                np.testing.assert_allclose(getattr(a.side(side), kind),
                                           getattr(b.side(side), kind), atol=0.005)


def test_a_querys_neutral_edits_are_kept_by_its_pixels(explainer, crops, neutral):
    """Match, Explain and the report of one photo make its neutral edits once: a second
    call with the same query pixels (a new FaceFeatures) makes only the pair edits."""
    from explain.limits import Guard

    g = explainer.encode(crops["person_a_2.jpg"])
    first, second, other = Guard(), Guard(), Guard()
    a = RegionEffects(explainer, explainer.encode(crops["person_a_1.jpg"]), neutral=neutral,
                      guard=first).of(g)
    b = RegionEffects(explainer, explainer.encode(crops["person_a_1.jpg"].copy()),
                      neutral=neutral, guard=second).of(g)
    regions = len(EFFECT_REGIONS)
    assert first.used == 4 * regions and second.used == 3 * regions
    np.testing.assert_allclose(a[0].query.alike, b[0].query.alike, atol=1e-6)
    # another query, or the same one against another neutral face, makes its own
    RegionEffects(explainer, explainer.encode(crops["impostor_1.jpg"]), neutral=neutral,
                  guard=other).of(g)
    assert other.used == 4 * regions
    again = Guard()
    RegionEffects(explainer, explainer.encode(crops["person_a_1.jpg"]),
                  neutral=neutral[:, ::-1].copy(), guard=again).of(g)
    assert again.used == 4 * regions
