"""xSSAB and CorrRISE, the field's face-verification explainers, on real SFace and real faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from explain.attribution.matches import METHODS
from explain.attribution.methods import attribute
from explain.attribution.verification import correlation_map, patch_masks
from explain.errors import Cancelled, InvalidOption
from explain.limits import DEFAULT_BUDGET
from tests.explain.swaps import chance_lift, swapped_crop

SMALL_CORRRISE = {"masks": 48, "batch_size": 16}


@pytest.mark.parametrize("method", ["xssab", "corrrise"])
def test_both_faces_get_finite_signed_crop_sized_maps(explainer, query_crop, hit_crops, method):
    options = SMALL_CORRRISE if method == "corrrise" else {}
    result = attribute(method, explainer, query_crop, hit_crops[2], **options)
    for side in (result.query, result.gallery):
        assert side.shape == (112, 112)
        assert np.isfinite(side).all()
        assert side.min() < 0 < side.max()
    assert result.resolution == "pixel"
    assert result.forward_passes == 2 + 2 * (2 if method == "xssab" else 48)


def test_corrrise_is_deterministic_for_a_seed_and_changes_with_it(explainer, query_crop, hit_crops):
    def run(seed: int) -> np.ndarray:
        return attribute("corrrise", explainer,
            query_crop, hit_crops[1], sides=("query",), seed=seed, masks=16, batch_size=8
        ).query

    first, again, other = run(3), run(3), run(4)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.05


def test_xssab_is_deterministic(explainer, query_crop, hit_crops):
    a = attribute("xssab", explainer, query_crop, hit_crops[1], sides=("query",)).query
    b = attribute("xssab", explainer, query_crop, hit_crops[1], sides=("query",)).query
    np.testing.assert_array_equal(a, b)


def test_xssab_splits_the_cosine_gradient_at_the_threshold(sface, explainer, query_crop, hit_crops):
    """Every argument positive: the map is |∂s/∂x| channel-summed; every one negative: its negative."""
    x = sface.preprocess(query_crop).requires_grad_(True)
    with torch.no_grad():
        eg = sface(sface.preprocess(hit_crops[0]))[0]
    eq = sface(x)[0]
    (grad,) = torch.autograd.grad(eq @ (eg / eg.norm()) / eq.norm(), x)
    expected = grad[0].abs().sum(0).numpy()

    def xssab(threshold: float) -> np.ndarray:
        return attribute("xssab", explainer,
            query_crop, hit_crops[0], sides=("query",), threshold=threshold
        ).query

    np.testing.assert_allclose(xssab(-1e9), expected, rtol=1e-4, atol=1e-7 * expected.max())
    np.testing.assert_allclose(xssab(1e9), -expected, rtol=1e-4, atol=1e-7 * expected.max())
    mixed = xssab(0.363)
    assert mixed.min() < 0 < mixed.max()


def test_correlation_map_is_pearson_per_pixel_and_rank_makes_it_spearman():
    gen = torch.Generator().manual_seed(0)
    keep = patch_masks(64, (12, 10), patches=2, patch=4, generator=gen)
    scores = torch.rand(64, generator=gen) ** 3
    got = correlation_map(keep, scores).numpy()
    ranks = scores.argsort().argsort().float()
    got_rank = correlation_map(keep, ranks).numpy()
    k, s = keep.numpy(), scores.numpy()
    for y, x in ((0, 0), (5, 4), (11, 9), (6, 0)):
        if k[:, y, x].std() == 0:
            assert got[y, x] == 0
            continue
        assert got[y, x] == pytest.approx(pearsonr(k[:, y, x], s)[0], abs=1e-5)
        assert got_rank[y, x] == pytest.approx(spearmanr(k[:, y, x], s)[0], abs=1e-5)


def test_patch_masks_black_out_whole_patches_inside_the_crop():
    keep = patch_masks(200, (112, 112), patches=3, patch=30, generator=torch.Generator().manual_seed(1))
    black = (keep == 0).sum(dim=(1, 2))
    assert keep.shape == (200, 112, 112)
    assert set(torch.unique(keep).tolist()) == {0.0, 1.0}
    assert int(black.min()) >= 30 * 30 and int(black.max()) <= 3 * 30 * 30
    # origins uniform in [0, 112 - 30]: the centre is hidden by one patch with p = (30/83)^2
    hidden_centre = float((keep[:, 56, 56] == 0).float().mean())
    assert hidden_centre == pytest.approx(1 - (1 - (30 / 83) ** 2) ** 3, abs=0.1)


def test_defaults_fit_the_default_budget_with_the_servers_two_views(
    flip_explainer, query_crop, hit_crops
):
    """Both sides, orig+flip views: the plan is checked before the method runs (BudgetExceeded
    would come first); the call is then cancelled at its first batch so the test stays short."""
    for method in ("xssab", "corrrise"):
        polls = []

        def cancel_at_first_batch(polls=polls) -> bool:
            polls.append(1)
            return len(polls) > 1

        with pytest.raises(Cancelled):
            attribute(method, flip_explainer, query_crop, hit_crops[0], budget=DEFAULT_BUDGET,
                                    cancel=cancel_at_first_batch)
        assert len(polls) == 2
    assert METHODS["corrrise"].defaults["batch_size"] <= 32


def test_corrrise_is_cancelled_between_batches(explainer, query_crop, hit_crops):
    polls = []

    def cancel_after_three_batches() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(Cancelled):
        attribute("corrrise", explainer, query_crop, hit_crops[0], sides=("query",),
                            cancel=cancel_after_three_batches, masks=64, batch_size=8)
    assert len(polls) == 4  # the encode, two batches, then the stop


def test_bad_corrrise_options_are_typed_errors(explainer, query_crop, hit_crops):
    with pytest.raises(InvalidOption):
        attribute("corrrise", explainer, query_crop, hit_crops[0], patch=200)
    with pytest.raises(InvalidOption):
        attribute("corrrise", explainer, query_crop, hit_crops[0], batch_size=64)


def _positive_share(amap: np.ndarray) -> float:
    return float(np.clip(amap, 0, None).sum() / np.abs(amap).sum())


def test_xssab_gives_same_person_pairs_more_positive_mass_than_other_people(explainer, crops):
    """The paper's premise: the agreeing arguments dominate a genuine pair's map."""

    def share(a: str, b: str) -> float:
        result = attribute("xssab", explainer, crops[a], crops[b])
        return min(_positive_share(result.query), _positive_share(result.gallery))

    genuine = [share("person_a_1.jpg", "person_a_2.jpg"), share("person_b_1.jpg", "person_b_2.jpg")]
    impostor = [share("person_a_1.jpg", "impostor_1.jpg"), share("person_b_1.jpg", "impostor_2.jpg")]
    assert min(genuine) > 0.5 > max(impostor)


@pytest.mark.parametrize(
    ("region", "name", "donor"),
    [("eyes", "person_a_1.jpg", "impostor_1.jpg"), ("mouth", "person_b_1.jpg", "grace_hopper.jpg")],
)
def test_corrrise_puts_negative_mass_on_a_region_taken_from_another_face(
    explainer, faces, region, name, donor
):
    swapped, mask = swapped_crop(faces, name, donor, region)
    result = attribute("corrrise", explainer,
        swapped, faces[name].crop, sides=("query",), masks=64, batch_size=32
    )
    assert chance_lift(result.query, mask) > 1.5
