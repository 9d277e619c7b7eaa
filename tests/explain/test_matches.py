"""explain_matches: one path for a query and K hits, on real SFace and real photos."""

from __future__ import annotations

import numpy as np
import pytest

from explain.attribution import engine
from explain.attribution.matches import (
    BATCHED,
    METHOD_NAMES,
    check_methods,
    explain_matches,
    typed_options,
)
from explain.attribution.methods import attribute
from explain.errors import InvalidOption, UnknownMethod


def test_batched_and_family_methods_come_back_per_hit_in_order(
    explainer, query_crop, hit_crops, pairs
):
    methods = ("gradcam", "saliency", "similarity")
    matches = list(explain_matches(explainer, query_crop, hit_crops, methods))
    assert [m.index for m in matches] == list(range(len(hit_crops)))
    for match, pair in zip(matches, pairs, strict=True):
        assert [m.method for m in match.maps] == list(methods)
        assert match.cosine == pytest.approx(pair.cosine, abs=1e-6)
        np.testing.assert_allclose(match["similarity"].query, pair.query.similarity, atol=1e-6)
        np.testing.assert_allclose(match["gradcam"].gallery_aligned, pair.gallery.gradcam_aligned,
                                   atol=1e-6)
        assert match["similarity"].forward_passes == 0  # from the batched pass
        sal = match["saliency"]
        assert sal.resolution == "pixel" and sal.query_aligned.shape == query_crop.shape[:2]


def test_family_methods_reuse_given_features_instead_of_encoding_again(
    explainer, query_crop, hit_crops, query_features, hit_features
):
    from_crops = attribute("saliency", explainer, query_crop, hit_crops[1])
    from_features = attribute("saliency", explainer, query_features, hit_features.select(1))
    assert from_crops.forward_passes - from_features.forward_passes == 2  # the two encodes
    np.testing.assert_allclose(from_features.query, from_crops.query, rtol=1e-4, atol=1e-6)
    (match,) = explain_matches(explainer, query_features, hit_features.select(1), ["saliency"])
    assert match["saliency"].forward_passes == from_features.forward_passes


def test_pixel_methods_refuse_features_without_their_crops(explainer, query_features,
                                                           hit_features):
    bare = engine.FaceFeatures(*[getattr(hit_features.select(0), f) for f in
                                 ("feature_maps", "embeddings", "encoders", "flipped",
                                  "crop_size")])
    attribute("gradcam++", explainer, query_features, bare)  # CAM methods need no pixels
    with pytest.raises(InvalidOption, match="crops"):
        attribute("saliency", explainer, query_features, bare)


def test_a_batched_method_with_options_goes_through_the_family(explainer, query_crop,
                                                               hit_crops, pairs):
    (match,) = explain_matches(explainer, query_crop, hit_crops[:1], ["similarity"],
                               options={"similarity": {"relu": True}})
    np.testing.assert_allclose(match["similarity"].query,
                               np.maximum(pairs[0].query.similarity, 0), atol=1e-6)


def test_the_batched_set_is_data_a_new_entry_flows_through(monkeypatch, explainer,
                                                           query_crop, hit_crops, pairs):
    def negated(v):
        q, g = engine.BATCHED_MAPS["similarity"](v)
        return -q, -g

    monkeypatch.setitem(engine.BATCHED_MAPS, "layercam", negated)
    matches = list(explain_matches(explainer, query_crop, hit_crops, ["layercam"]))
    for match, pair in zip(matches, pairs, strict=True):
        assert match["layercam"].forward_passes == 0
        np.testing.assert_allclose(match["layercam"].query, -pair.query.similarity, atol=1e-6)


def test_unknown_methods_are_refused_before_any_work(explainer):
    with pytest.raises(UnknownMethod):
        explain_matches(explainer, np.zeros((112, 112, 3), np.uint8),
                        np.zeros((1, 112, 112, 3), np.uint8), ["similarity", "lime"])


def test_the_catalogue_validates_and_types_wire_options():
    assert set(BATCHED) <= set(METHOD_NAMES)
    assert check_methods(["gradcam", "similarity", "gradcam"]) == ("gradcam", "similarity")
    with pytest.raises(UnknownMethod, match="lime"):
        check_methods(["similarity", "lime"])
    typed = typed_options("occlusion", {"patch": 8.0, "stride": 4.0})
    assert typed == {"patch": 8, "stride": 4} and isinstance(typed["patch"], int)
    assert typed_options("rise", {"p": 0.25}) == {"p": 0.25}


def test_every_list_of_methods_is_a_view_of_the_one_catalogue():
    import subprocess
    import sys

    from explain.attribution import catalogue
    from explain.attribution.implementations import METHODS
    from explain.defaults import DEFAULT_METHODS

    assert tuple(METHODS) == METHOD_NAMES == tuple(s.name for s in catalogue.CATALOGUE)
    assert tuple(engine.BATCHED_MAPS) == BATCHED == tuple(
        s.name for s in catalogue.CATALOGUE if s.batched)
    assert DEFAULT_METHODS == tuple(s.name for s in catalogue.CATALOGUE if s.default)
    for name, method in METHODS.items():
        assert method.spec is catalogue.SPECS[name]
    # torch-free for configuration and CLI help; xSSAB and CorrRISE there without any
    # other import first (they used to join as a side effect of importing matches)
    code = ("import sys; from explain.attribution.catalogue import METHOD_NAMES; "
            "from explain.defaults import DEFAULT_METHODS; "
            "assert 'torch' not in sys.modules; "
            "from explain.evaluation.cost import _takes_seed; "
            "assert 'xssab' in METHOD_NAMES and _takes_seed('corrrise')")
    subprocess.run([sys.executable, "-c", code], check=True)
