"""``contrast``: what differs between two faces, on both faces, at the encoder's finer layer."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from explain.attribution.contrast import change_weights, contrast_maps
from explain.attribution.matches import METHODS, explain_matches
from explain.attribution.methods import attribute
from explain.attribution.placement import grid_placement, place, placement, spread
from explain.errors import BudgetExceeded
from explain.limits import DEFAULT_BUDGET
from tests.explain.swaps import chance_lift, swapped_crop


def test_contrast_sums_to_the_similarity_lost_minus_a_bias_share_computed_forward(
    sface, query_features, hit_features
):
    """Σ_p c_q(p) = <J_q A_q, ê_g − ê_q>/‖e_q‖ and Σ_p c_g(p) = <J_q A_g, ê_q − ê_g>/‖e_g‖:
    the K backward directions through the query's tail must agree with J_q A_q and J_q A_g
    computed independently by forward-mode autodiff at the query's activations."""
    fine_q, fine_g = query_features.fine_maps[0], hit_features.fine_maps[0]
    eq, eg = query_features.embeddings[0][0], hit_features.embeddings[0]
    maps = contrast_maps(sface, fine_q, eq, fine_g, eg)

    def embed(fine):
        return sface.head(sface.fine_to_features(fine))

    k = len(eg)
    with torch.no_grad():
        _, ja_q = torch.func.jvp(embed, (fine_q,), (fine_q,))  # (1, D)
        _, ja_g = torch.func.jvp(embed, (fine_q.expand(k, -1, -1, -1).clone(),),
                                   (fine_g,))  # (K, D)
    uq, ug = eq / eq.norm(), eg / eg.norm(dim=1, keepdim=True)
    expected_q = (ug - uq) @ ja_q[0] / eq.norm()
    expected_g = ((uq - ug) * ja_g).sum(1) / eg.norm(dim=1)
    torch.testing.assert_close(maps.self_query.sum((1, 2)), expected_q, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(maps.self_hits.sum((1, 2)), expected_g, atol=2e-4, rtol=1e-3)
    cos = ug @ uq
    torch.testing.assert_close(maps.maps.sum((1, 2)), cos - 1 - maps.bias_share)
    assert maps.maps.shape == (k, 14, 14)
    # The bias share is the propagated biases plus the hit's distance from the query's
    # linearisation: small beside the similarity lost.
    assert (maps.bias_share.abs() < (1 - cos).abs()).all()


def test_a_face_against_itself_has_nothing_that_differs(explainer, query_features):
    (pair,) = explainer.explain(query_features, query_features, maps=("contrast",))
    assert np.abs(pair.query.maps["contrast"]).max() < 1e-6
    assert pair.cosine == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("region", "donor"), [("eyes", "impostor_1.jpg"),
                                               ("mouth", "grace_hopper.jpg")])
def test_nearly_identical_faces_show_the_swapped_region_in_blue(explainer, faces, region, donor):
    """The similarity map of a face against itself with one region replaced is red almost
    everywhere; contrast puts its negative ("differs") mass on the replaced region."""
    name = "person_b_1.jpg"
    swapped, mask = swapped_crop(faces, name, donor, region)
    (result,) = explain_matches(explainer, swapped, faces[name].crop[None],
                                ("contrast", "similarity"))
    contrast_q = result["contrast"].query_aligned
    contrast_g = result["contrast"].gallery_aligned
    similarity = result["similarity"].query_aligned
    assert result.cosine > 0.5
    assert chance_lift(contrast_q, mask) > 4
    assert mask.ravel()[np.argmin(contrast_q)]  # the most negative pixel lies in it
    np.testing.assert_allclose(contrast_q, contrast_g)  # one map, on both aligned faces
    assert np.clip(-similarity, 0, None).sum() < 0.25 * np.clip(similarity, 0, None).sum()


def test_the_drawn_map_keeps_the_sum_rule_and_gives_unchanged_pixels_nothing(explainer, faces):
    """Each cell's value is divided among the pixels where the crops differ: the drawn map
    sums to the cell map, and pixels identical in both crops (beyond the blur of the change
    weights) get almost nothing, unlike a bilinear drawing of the same cells."""
    name = "person_b_1.jpg"
    swapped, mask = swapped_crop(faces, name, "impostor_1.jpg", "eyes")
    q, g = explainer.encode(swapped), explainer.encode(faces[name].crop[None])
    (pair,) = explainer.explain(q, g, maps=("contrast",))
    cells, drawn = pair.query.maps["contrast"], pair.query.aligned["contrast"]
    assert drawn.sum() == pytest.approx(cells.sum(), rel=1e-4)
    far = ~cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)

    def far_share(m: np.ndarray) -> float:
        return float(np.abs(m[far]).sum() / np.abs(m).sum())

    where = placement(q.encoders[0], cells.shape)
    bilinear = place(torch.as_tensor(cells)[None], where, drawn.shape)[0].numpy()
    # 87 % of the crop lies 3 px or more from the swapped eyes; measured: 9.5 % of the drawn
    # map's mass there, 26 % of the bilinear drawing's
    assert far_share(drawn) < 0.15
    assert far_share(bilinear) > 2 * far_share(drawn)


