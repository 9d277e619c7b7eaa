"""The evaluation metrics on plain arrays: localisation, curves, map agreement, GM top-k."""

from __future__ import annotations

import numpy as np
import pytest

from explain.evaluation import metrics as M
from gallery import accuracy as A


def _square(size: int, y0: int, x0: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_iou_of_a_mask_with_itself_is_one_and_disjoint_is_zero():
    a = _square(32, 4, 4, 8)
    b = _square(32, 20, 20, 8)
    assert M.iou(a, a) == 1.0
    assert M.iou(a, b) == 0.0
    half = _square(32, 4, 8, 8)  # overlaps a in 8x4 cells
    assert M.iou(a, half) == pytest.approx(32 / (64 + 64 - 32))


def test_iou_star_equals_one_for_the_mask_itself_and_zero_when_disjoint():
    a = _square(32, 4, 4, 8)
    b = _square(32, 20, 20, 8)
    assert M.iou_star(a.astype(float), a) == pytest.approx(1.0)
    assert M.iou_star(a.astype(float), b) == 0.0


def test_iou_star_weighs_strong_cells_more_than_faint_ones():
    mask = _square(32, 4, 4, 8)
    strong_inside = np.zeros((32, 32))
    strong_inside[mask] = 1.0
    strong_inside[20:28, 20:28] = 0.5  # a fainter blob outside the region
    faint_inside = np.zeros((32, 32))
    faint_inside[mask] = 0.5
    faint_inside[20:28, 20:28] = 1.0
    # Both maps threshold to the same two blobs, so their IOU is equal ...
    assert M.iou(M.threshold_map(strong_inside), mask) == M.iou(M.threshold_map(faint_inside), mask)
    # ... but IOU* prefers the map whose strong cells lie in the region.
    assert M.iou_star(strong_inside, mask) > M.iou_star(faint_inside, mask)


def test_localisation_upsamples_a_feature_grid_map_to_the_mask():
    mask = _square(112, 32, 32, 32)
    coarse = np.zeros((7, 7))
    coarse[2:4, 2:4] = 1.0  # cells covering pixels 32..63
    (score,) = M.localisation_scores(coarse, {"box": mask})
    assert score.pointing
    assert score.iou > 0.5
    assert score.energy > 0.7


def test_deletion_by_the_true_weights_drops_faster_than_random_order():
    rng = np.random.default_rng(1)
    weights = np.zeros((16, 16))
    weights[4:8, 4:12] = 1.0
    image = rng.uniform(100, 200, size=(16, 16, 3)).astype(np.float32)
    baseline = np.zeros_like(image)

    def score(batch: np.ndarray) -> np.ndarray:
        return np.einsum("nhwc,hw->n", batch, weights) / 1000.0

    true = M.perturbation_curve(score, image, baseline, M.pixel_order(weights, (16, 16)), 16)
    randoms = [
        M.perturbation_curve(
            score,
            image,
            baseline,
            M.pixel_order(weights, (16, 16), "random", np.random.default_rng(s)),
            16,
        )
        for s in range(5)
    ]
    assert true.scores[0] == pytest.approx(score(image[None])[0])
    assert true.scores[-1] == pytest.approx(0.0)
    assert true.auc < 0.5 * M.mean_curve(randoms).auc
    ins = M.perturbation_curve(
        score, image, baseline, M.pixel_order(weights, (16, 16)), 16, "insertion"
    )
    assert ins.scores[0] == pytest.approx(0.0) and ins.auc > M.mean_curve(randoms).auc


def test_negative_side_orders_most_negative_first():
    a = np.array([[0.5, -2.0], [1.0, -0.1]])
    assert M.pixel_order(a, (2, 2), "negative")[0] == 1
    assert M.pixel_order(a, (2, 2), "positive")[0] == 2


def test_spearman_and_ssim_are_one_for_identical_maps_and_low_for_unrelated():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(14, 14))
    assert M.spearman(a, a) == pytest.approx(1.0)
    assert M.map_ssim(a, a) == pytest.approx(1.0)
    b = rng.normal(size=(14, 14))
    assert abs(M.spearman(a, b)) < 0.3
    assert M.map_ssim(a, b) < 0.3
    assert M.map_ssim(np.ones((7, 7)) * 3, np.ones((7, 7))) == pytest.approx(1.0)


def test_macro_topk_on_a_hand_built_split_equals_the_hand_computation():
    # Gallery: syndromes A (2 images), B, C. Queries: two of A, one of B, one of D (absent).
    gallery_labels = ["A", "A", "B", "C"]
    sim = np.array(
        [
            [0.9, 0.1, 0.5, 0.2],  # A query: A best (0.9) -> rank 1
            [0.1, 0.3, 0.6, 0.4],  # A query: A=0.3 < B=0.6, C=0.4 -> rank 3
            [0.2, 0.2, 0.1, 0.7],  # B query: C=0.7 > A=0.2 > B=0.1 -> rank 3
            [0.5, 0.5, 0.5, 0.5],  # D query: not in gallery -> inf
        ]
    )
    query_labels = ["A", "A", "B", "D"]
    ranks = A.syndrome_ranks(sim, gallery_labels, query_labels)
    assert ranks.tolist() == [1, 3, 3, np.inf]
    acc = A.macro_topk(ranks, query_labels, ks=(1, 3))
    # per syndrome top-1: A 1/2, B 0, D 0 -> macro 1/6; top-3: A 1, B 1, D 0 -> 2/3
    assert acc.macro[1] == pytest.approx(1 / 6)
    assert acc.macro[3] == pytest.approx(2 / 3)
    assert acc.micro[1] == pytest.approx(1 / 4)
    assert acc.micro[3] == pytest.approx(3 / 4)
    assert acc.n_missing_in_gallery == 1 and acc.n_syndromes == 3


def test_subject_leakage_between_gallery_and_test_split_is_rejected(tmp_path):
    gallery = tmp_path / "gallery.csv"
    test = tmp_path / "test.csv"
    gallery.write_text(",image_id,subject,label\n0,1,s1,A\n1,2,s2,B\n")
    test.write_text("image_id,subject,label\n3,s3,A\n4,s2,B\n")
    g, t = A.read_split_csv(gallery), A.read_split_csv(test)
    assert g.image_ids == ("1", "2") and g.labels == ("A", "B")
    emb = np.eye(4)[:2]
    with pytest.raises(A.SubjectLeakage, match="1 subject"):
        A.split_accuracy(emb, t, emb, g)
    clean = A.Split(image_ids=("3", "4"), subjects=("s3", "s4"), labels=("A", "B"))
    acc = A.split_accuracy(emb, clean, emb, g, ks=(1,))
    assert acc.macro[1] == 1.0


def test_split_csv_without_a_label_column_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,subject\n1,s1\n")
    with pytest.raises(A.AccuracyError, match="label"):
        A.read_split_csv(bad)
