"""``server.application.explain_query``: the one match -> explain -> present sequence."""

from __future__ import annotations

import numpy as np


def test_explain_query_explains_the_chosen_images_with_their_confidences_and_draws_nothing_unasked(
        backend, gallery_ids, photo_paths):
    from server.application import ExplainAsk, explain_query
    from server.limits import RequestScope

    scope = RequestScope()
    query = backend.query_of_image(photo_paths["person_a_2.jpg"].read_bytes(), aligned=False,
                                   scope=scope)
    chosen = (int(gallery_ids["grace_hopper.jpg"]), int(gallery_ids["impostor_1.jpg"]))
    result = explain_query(backend, query, ExplainAsk(("similarity",), gallery_ids=chosen),
                           scope)
    hits = result.outcome.hits
    assert tuple(h.gallery_id for h in hits) == chosen
    calibration = backend.calibrations.get(backend.gallery)
    assert result.outcome.hit_confidences == tuple(
        calibration.hit_confidence(h.syndrome_id, h.score) for h in hits)
    assert result.query_crop_png == b""
    presented = list(result.matches)
    assert [(p.rank, p.hit.gallery_id) for p in presented] == [(1, chosen[0]), (2, chosen[1])]
    for p in presented:
        (shown,) = p.maps
        assert shown.method == "similarity" and shown.query_aligned.dtype == np.float32
        assert (shown.query_overlay_png, shown.gallery_overlay_png, shown.photo_overlay_png,
                shown.pair_figure_png, p.gallery_crop_png) == (b"",) * 5
        assert shown.query_photo is None and shown.query_feature is None
        assert shown.query_regions.regions  # the region summary comes with every map
