"""Explain responses built in place (``server.convert.explain_result``) and read without
copies (``phenolens.results``): the same wire bytes, the same values, the photo decoded
only when a photo overlay is drawn."""

from __future__ import annotations

import numpy as np
import pytest
from phenolens._proto import phenolens_pb2

EVERY_PICTURE = dict(overlays=True, pair_figures=True, gallery_crops=True, photo_maps=True,
                     feature_maps=True)


def _explained(backend, photo_paths, **presentation):
    """An ExplainedQuery of a photo with its top 2 hits materialised (so it can be converted
    twice), explained with a map method, a CAM with feature maps and contrast, effects on."""
    from server.application import ExplainAsk, ExplainedQuery, explain_query
    from server.limits import RequestScope
    from server.present import Presentation

    scope = RequestScope()
    query = backend.query_of_image(photo_paths["person_a_2.jpg"].read_bytes(), aligned=False,
                                   scope=scope)
    ask = ExplainAsk(("similarity", "gradcam", "contrast"), top_k=2, effects=1,
                     presentation=Presentation(**presentation))
    result = explain_query(backend, query, ask, scope)
    return ExplainedQuery(result.outcome, result.query_crop_png, list(result.matches))


def _again(result):
    from server.application import ExplainedQuery

    return ExplainedQuery(result.outcome, result.query_crop_png, iter(result.matches))


def _from_parts(p, encoder_id: str, view_scheme: str) -> phenolens_pb2.ExplainedMatch:
    """ExplainedMatch as it was built before: each array a FloatArray of its own, each Map
    and the match built from keyword arguments (the reference for the wire bytes)."""
    from phenolens.arrays import to_float_array

    from server import convert

    maps = []
    for m in p.maps:
        q = phenolens_pb2.Map(method=m.method, side=convert.SIDE_QUERY,
                              aligned=to_float_array(m.query_aligned),
                              regions=convert.regions(m.query_regions),
                              overlay_png=m.query_overlay_png,
                              photo_overlay_png=m.photo_overlay_png,
                              pair_figure_png=m.pair_figure_png)
        g = phenolens_pb2.Map(method=m.method, side=convert.SIDE_GALLERY,
                              aligned=to_float_array(m.gallery_aligned),
                              regions=convert.regions(m.gallery_regions),
                              overlay_png=m.gallery_overlay_png)
        if m.query_photo is not None:
            q.photo.CopyFrom(to_float_array(m.query_photo))
        if m.query_feature is not None:
            q.feature.CopyFrom(to_float_array(m.query_feature))
            g.feature.CopyFrom(to_float_array(m.gallery_feature))
        if m.query_drawn is not None:
            q.drawn.CopyFrom(to_float_array(m.query_drawn))
            g.drawn.CopyFrom(to_float_array(m.gallery_drawn))
        maps += [q, g]
    pair = p.pair
    return phenolens_pb2.ExplainedMatch(
        index=pair.index, hit=convert.hit(p.hit, p.rank, encoder_id, view_scheme, p.confidence),
        maps=maps, residual=pair.residual, bias_share=pair.bias_share,
        gallery_crop_png=p.gallery_crop_png, effects=convert.face_effects(pair.effects),
        contrast_share=pair.contrast_share)


@pytest.mark.parametrize("presentation", [EVERY_PICTURE, dict(photo_maps=True)],
                         ids=["every-picture", "photo-maps"])
def test_explain_response_built_in_place_has_the_bytes_of_one_built_from_parts(
        backend, gallery_ids, photo_paths, presentation):
    from server import convert

    result = _explained(backend, photo_paths, **presentation)
    assert any(m.query_photo is not None for p in result.matches for m in p.maps)
    ids = (backend.encoder_id, backend.view_scheme)
    reference = phenolens_pb2.ExplainResponse(
        match=convert.match_response(result.outcome, *ids, detected=True),
        explanations=[_from_parts(p, *ids) for p in result.matches],
        query_crop_png=result.query_crop_png)
    in_place = convert.explain_result(_again(result), *ids, detected=True)
    assert in_place.SerializeToString() == reference.SerializeToString()
    streamed = list(convert.explain_events(_again(result), *ids, detected=True))
    assert streamed[0].match.SerializeToString() == reference.match.SerializeToString()
    assert streamed[0].query_crop_png == reference.query_crop_png
    assert [e.explanation.SerializeToString() for e in streamed[1:]] == \
        [_from_parts(p, *ids).SerializeToString() for p in result.matches]


def test_explained_maps_are_read_only_views_equal_to_the_sent_arrays(
        backend, gallery_ids, photo_paths):
    from phenolens.arrays import from_float_array
    from phenolens.results import ExplainResult

    from server import convert

    result = _explained(backend, photo_paths, photo_maps=True, feature_maps=True)
    response = convert.explain_result(_again(result), backend.encoder_id, backend.view_scheme,
                                      detected=True)
    read = ExplainResult.from_proto(response)
    for sent, got in zip(result.matches, read.explanations, strict=True):
        for m in sent.maps:
            q, g = got.map(m.method, "query"), got.map(m.method, "gallery")
            for wire, value in ((m.query_aligned, q.aligned), (m.gallery_aligned, g.aligned),
                                (m.query_photo, q.photo), (m.query_feature, q.feature)):
                if wire is None:
                    assert value is None
                    continue
                assert value.dtype == np.float32 and not value.flags.writeable
                np.testing.assert_array_equal(value, wire)
    copied = from_float_array(response.explanations[0].maps[0].aligned)
    assert copied.flags.writeable  # the codec's default is still a copy of its own


def test_query_photo_is_decoded_only_when_a_photo_overlay_is_drawn(
        reader, gallery_ids, photo_paths, monkeypatch):
    import phenolens.arrays as arrays
    from phenolens.arrays import to_rgb

    decoded = []
    real = arrays.image_rgb
    monkeypatch.setattr(arrays, "image_rgb", lambda m: decoded.append(1) or real(m))
    path = photo_paths["person_a_2.jpg"]
    result = reader.explain(path, top_k=2, methods=["similarity"])
    streamed = list(reader.explain_stream(path.read_bytes(), top_k=1, methods=["similarity"]))
    assert decoded == []
    first = result.explanations[0]
    photo = first.overlay(coords="photo")
    assert len(decoded) == 1
    np.testing.assert_array_equal(first.query_photo, to_rgb(path))
    assert photo.shape == first.query_photo.shape
    result.explanations[1].overlay(coords="photo")
    assert len(decoded) == 1  # the hits of one call share one decoded photo
    np.testing.assert_array_equal(streamed[1].query_photo, to_rgb(path))
    rgb = to_rgb(path)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    from_pixels = reader.explain(rgba, top_k=1, methods=["similarity"])
    np.testing.assert_array_equal(from_pixels.explanations[0].query_photo, rgb)
    no_photo = reader.explain(path, top_k=1, methods=["similarity"], photo_maps=False)
    assert no_photo.explanations[0].query_photo is None
