"""The engine's maths on real SFace and real aligned faces: sum rules, batching, agreement."""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import LayerGradCam
from torch import nn

from explain.attribution.affine import affine_head
from explain.attribution.engine import Explainer
from explain.attribution.methods import attribute

TOL = 1e-4


def test_similarity_maps_sum_to_cosine_minus_bias_share(pairs, hit_crops):
    assert len(pairs) == len(hit_crops)
    for pair in pairs:
        for side in (pair.query, pair.gallery):
            assert side.similarity.shape == (7, 7)
            assert side.similarity_aligned.shape == (112, 112)
            total = float(side.similarity.sum()) + side.bias_share
            assert abs(pair.cosine - total) <= TOL
            assert abs(side.residual) <= TOL


def test_cosines_match_the_encoder_embeddings(sface, pairs, query_crop, hit_crops):
    with torch.no_grad():
        e = sface(sface.preprocess(np.concatenate([query_crop[None], hit_crops])))
    e = e / e.norm(dim=1, keepdim=True)
    expected = (e[1:] @ e[0]).numpy()
    got = [p.cosine for p in pairs]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_same_person_hit_scores_above_other_people(pairs):
    cosines = [p.cosine for p in pairs]
    assert cosines[0] > max(cosines[1:])


def _held_and_raw_gradients(sface, query_crop, hit_crop):
    """(F_q, ∂raw cosine/∂F_q, ∂held-norm target/∂F_q, cosine) by autograd."""
    with torch.no_grad():
        fq = sface.features(sface.preprocess(query_crop))
        eg = sface(sface.preprocess(hit_crop))[0]
    ug = eg / eg.norm()
    f = fq.clone().requires_grad_(True)
    eq = sface.head(f)[0]
    raw = eq @ ug / eq.norm()
    (g_raw,) = torch.autograd.grad(raw, f)
    f2 = fq.clone().requires_grad_(True)
    eq2 = sface.head(f2)[0]
    held = eq2 @ ug / eq2.norm().detach()
    (g_held,) = torch.autograd.grad(held, f2)
    return fq, g_raw, g_held, float(raw.detach())


def test_raw_cosine_gradient_times_activation_cancels_but_held_norm_sums(
    sface, pairs, query_crop, hit_crops
):
    pair = pairs[0]
    fq, g_raw, g_held, cosine = _held_and_raw_gradients(sface, query_crop, hit_crops[0])
    raw_map = (g_raw * fq).sum(1)[0]
    held_map = (g_held * fq).sum(1)[0]
    # Scale invariance: Σ F·∂s/∂F = -<b, ∇_e s>, which carries none of the cosine itself.
    head = affine_head(sface)
    with torch.no_grad():
        eq = sface.head(fq)[0]
        eg = sface(sface.preprocess(hit_crops[0]))[0]
    uq, ug = eq / eq.norm(), eg / eg.norm()
    grad_e = (ug - cosine * uq) / eq.norm()
    assert abs(float(raw_map.sum()) + float(head.bias @ grad_e)) <= TOL
    assert abs(float(raw_map.sum())) < 0.2 * abs(float(held_map.sum()))
    assert abs(float(held_map.sum()) + pair.query.bias_share - cosine) <= TOL
    np.testing.assert_allclose(held_map.numpy(), pair.query.similarity, atol=1e-5)


def test_batched_hits_equal_pair_by_pair(explainer, pairs, query_features, hit_features, hit_crops):
    batched = pairs
    for k in range(len(hit_crops)):
        single = explainer.explain(query_features, hit_features.select(k))[0]
        assert abs(single.cosine - batched[k].cosine) <= 1e-5
        for a, b in ((single.query, batched[k].query), (single.gallery, batched[k].gallery)):
            np.testing.assert_allclose(a.similarity, b.similarity, atol=1e-5)
            np.testing.assert_allclose(a.gradcam, b.gradcam, atol=1e-5)


def test_single_hit_from_its_crop_equals_its_row_of_the_batch(explainer, pairs, query_crop, hit_crops):
    single = explainer.explain(query_crop, hit_crops[2])[0]
    np.testing.assert_allclose(single.query.similarity, pairs[2].query.similarity, atol=1e-5)
    np.testing.assert_allclose(single.gallery.gradcam, pairs[2].gallery.gradcam, atol=1e-5)


