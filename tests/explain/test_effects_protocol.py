"""``phenolens evaluate effects``: maps scored against the model's own region effects."""

from __future__ import annotations

import numpy as np
import pytest

from explain.effects import bundled_neutral
from explain.evaluation import effects as E


def test_agreement_of_a_ranking_with_itself_and_with_its_reverse():
    truth = np.arange(9, dtype=float)  # outside_face last: left out of the facial scores
    assert E.agreement(truth, truth) == pytest.approx((1.0, 1.0, 0.0))
    rho, top, l1 = E.agreement(-truth, truth)
    assert rho == pytest.approx(-1.0) and top == 0.0 and l1 > 0.5
    assert E.agreement(np.ones(9), truth)[0] == 0.0  # a constant map ranks nothing


def test_same_person_pairs_come_from_groups_then_altered_copies():
    crop = np.zeros((112, 112, 3), np.uint8)
    faces = [E.Face("a1", "a", crop), E.Face("a2", "a", crop), E.Face("b", "b", crop)]
    different, same = E.build_pairs(faces, max_pairs=3)
    assert different == [(0, 2), (1, 2)]
    assert [(x.name, y.name) for x, y in same] == [("a1", "a2"), ("a1", "a1 (altered)"),
                                                   ("a2", "a2 (altered)")]
    assert E.build_pairs(faces, variants=False)[1][0][0].name == "a1"


def test_a_nuisance_change_stays_where_it_says(crops):
    crop, other = crops["person_a_1.jpg"], crops["impostor_1.jpg"]
    for kind in E.NUISANCES:
        edited, mask = E.nuisance_edit(crop, kind, other)
        changed = np.abs(edited.astype(int) - crop.astype(int)).sum(-1) > 0
        assert changed.any() and changed[~mask].mean() < 0.01


def test_the_protocol_scores_every_method_and_writes_its_files(flip_explainer, crops, tmp_path):
    faces = [E.Face(n, n.split("_")[1] if n.startswith("person") else n, c)
             for n, c in crops.items()]
    result = E.evaluate_effects(flip_explainer, faces[:5], ("contrast", "similarity"),
                                neutral=bundled_neutral(),
                                max_pairs=2, trap_pairs=1)
    assert result.pairs_different == 2 and result.pairs_same == 2
    contrast = result.rows["contrast"]
    assert -1 <= contrast["differs spearman"] <= 1 and 0 <= contrast["differs top1"] <= 1
    assert 0 <= contrast["nuisance share"] <= 1
    assert result.rows["served words (from the effects)"]["differs top1"] == 1.0
    assert {"pixel difference", "region area", "constant (eyes)",
            "effects, features mode"} <= set(result.rows)
    E.write(result, tmp_path)
    text = (tmp_path / "effects.md").read_text()
    assert "| contrast |" in text and "met" in text
    assert (tmp_path / "effects.json").is_file() and (tmp_path / "effects_examples.png").is_file()
