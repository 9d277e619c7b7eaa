"""Syndrome-wise maps on real SFace and real faces: averages, leave-one-out, query pull."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from explain.attribution.engine import Explainer
from explain.attribution.placement import place, placement
from explain.attribution.views import SingleEncoderViews
from explain.syndrome.maps import GroupTooSmall, SyndromeExplainer


@pytest.fixture(scope="module", params=[False, True], ids=["orig", "orig+flip"])
def explainers(request, sface):
    explainer = Explainer(SingleEncoderViews(sface, flip=request.param))
    return explainer, SyndromeExplainer(explainer)


def test_syndrome_average_map_equals_mean_of_member_maps(explainers, group, sface):
    _, syn = explainers
    stack, subjects = group
    maps = syn.syndrome_maps(stack, subjects=subjects)
    members_c = np.stack([m.to_centroid for m in maps.members])
    members_r = np.stack([m.to_rest for m in maps.members])
    np.testing.assert_allclose(maps.to_centroid, members_c.mean(0), atol=1e-6)
    np.testing.assert_allclose(maps.to_rest, members_r.mean(0), atol=1e-6)
    # Cells drawn over their receptive fields, as every aligned map is (explain.attribution.placement).
    up = place(torch.from_numpy(members_c), placement(sface, (7, 7)), (112, 112)).mean(0).numpy()
    np.testing.assert_allclose(maps.to_centroid_aligned, up, atol=1e-6)
    assert maps.to_centroid.shape == (7, 7) and maps.to_centroid_aligned.shape == (112, 112)


def test_member_maps_sum_to_cosine_with_the_centroid(explainers, group, sface):
    _, syn = explainers
    stack, _ = group
    maps = syn.syndrome_maps(stack)
    with torch.no_grad():
        emb = nnf.normalize(sface(sface.preprocess(stack)), dim=1).numpy()
    centre = emb.mean(0)
    expected = emb @ centre / np.linalg.norm(centre)
    for m in maps.members:
        assert abs(m.residual) < 1e-4
        assert m.to_centroid.sum() == pytest.approx(m.cosine_to_centroid - m.bias_to_centroid, abs=1e-4)
    if len(maps.centroid.vectors) == 1:
        np.testing.assert_allclose([m.cosine_to_centroid for m in maps.members], expected, atol=1e-5)
    # the same person's other photo is in the rest, so person photos lean on the rest
    assert maps.mean_cosine_to_rest < maps.mean_cosine_to_centroid


def test_map_towards_rest_of_a_pair_equals_the_engine_pair_map(explainers, group):
    explainer, syn = explainers
    stack, _ = group
    maps = syn.syndrome_maps(stack[:2])
    pair = explainer.explain(stack[0], stack[1:2])[0]
    np.testing.assert_allclose(maps.members[0].to_rest, pair.query.similarity, atol=1e-6)
    assert maps.members[0].cosine_to_rest == pytest.approx(pair.cosine, abs=1e-5)


def test_query_pull_of_a_member_equals_its_map_towards_the_centroid(explainers, group, crops):
    _, syn = explainers
    stack, _ = group
    maps = syn.syndrome_maps(stack)
    pull = syn.query_pull(stack[2], maps.centroid)
    np.testing.assert_allclose(pull.map, maps.members[2].to_centroid, atol=1e-6)
    outsider = syn.query_pull(crops["grace_hopper.jpg"], maps.centroid)
    assert abs(outsider.residual) < 1e-4
    assert outsider.cosine < min(m.cosine_to_centroid for m in maps.members)


def test_syndrome_maps_of_one_face_raise(explainers, group):
    _, syn = explainers
    with pytest.raises(GroupTooSmall):
        syn.syndrome_maps(group[0][:1], min_size=1)