def test_cached_hit_features_give_the_same_maps(explainer, pairs, query_crop, hit_features):
    direct = pairs
    from_cache = explainer.explain(query_crop, hit_features.select([2, 0]))
    np.testing.assert_allclose(from_cache[0].gallery.similarity, direct[2].gallery.similarity, atol=1e-6)
    np.testing.assert_allclose(from_cache[1].query.gradcam, direct[0].query.gradcam, atol=1e-6)


class _HeldNormPair(nn.Module):
    """features -> cam (Identity, captum's layer) -> head -> held-norm target, as a module."""

    def __init__(self, encoder, direction, norm):
        super().__init__()
        self.encoder = encoder
        self.cam = nn.Identity()
        self.direction = direction
        self.norm = norm

    def forward(self, x):
        return (self.encoder.head(self.cam(self.encoder.features(x))) @ self.direction / self.norm)[:, None]


def _pair_target(sface, query_crop, hit_crop):
    with torch.no_grad():
        eq = sface(sface.preprocess(query_crop))[0]
        eg = sface(sface.preprocess(hit_crop))[0]
    return _HeldNormPair(sface, eg / eg.norm(), eq.norm())


def test_maps_without_contrast_skip_nothing_they_read(explainer, query_crop, hit_crops):
    """Crops encoded without the contrast layer's activations (no map asked reads them)
    give the same maps as crops encoded with them (contrast asked too)."""
    hits = hit_crops[:2]
    plain = explainer.explain(query_crop, hits)
    with_fine = explainer.explain(query_crop, hits, maps=("similarity", "gradcam", "contrast"))
    for pair, other in zip(with_fine, plain, strict=True):
        assert pair.cosine == other.cosine
        for a, b in ((pair.query, other.query), (pair.gallery, other.gallery)):
            for name in ("similarity", "gradcam"):
                np.testing.assert_allclose(a.maps[name], b.maps[name], atol=1e-7, rtol=0)
                np.testing.assert_allclose(a.aligned[name], b.aligned[name], atol=1e-7, rtol=0)


def test_head_matrix_follows_replaced_and_edited_weights():
    from encoder.registry import create_encoder

    encoder = create_encoder("sface")  # a private copy: the weights are changed below
    first = affine_head(encoder)
    assert affine_head(encoder) is first
    encoder.bn_fc.bias = nn.Parameter(encoder.bn_fc.bias.detach() + 1.0)  # replaced
    second = affine_head(encoder)
    torch.testing.assert_close(second.bias, first.bias + 1.0)
    with torch.no_grad():
        encoder.bn_fc.bias.add_(1.0)  # edited in place
    torch.testing.assert_close(affine_head(encoder).bias, first.bias + 2.0)


def test_gradcam_equals_captum_layergradcam(sface, pairs, query_crop, hit_crops):
    for k in (0,):
        module = _pair_target(sface, query_crop, hit_crops[k])
        x = sface.preprocess(query_crop)
        theirs = LayerGradCam(module, module.cam).attribute(
            x, target=0, attribute_to_layer_input=False, relu_attributions=False
        )
        np.testing.assert_allclose(theirs[0, 0].detach().numpy(), pairs[k].query.gradcam, atol=TOL)
        # the gallery side is the same computation with the roles swapped
        module_g = _pair_target(sface, hit_crops[k], query_crop)
        theirs_g = LayerGradCam(module_g, module_g.cam).attribute(
            sface.preprocess(hit_crops[k]), target=0, attribute_to_layer_input=False
        )
        np.testing.assert_allclose(theirs_g[0, 0].detach().numpy(), pairs[k].gallery.gradcam, atol=TOL)


def test_hirescam_by_hand_equals_similarity_map(sface, explainer, pairs, query_crop, hit_crops):
    pair = pairs[1]
    module = _pair_target(sface, query_crop, hit_crops[1])
    with torch.no_grad():
        f = sface.features(sface.preprocess(query_crop))
    f.requires_grad_(True)
    target = module.encoder.head(f) @ module.direction / module.norm
    (grad,) = torch.autograd.grad(target.sum(), f)
    hirescam = (grad * f).sum(1)[0].detach().numpy()
    np.testing.assert_allclose(hirescam, pair.query.similarity, atol=TOL)
    hires = attribute("hirescam", explainer, query_crop, hit_crops[1], sides=("query",))
    np.testing.assert_allclose(hires.query, hirescam, atol=TOL)


