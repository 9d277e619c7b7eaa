"""The evaluation protocols on real SFace and the real photo pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from explain.evaluation import common as E
from explain.evaluation import faithfulness as F
from explain.evaluation import localization as L
from explain.evaluation import metrics as M
from explain.evaluation import sanity as S
from explain.regions import region_masks


@pytest.fixture(scope="module")
def same_pair(faces) -> E.FacePair:
    q, g = faces["person_a_1.jpg"], faces["person_a_2.jpg"]
    return E.FacePair(
        "person_a", "same", q.alignment.crop, g.alignment.crop, q.alignment.landmarks_crop
    )


def test_pair_target_is_the_cosine_on_the_unperturbed_query(sface, same_pair):
    target = E.PairTarget(sface, same_pair.query, same_pair.gallery)
    held, cos = target.scores(same_pair.query[None].astype(np.float32))
    e = target.embed(np.stack([same_pair.query, same_pair.gallery]))[:, 0]
    expected = e[0] @ e[1] / np.linalg.norm(e[0]) / np.linalg.norm(e[1])
    assert held[0] == pytest.approx(expected, abs=1e-5)
    assert cos[0] == pytest.approx(expected, abs=1e-5)


def test_deleting_the_most_similar_pixels_lowers_similarity_faster_than_random(sface, same_pair):
    result = F.faithfulness(
        sface,
        [same_pair],
        ["similarity"],
        steps=8,
        baselines=("blur",),
        sides=("positive",),
        n_random=3,
        captum_metrics=False,
    )
    by_method = {c.method: [] for c in result.curves}
    for c in result.curves:
        by_method[c.method].append(c.deletion.auc)
    attributed, random = by_method["similarity"][0], float(np.mean(by_method["random"]))
    assert attributed < 0.8 * random, (attributed, random)


def test_randomising_the_model_changes_gradcam_maps_and_a_plain_copy_does_not(sface, same_pair):
    before = [p.detach().clone() for p in sface.parameters()]
    n_units = len(S.randomisation_units(sface))
    steps, units, errors = S.cascading_randomisation(
        sface, [same_pair], ["gradcam"], stages=[0, n_units]
    )
    assert not errors
    assert units[0] == "bn_fc" and units[-1] == "body.conv_1"
    by_stage = {s.n_units: s for s in steps}
    assert by_stage[0].spearman == pytest.approx(1.0)
    assert by_stage[n_units].spearman < 0.9
    # The shared model is never touched: randomisation works on a deep copy.
    assert all(torch.equal(a, b) for a, b in zip(before, sface.parameters(), strict=True))


def test_randomisation_units_run_top_down_in_blocks(sface):
    units = S.randomisation_units(sface)
    assert units[:4] == ["bn_fc", "fc", "bn1", "body.conv_14"]
    assert len(units) == len(set(units)) == 3 + len(list(sface.body.children()))


def test_region_masks_follow_the_landmarks(same_pair):
    lm = same_pair.query_landmarks
    masks = region_masks(lm, size=(112, 112))
    for (x, y), name in zip(lm[:3], ("left_eye", "right_eye", "nose"), strict=True):
        assert masks[name][int(round(y)), int(round(x))], name
    assert not (masks["eyes"] & masks["nose"]).any()
    assert not (masks["nose"] & masks["mouth"]).any()
    assert masks["face"][masks["eyes"] | masks["nose"] | masks["mouth"]].all()
    assert M.iou(masks["background"], ~masks["face"]) == 1.0
    shifted = region_masks(lm + np.array([6.0, 4.0]), size=(112, 112))
    assert M.iou(np.roll(masks["nose"], (4, 6), axis=(0, 1)), shifted["nose"]) > 0.9


def test_localisation_of_a_region_indicator_map_scores_that_region_highest(same_pair):
    masks = region_masks(same_pair.query_landmarks, size=(112, 112))
    indicator = masks["nose"].astype(np.float32)
    result = L.localisation(None, [same_pair], ["indicator"], maps={"indicator": [indicator]})
    iou = result.iou["indicator"]
    assert iou["nose"] == 1.0 and iou["eyes"] == 0.0
    assert result.iou_star["indicator"]["nose"] == pytest.approx(1.0)


def test_label_permutation_changes_the_map_towards_a_label_centroid(sface, faces):
    names = [
        "person_a_2.jpg",
        "person_b_1.jpg",
        "person_b_2.jpg",
        "impostor_1.jpg",
        "impostor_2.jpg",
        "grace_hopper.jpg",
    ]
    labels = ["a", "b", "b", "i1", "i2", "gh"]
    crops = np.stack([faces[n].alignment.crop for n in names])
    rows = S.label_randomisation(
        sface, faces["person_a_1.jpg"].alignment.crop, crops, labels, "a", n_permutations=3
    )
    assert {r.method for r in rows} == {"similarity", "gradcam"}
    assert all(r.spearman < 0.95 for r in rows)


def test_phenolens_evaluate_accuracy_writes_json_markdown_and_rejects_leakage(tmp_path):
    from server.cli import main

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    ids = [f"img{i}" for i in range(9)]
    labels = ["s0", "s1", "s2"] * 3
    emb = np.stack([centres[int(lab[1])] + 0.05 * rng.normal(size=16) for lab in labels])
    np.savez(tmp_path / "emb.npz", image_ids=np.array(ids), embeddings=emb)
    (tmp_path / "gallery.csv").write_text(
        "image_id,subject,label\n" + "".join(f"{ids[i]},g{i},{labels[i]}\n" for i in range(6))
    )
    (tmp_path / "test.csv").write_text(
        "image_id,subject,label\n" + "".join(f"{ids[i]},t{i},{labels[i]}\n" for i in range(6, 9))
    )
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "accuracy",
            "--embeddings",
            str(tmp_path / "emb.npz"),
            "--gallery-split",
            str(tmp_path / "gallery.csv"),
            "--test-split",
            str(tmp_path / "test.csv"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "accuracy.json").read_text())
    assert report["result"]["macro"]["1"] == 1.0
    assert "macro" in (out / "accuracy.md").read_text()
    (tmp_path / "test.csv").write_text("image_id,subject,label\nimg6,g0,s0\n")
    assert (
        main(
            [
                "evaluate",
                "accuracy",
                "--embeddings",
                str(tmp_path / "emb.npz"),
                "--gallery-split",
                str(tmp_path / "gallery.csv"),
                "--test-split",
                str(tmp_path / "test.csv"),
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_phenolens_evaluate_accuracy_reads_embeddings_from_a_real_gallery(tmp_path):
    from gallery import Entry, Gallery
    from server.cli import main

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, 8))
    labels = ["A", "B", "A", "B", "A", "B"]
    with Gallery.open(tmp_path / "g.sqlite", encoder_id="test@1", view_scheme="test:orig") as g:
        g.add_many(
            Entry(f"i{i}", f"s{i}", lab, lab, [centres[int(lab == "B")] + 0.1 * rng.normal(size=8)])
            for i, lab in enumerate(labels)
        )
    (tmp_path / "gallery.csv").write_text("image_id,subject,label\ni0,s0,A\ni1,s1,B\n")
    # i5 is labelled A in the split (the split's label wins), but it looks like B.
    (tmp_path / "test.csv").write_text(
        "image_id,subject,label\ni2,s2,A\ni3,s3,B\ni4,s4,A\ni5,s5,A\n"
    )
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "accuracy",
            "--gallery",
            str(tmp_path / "g.sqlite"),
            "--gallery-split",
            str(tmp_path / "gallery.csv"),
            "--test-split",
            str(tmp_path / "test.csv"),
            "--ks",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "accuracy.json").read_text())["result"]
    # A: 2 of 3 right, B: 1 of 1 -> macro (2/3 + 1) / 2, micro 3/4.
    assert result["macro"]["1"] == pytest.approx((2 / 3 + 1) / 2)
    assert result["micro"]["1"] == pytest.approx(3 / 4)
