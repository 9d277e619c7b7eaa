"""The attribution family on real SFace and real faces: shapes, budgets, limits, hooks, threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from explain.attribution.matches import METHODS, attribute
from explain.errors import (
    BudgetExceeded,
    Cancelled,
    InvalidOption,
    TimeLimitExceeded,
    UnknownMethod,
)

# Small but real settings: every method runs in a few forward passes here.
SMALL = {
    "scorecam": {"channels": 6},
    "occlusion": {"patch": 28, "stride": 28},
    "rise": {"masks": 12, "batch_size": 12},
    "integrated_gradients": {"steps": 4},
    "smoothgrad": {"samples": 3},
    "corrrise": {"masks": 12, "batch_size": 12},
}
BUDGET = 40


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_gives_a_finite_map_of_its_resolution_within_budget(
    explainer, query_crop, hit_crops, method
):
    cam = METHODS[method].resolution == "feature"
    sides = ("query", "gallery") if cam else ("query",)
    result = attribute(method, explainer, query_crop, hit_crops[0], budget=BUDGET, sides=sides, **SMALL.get(method, {})
    )
    shape = ((14, 14) if method == "contrast" else (7, 7)) if cam else (112, 112)
    assert result.query.shape == shape
    assert result.query_aligned.shape == (112, 112)
    assert np.isfinite(result.query).all() and np.abs(result.query).max() > 0
    assert result.forward_passes <= BUDGET
    assert (result.gallery is not None) == cam
    assert 0.3 < result.cosine < 1.0


def test_gradcam_and_similarity_methods_equal_the_engine_maps(explainer, pairs, query_crop, hit_crops):
    cam = attribute("gradcam", explainer, query_crop, hit_crops[0])
    sim = attribute("similarity", explainer, query_crop, hit_crops[0])
    np.testing.assert_allclose(cam.query, pairs[0].query.gradcam, atol=1e-5)
    np.testing.assert_allclose(cam.gallery, pairs[0].gallery.gradcam, atol=1e-5)
    np.testing.assert_allclose(sim.gallery, pairs[0].gallery.similarity, atol=1e-5)
    assert cam.forward_passes == 2


def test_deeplift_with_prelu_rule_sums_to_the_target_change(sface, explainer, query_crop, hit_crops):
    """Summation to delta holds only if every PReLU gets the Rescale rule."""
    result = attribute("deeplift", explainer, query_crop, hit_crops[0], sides=("query",))
    with torch.no_grad():
        x = sface.preprocess(query_crop)
        eq, eg = sface(x)[0], sface(sface.preprocess(hit_crops[0]))[0]
        black = sface(torch.full_like(x, -sface.spec.mean / sface.spec.std))[0]
    ug = eg / eg.norm()
    delta = float((eq - black) @ ug / eq.norm())
    assert abs(float(result.query.sum()) - delta) <= 1e-3 * max(1.0, abs(delta))


def test_occlusion_defaults_to_ten_pixel_black_patches():
    assert METHODS["occlusion"].defaults["patch"] == 10
    assert METHODS["occlusion"].defaults["stride"] == 10


def test_a_method_over_budget_is_refused_before_it_runs(explainer, query_crop, hit_crops):
    with pytest.raises(BudgetExceeded, match="121|122|123|forward passes"):
        attribute("occlusion", explainer, query_crop, hit_crops[0], budget=50)


def test_a_tiny_time_limit_raises_time_limit_exceeded(explainer, query_crop, hit_crops):
    with pytest.raises(TimeLimitExceeded):
        attribute("rise", explainer, query_crop, hit_crops[0], time_limit=1e-6, masks=8)


def test_a_set_cancel_event_stops_the_call(explainer, query_crop, hit_crops):
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        attribute("occlusion", explainer, query_crop, hit_crops[0], cancel=event)


def test_cancellation_is_polled_inside_a_running_method(explainer, query_crop, hit_crops):
    polls = []

    def cancel_after_three_batches() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(Cancelled):
        attribute("rise", explainer, query_crop, hit_crops[0], cancel=cancel_after_three_batches,
                            masks=64, batch_size=4, sides=("query",))
    assert len(polls) == 4


def test_unknown_method_and_option_are_typed_errors(explainer, query_crop, hit_crops):
    with pytest.raises(UnknownMethod):
        attribute("lime", explainer, query_crop, hit_crops[0])
    with pytest.raises(InvalidOption):
        attribute("occlusion", explainer, query_crop, hit_crops[0], window=5)
    with pytest.raises(InvalidOption):
        attribute("gradcam", explainer, query_crop, hit_crops[0], sides=("left",))


def test_maps_are_signed_unless_relu_abs_or_normalise_is_asked(explainer, query_crop, hit_crops):
    raw = attribute("similarity", explainer, query_crop, hit_crops[2])
    assert raw.query.min() < 0 < raw.query.max()  # an impostor: some cells push apart
    relu = attribute("similarity", explainer, query_crop, hit_crops[2], relu=True)
    np.testing.assert_allclose(relu.query, np.maximum(raw.query, 0), atol=1e-7)
    norm = attribute("similarity", explainer, query_crop, hit_crops[2], normalise=True)
    assert abs(np.abs(norm.query).max() - 1.0) < 1e-6
    np.testing.assert_allclose(norm.query * np.abs(raw.query).max(), raw.query, atol=1e-6)
    absolute = attribute("similarity", explainer, query_crop, hit_crops[2], absolute=True)
    np.testing.assert_allclose(absolute.query, np.abs(raw.query), atol=1e-7)


def _hooks(module: torch.nn.Module) -> int:
    count = 0
    for m in module.modules():
        count += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        count += len(getattr(m, "_backward_pre_hooks", {}))
        assert not hasattr(m, "input_ref") and not hasattr(m, "output")
    return count


def test_no_hook_or_buffer_remains_on_the_model_after_calls(sface, explainer, query_crop, hit_crops):
    before = _hooks(sface)
    buffers = {k: v.clone() for k, v in sface.state_dict().items()}
    for method in ("guided_backprop", "deeplift", "saliency", "gradcam", "scorecam"):
        attribute(method, explainer, query_crop, hit_crops[1], sides=("query",),
                            **SMALL.get(method, {}))
    explainer.explain(query_crop, hit_crops)
    assert _hooks(sface) == before == 0
    after = sface.state_dict()
    assert buffers.keys() == after.keys()
    assert all(torch.equal(buffers[k], after[k]) for k in buffers)


def _work(explainer, query_crop, hit_features, hit_crops, k):
    """One forward (the query), the batched maps, and a hooked method on a private copy."""
    pair = explainer.explain(query_crop, hit_features)[k % len(hit_features)]
    method = "guided_backprop" if k % 2 else "occlusion"
    other = attribute(method, explainer, query_crop, hit_crops[k % 2], sides=("query",),
                                patch=56, stride=56) if method == "occlusion" else \
        attribute(method, explainer, query_crop, hit_crops[k % 2], sides=("query",))
    return pair.query.similarity, pair.gallery.gradcam, other.query


def test_eight_threads_get_exactly_the_maps_of_serial_calls(
    explainer, query_crop, hit_features, hit_crops
):
    args = (explainer, query_crop, hit_features, hit_crops)
    serial = [_work(*args, k) for k in range(8)]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda k: _work(*args, k), range(8)))
    for a, b in zip(serial, threaded, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
