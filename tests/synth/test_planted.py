"""The planted-feature protocol's bookkeeping: regions of pixels, shares, the table."""

from __future__ import annotations

import numpy as np

from encoder.align import ARCFACE_TEMPLATE_112
from research.planted import markdown, region_of_pixel, summarise
from research.synth import LABELS, SYNDROMES, planted_region


def test_every_synthetic_syndrome_names_a_region_its_handles_act_on():
    assert set(LABELS) == set(SYNDROMES)
    assert {planted_region(k) for k in SYNDROMES} == {"eyes", "nose", "mouth", "chin"}
    assert all(lab.omim.startswith("SYN-") and all(g.startswith("SYNG-") for g in lab.genes)
               for lab in LABELS.values()), "made-up numbers and symbols, never real ones"


def test_landmark_pixels_fall_in_their_regions_and_corners_outside_the_face():
    (lx, ly), _, (nx, ny), (mx, my), _ = np.rint(ARCFACE_TEMPLATE_112).astype(int)
    assert region_of_pixel(ly, lx) == "eyes"
    assert region_of_pixel(ny, nx) == "nose"
    assert region_of_pixel(my, mx) == "mouth"
    assert region_of_pixel(0, 0) == "outside_face"


def _row(label, leans, peak, rank, p, y):
    return {"syndrome": label, "planted": planted_region(label), "leans_on_query": leans,
            "leans_on_query_face": "eyes" if leans == "outside_face" else leans,
            "leans_on_gallery": None, "map_peak": peak, "rank": rank, "probability": p,
            "best_label": y}


def test_summary_is_a_macro_over_syndromes_with_the_pooled_calibration_error():
    rows = [_row("wide_eyes", "eyes", "eyes", 1, [0.9, 0.1], [True, False]),
            _row("wide_eyes", "outside_face", "cheeks", 2, [0.4, 0.6], [True, False]),
            _row("broad_nose", "nose", "nose", 1, [0.2, 0.8], [False, True])]
    s = summarise(rows)
    assert s["per_syndrome"]["wide_eyes"]["leans_on_planted"] == 0.5
    assert s["per_syndrome"]["broad_nose"]["leans_on_planted"] == 1.0
    assert s["macro"]["leans_on_planted"] == 0.75  # each syndrome counts once
    assert s["per_syndrome"]["wide_eyes"]["face_leans_on_planted"] == 1.0
    assert s["macro"]["top1"] == 0.75 and s["macro"]["map_peaks_in_planted"] == 0.75
    # bins: 0.1, 0.2 (y 0) | 0.4 (y 1) | 0.6 (y 0) | 0.8, 0.9 (y 1)
    expected = (0.1 + 0.2 + 0.6 + 0.6 + 0.2 + 0.1) / 6
    assert abs(s["macro"]["held_out_ece"] - expected) < 1e-9
    table = markdown({"encoders": {"frozen": s}})
    assert "| frozen | wide_eyes | eyes | 2 | 0.50 |" in table and "**0.75**" in table


def test_each_deformation_changes_its_planted_region_most_and_the_table_says_how_much():
    from explain.effects import bundled_neutral
    from research.planted import deformation_shares
    from research.synth import source_from_crop

    source = source_from_crop(bundled_neutral().crop, None, "neutral", "neutral")
    shares = deformation_shares([source], list(SYNDROMES))
    for label, by_region in shares.items():
        assert abs(sum(by_region.values()) - 1.0) < 1e-3
        assert max(by_region, key=by_region.get) == planted_region(label), (label, by_region)
    # the broad nose spills into the cheeks (its alae move outwards): the table shows it
    assert shares["broad_nose"]["cheeks"] > 0.1
    table = markdown({"encoders": {}, "deformation": shares})
    assert "| broad_nose | nose | " in table and "cheeks" in table