def test_without_crops_contrast_is_drawn_at_the_cells_receptive_field_peaks(
        explainer, query_features, hit_features):
    bare_q = dataclasses.replace(query_features, crops=None)
    bare_g = dataclasses.replace(hit_features, crops=None)
    (pair,) = explainer.explain(bare_q, bare_g.select(0), maps=("contrast",))
    cells = torch.as_tensor(pair.query.maps["contrast"])
    where = placement(query_features.encoders[0], tuple(cells.shape))
    expected = place(cells[None], where, query_features.crop_size)[0].numpy()
    np.testing.assert_allclose(pair.query.aligned["contrast"], expected, atol=1e-7)


def test_change_weights_ignore_exposure_and_are_zero_where_the_crops_agree(query_crop):
    same = change_weights(query_crop, query_crop[None])
    assert float(same.abs().max()) == 0.0
    darker = np.clip(query_crop.astype(np.float32) * 0.7 + 20, 0, 255).astype(np.uint8)
    patched = query_crop.copy()
    patched[40:60, 30:50] = 255 - patched[40:60, 30:50]
    exposure, patch = change_weights(query_crop, np.stack([darker, patched]))
    assert float(exposure.mean()) < 0.1 * float(patch.mean())  # a global change is no difference
    assert float(patch[40:60, 30:50].mean()) > 20 * float(patch[90:, 80:].mean() + 1e-6)


def test_spread_divides_each_cell_among_weighted_pixels_only():
    maps = torch.zeros(3, 14, 14, dtype=torch.float64)
    maps[:, 4:9, 3:8] = torch.randn(3, 5, 5, dtype=torch.float64)  # cells centred in the block
    weights = torch.zeros(3, 112, 112, dtype=torch.float64)
    weights[:, 30:70, 20:60] = torch.rand(3, 40, 40, dtype=torch.float64)
    where = grid_placement((14, 14), (112, 112))
    out = spread(maps, where, (112, 112), weights)
    torch.testing.assert_close(out.sum((1, 2)), maps.sum((1, 2)))
    inside = torch.zeros(112, 112, dtype=torch.bool)
    inside[30:70, 20:60] = True
    # only the floor (1 % of the mean weight) reaches the unweighted pixels
    assert float(out[:, ~inside].abs().sum()) < 0.2 * float(out.abs().sum())
    uniform = spread(maps, where, (112, 112), torch.ones(3, 112, 112, dtype=torch.float64))
    torch.testing.assert_close(uniform.sum((1, 2)), maps.sum((1, 2)))
    assert float(uniform[:, ~inside].abs().sum()) > 0.2 * float(uniform.abs().sum())
    # under uniform weights one cell stays near its centre: a Gaussian of one grid step
    # (8 px here) puts ~95 % of it within two steps (the crop's edge cuts little at (6, 6))
    single = torch.zeros(1, 14, 14, dtype=torch.float64)
    single[0, 6, 6] = 1.0
    alone = spread(single, where, (112, 112), torch.ones(1, 112, 112, dtype=torch.float64))[0]
    centre = 6 * 8 + 3.5
    near = alone[int(centre - 16):int(centre + 17), int(centre - 16):int(centre + 17)]
    assert 0.85 < float(near.sum()) < 0.97
    wide = spread(single, where, (112, 112), torch.ones(1, 112, 112, dtype=torch.float64),
                  width=2.0)[0]
    assert float(wide[int(centre - 16):int(centre + 17),
                      int(centre - 16):int(centre + 17)].sum()) < 0.6


def test_the_family_call_equals_the_batched_top_k_maps(explainer, query_features, hit_features):
    batched = list(explain_matches(explainer, query_features, hit_features, ("contrast",)))
    for k, match in enumerate(batched):
        single = attribute("contrast", explainer, query_features, hit_features.select(k))
        np.testing.assert_allclose(single.query, match["contrast"].query, atol=1e-6)
        np.testing.assert_allclose(single.gallery_aligned, match["contrast"].gallery_aligned,
                                   atol=1e-6)
        assert single.forward_passes == 0


