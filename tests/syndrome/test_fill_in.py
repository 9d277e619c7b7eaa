"""Fill in the blanks on real SFace and real faces: masks, the update, limits."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from explain.attribution.engine import Explainer
from explain.attribution.views import SingleEncoderViews
from explain.errors import BudgetExceeded, Cancelled, InvalidOption
from explain.syndrome.fill_in import (
    FillIn,
    FillInOptions,
    FillInProgress,
    FillInResult,
    _differentiable_views,
    _inputs,
    progressive_masks,
    random_masks,
)
from explain.syndrome.maps import SyndromeExplainer

SMALL = FillInOptions(count=4, batch_size=4, patch=16, ratio=0.25, step=16.0)


@pytest.fixture(scope="module")
def explainer(sface):
    return Explainer(sface)


def test_random_masks_blank_the_asked_ratio_of_cells():
    masks = random_masks(20, (112, 112), patch=16, ratio=0.25, seed=3)
    assert masks.shape == (20, 112, 112) and masks.dtype == bool
    cells = masks[:, ::16, ::16]
    assert (cells.sum((1, 2)) == round(0.25 * 49)).all()
    assert not np.array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(masks, random_masks(20, (112, 112), patch=16, ratio=0.25, seed=3))


def test_progressive_masks_do_not_overlap_and_cover_every_pixel_once_per_round():
    masks = progressive_masks(8, (112, 112), patch=16, ratio=0.25, seed=0)
    np.testing.assert_array_equal(masks[:4].sum(0), 1)
    np.testing.assert_array_equal(masks[4:].sum(0), 1)
    assert not np.array_equal(masks[0], masks[4])


def test_pixel_inputs_reproduce_the_encoder_inputs_of_every_view(sface, crops):
    crop = crops["person_a_1.jpg"]
    explainer = Explainer(SingleEncoderViews(sface, flip=True))
    views = _differentiable_views(explainer, crop)
    for view, ref in zip(views, explainer.source.view_inputs(crop[None]), strict=True):
        built = _inputs(view, torch.from_numpy(crop[None].astype(np.float32)))
        assert torch.equal(built, ref.inputs)


def test_fill_in_update_raises_the_target_similarity(explainer, crops, group):
    stack, _ = group
    target = SyndromeExplainer(explainer).centroid(stack[:2])  # person_a
    events = list(FillIn(explainer).steps(crops["grace_hopper.jpg"], target, SMALL))
    assert isinstance(events[0], FillInProgress) and isinstance(events[-1], FillInResult)
    result = events[-1]
    c = result.consistency
    assert c.fraction_improved >= 0.75
    assert c.mean_gain > 0.005
    assert c.mean_gain > c.control_mean_gain + 0.005
    assert c.consistent
    # gradient only where masks fell; the shown update is thresholded to the strongest pixels
    assert (result.magnitude[result.coverage == 0] == 0).all()
    assert (np.abs(result.update).max(-1) > 0).mean() <= 0.25
    assert np.abs(result.update).max() == pytest.approx(SMALL.step, rel=1e-5)
    assert result.forward_passes == SMALL.cost(1)


def test_fill_in_refuses_a_plan_over_budget_and_stops_when_cancelled(explainer, crops, group):
    stack, _ = group
    target = SyndromeExplainer(explainer).centroid(stack[:1])
    fill = FillIn(explainer)
    with pytest.raises(BudgetExceeded, match="needs 14 forward passes"):
        fill.run(crops["grace_hopper.jpg"], target, SMALL, budget=13)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        fill.run(crops["grace_hopper.jpg"], target, SMALL, cancel=stop)
    with pytest.raises(InvalidOption):
        fill.run(crops["grace_hopper.jpg"], target, FillInOptions(masks="checkerboard"))