def _mirror(crops: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(crops[..., :, ::-1, :])


def test_flipped_view_maps_are_flipped_back(sface, flip_explainer, pairs, query_crop, hit_crops):
    """Mirroring both faces swaps the orig and flip views, so the averaged maps
    must come out exactly mirrored; a flip view left unflipped breaks this."""
    flipped = flip_explainer.explain(query_crop, hit_crops[:2])
    mirrored = flip_explainer.explain(_mirror(query_crop), _mirror(hit_crops[:2]))
    for a, b in zip(flipped, mirrored, strict=True):
        assert len(a.view_cosines) == 2
        assert abs(a.cosine - float(np.mean(a.view_cosines))) <= 1e-6
        assert abs(a.cosine - b.cosine) <= 1e-5
        np.testing.assert_allclose(a.query.similarity, b.query.similarity[:, ::-1], atol=1e-5)
        np.testing.assert_allclose(a.gallery.gradcam, b.gallery.gradcam[:, ::-1], atol=1e-5)
        np.testing.assert_allclose(
            a.query.similarity_aligned, b.query.similarity_aligned[:, ::-1], atol=1e-5
        )
        assert abs(a.query.residual) <= TOL and abs(a.gallery.residual) <= TOL
    # and the average is the mean of the orig view and the mirrored map of the flip view
    orig = pairs[0]
    flip_only = Explainer(sface).explain(_mirror(query_crop), _mirror(hit_crops[:1]))[0]
    expected = (orig.query.similarity + flip_only.query.similarity[:, ::-1]) / 2
    np.testing.assert_allclose(flipped[0].query.similarity, expected, atol=1e-5)


def test_point_correspondence_sums_to_the_cell_similarity(
    explainer, pairs, query_features, hit_features, query_crop, hit_crops
):
    pair = pairs[0]
    point = (52.0, 40.0)  # left eye region of the aligned crop, (row, col)
    corr = explainer.correspondence(query_crop, hit_crops[0], point, source="query")
    i, j = corr.cell
    assert (i, j) == (3, 2)
    assert corr.map.shape == (7, 7) and corr.map_aligned.shape == (112, 112)
    assert abs(corr.source_similarity - float(pair.query.similarity[i, j])) <= 1e-5
    assert abs(float(corr.map.sum()) + corr.bias_term - corr.source_similarity) <= 1e-5
    back = explainer.correspondence(query_features, hit_features.select(0), point, source="gallery")
    assert abs(back.source_similarity - float(pair.gallery.similarity[i, j])) <= 1e-5


def test_point_correspondence_over_all_cells_sums_to_the_debiased_cosine(
    sface, explainer, query_features, hit_features, query_crop, hit_crops
):
    head = affine_head(sface)
    with torch.no_grad():
        eq = sface(sface.preprocess(query_crop))[0]
        eg = sface(sface.preprocess(hit_crops[0]))[0]
    expected = float((eq - head.bias) @ (eg - head.bias) / (eq.norm() * eg.norm()))
    q, g = query_features, hit_features.select(0)
    total = 0.0
    for r in range(7):
        for c in range(7):
            total += float(explainer.correspondence(q, g, (r * 16 + 8, c * 16 + 8)).map.sum())
    assert abs(total - expected) <= 1e-4


def test_cells_are_drawn_over_their_receptive_fields_and_reach_the_crop_edge(sface):
    """A one-cell map lands on that cell's measured receptive-field centre (inside the
    crop, closer to the middle than its grid position), the border cells' values reach
    the crop's edge instead of fading to zero, and the placement is mirror-symmetric."""
    import torch

    from explain.attribution.placement import place, placement

    where = placement(sface, (14, 14))
    assert where is not None and 0 < where.step_x < 112 / 14 and where.x0 > 112 / 28
    cell = torch.zeros(1, 14, 14)
    cell[0, 3, 10] = 1.0
    drawn = place(cell, where, (112, 112))[0]
    y, x = divmod(int(drawn.argmax()), 112)
    assert abs(x - (where.x0 + 10 * where.step_x)) <= 1
    assert abs(y - (where.y0 + 3 * where.step_y)) <= 1
    flat = place(torch.ones(1, 14, 14), where, (112, 112))[0]
    torch.testing.assert_close(flat, torch.ones(112, 112))  # the edge rows and columns too
    ramp = torch.arange(14.0).repeat(14, 1)[None]
    drawn = place(ramp, where, (112, 112))[0]
    mirrored = place(ramp.flip(-1), where, (112, 112))[0].flip(-1)
    torch.testing.assert_close(drawn, mirrored, atol=0.06, rtol=0)