def test_top_k_contrast_runs_the_query_tail_back_once_and_no_tail_forward(
        sface, explainer, query_features, hit_features, monkeypatch):
    """K directions back through the query's tail in one call, with the gains its encode
    recorded: no tail runs forward again, the query's or a hit's."""
    calls, forwards = [], []
    fine_vjp, tail_forward = type(sface).fine_vjp, type(sface).tail_forward

    def counted(self, fine, grads, state=None):
        calls.append((fine.shape[0], grads.shape[0], state is not None))
        return fine_vjp(self, fine, grads, state)

    def forward_counted(self, fine):
        forwards.append(fine.shape[0])
        return tail_forward(self, fine)

    monkeypatch.setattr(type(sface), "fine_vjp", counted)
    monkeypatch.setattr(type(sface), "tail_forward", forward_counted)
    list(explain_matches(explainer, query_features, hit_features, ("contrast",)))
    assert calls == [(1, len(hit_features), True)]
    assert forwards == []


def test_the_tail_state_from_the_encode_gives_the_maps_a_fresh_forward_gives(
        explainer, query_features, hit_features):
    assert query_features.tail_states is not None and query_features.tail_states[0] is not None
    bare = dataclasses.replace(query_features, tail_states=None)
    with_state = explainer.explain(query_features, hit_features, maps=("contrast",))
    without = explainer.explain(bare, hit_features, maps=("contrast",))
    for a, b in zip(with_state, without, strict=True):
        np.testing.assert_allclose(a.query.maps["contrast"], b.query.maps["contrast"],
                                   rtol=1e-5, atol=1e-8)
    two = hit_features.select([0, 1])
    joined = type(two).concat([hit_features.select(0), hit_features.select(1)])
    for mine, theirs in zip(joined.tail_states[0], two.tail_states[0], strict=True):
        torch.testing.assert_close(mine, theirs)


def test_the_engine_starting_from_the_heads_pullback_gives_the_same_maps(
        sface, explainer, query_features, hit_features):
    """The engine hands contrast the CAM-layer gradients it has from the similarity map's
    pullback; the maps must equal those run back from the embedding through the whole tail."""
    reference = contrast_maps(sface, query_features.fine_maps[0],
                              query_features.embeddings[0][0], hit_features.fine_maps[0],
                              hit_features.embeddings[0])
    pairs = explainer.explain(query_features, hit_features, maps=("contrast",))
    assert len(pairs) == len(hit_features) > 1
    for k, pair in enumerate(pairs):
        np.testing.assert_allclose(pair.query.maps["contrast"], reference.maps[k].numpy(),
                                   atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (3, 2)])
def test_the_explicit_transpose_of_the_sface_tail_equals_autograd(sface, shape):
    """SFace's tail_vjp (BN scales, PReLU slopes and transposed convs by hand) must give
    the vector-Jacobian products autograd gives, for M directions of N faces."""
    from encoder.spec import FaceEncoder

    n, m = shape
    gen = torch.Generator().manual_seed(n * 10 + m)
    with torch.no_grad():
        fine = sface.fine_features(torch.randn(n, 3, 112, 112, generator=gen))
    directions = torch.randn(m, n, sface.spec.embedding_dim, generator=gen)
    explicit = sface.tail_vjp(fine, directions)
    reference = FaceEncoder.tail_vjp(sface, fine, directions)
    assert explicit.shape == (m, n, *fine.shape[1:])
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-4)
    assert reference.abs().max() > 1e-3  # not trivially zero
    cam = torch.randn(m, n, *sface.spec.feature_shape, generator=gen)  # from the CAM layer
    torch.testing.assert_close(sface.fine_vjp(fine, cam), FaceEncoder.fine_vjp(sface, fine, cam),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_fits_the_default_budget_with_its_defaults(flip_explainer, query_crop,
                                                                hit_crops, method):
    """Both faces, two views (original and mirrored), crops given as arrays: the plan is
    checked before any work, so a method over budget raises before the first batch."""
    polls = []

    def stop_at_first_poll() -> bool:
        polls.append(1)
        return len(polls) > 2

    try:
        attribute(method, flip_explainer, query_crop, hit_crops[0], budget=DEFAULT_BUDGET,
                  cancel=stop_at_first_poll, time_limit=None)
    except BudgetExceeded as err:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"{method} with its defaults is over the default budget: {err}")
    except Exception as err:  # noqa: BLE001 - cancelled mid-way is fine: the plan passed
        assert type(err).__name__ == "Cancelled", err
