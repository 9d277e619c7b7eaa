"""Fine-tuning a head on a frozen SFace backbone with a small real synthetic gallery."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import encoder.models.finetuned as ft
from encoder.errors import CheckpointError
from encoder.registry import create_encoder
from gallery.accuracy import SubjectLeakage
from research import synth
from research.train import (
    TrainConfig,
    base_affine_head,
    class_weights,
    embed_features,
    labelled_features,
    neutral_edit_features,
    train_head,
)

CLASSES = tuple(synth.SYNDROMES)


@pytest.fixture(scope="module")
def splits(sources):
    plan = synth.SplitPlan(class_sizes={c: 8 for c in CLASSES}, eval_size=3,
                           fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    return {k: synth.face_set(v) for k, v in synth.generate_splits(sources, plan).items()}


@pytest.fixture(scope="module")
def features(sface, splits):
    return {k: labelled_features(sface, v) for k, v in splits.items()}


@pytest.fixture(scope="module")
def trained(sface, features):
    config = TrainConfig(max_epochs=6, patience=6, warmup_epochs=1, lr=3e-5, seed=0)
    return train_head(sface, features["train"], features["val"], config)


def test_base_affine_head_reproduces_the_encoder_head(sface, features):
    w, b = base_affine_head(sface)
    f = features["train"].features[:4]
    with torch.no_grad():
        exact = sface.head(f)
    np.testing.assert_allclose((f.flatten(1) @ w.T + b).numpy(), exact.numpy(), atol=2e-3, rtol=1e-3)


def test_untrained_head_equals_the_frozen_embedding(sface, features):
    result = train_head(sface, features["train"], None, TrainConfig(max_epochs=0, init="base"))
    f = features["test"].features
    tuned = embed_features(result.model, f)
    frozen = embed_features(sface, f)
    cos = np.sum(tuned * frozen, 1) / np.linalg.norm(tuned, axis=1) / np.linalg.norm(frozen, axis=1)
    assert cos.min() > 0.999


def test_training_reduces_the_loss(trained):
    losses = [h.train_loss for h in trained.history if h.epoch >= 1]
    assert losses[-1] < 0.7 * losses[0]
    assert trained.selection_metric == "val_top1"  # six classes: top-5 would be saturated


def test_class_weights_balance_rare_classes():
    w = class_weights(["a"] * 8 + ["b"] * 2, ["a", "b"])
    assert w[1] == pytest.approx(4 * w[0])
    assert float((w * torch.tensor([8.0, 2.0])).sum()) == pytest.approx(10.0)


def test_checkpoint_round_trips_through_the_registry(trained, splits, tmp_path):
    path = ft.save_checkpoint(trained.model, tmp_path / "head.pt", metadata={"note": "test"})
    loaded = create_encoder("finetuned", weights=path)
    assert isinstance(loaded, ft.FineTunedEncoder)
    assert loaded.config == trained.model.config
    assert loaded.spec.version == trained.model.spec.version
    assert loaded.spec.version.startswith("sface+head-")
    crops = splits["test"].images[:5]
    with torch.no_grad():
        a = trained.model(trained.model.preprocess(crops))
        b = loaded(loaded.preprocess(crops))
    assert torch.equal(a, b)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_different_heads_get_different_encoder_versions(sface, features, trained):
    other = train_head(sface, features["train"], None, TrainConfig(max_epochs=0))
    assert other.model.refresh_version() != trained.model.refresh_version()


def test_finetuned_head_is_affine_so_explanations_sum_to_the_cosine(trained, splits):
    from explain.attribution.engine import Explainer

    pairs = Explainer(trained.model).explain(splits["test"].images[0], splits["train"].images[:3])
    for pair in pairs:
        assert abs(pair.query.residual) < 1e-3 and abs(pair.gallery.residual) < 1e-3


def test_validation_split_sharing_a_subject_is_rejected(sface, features):
    leaky = features["val"].select([0])
    leaky = type(leaky)(leaky.features, leaky.labels, (features["train"].subjects[0],),
                        leaky.image_ids)
    with pytest.raises(SubjectLeakage):
        train_head(sface, features["train"], leaky, TrainConfig(max_epochs=1))


def test_checkpoint_of_another_kind_is_rejected(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError):
        create_encoder("finetuned", weights=path)
    with pytest.raises(CheckpointError):
        create_encoder("finetuned")


def _separation(encoder, faces) -> float:
    """Between-class over within-class spread of ``faces``' unit embeddings."""
    e = embed_features(encoder, faces.features).astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    labels = np.array(faces.labels)
    means = {c: e[labels == c].mean(0) for c in CLASSES}
    within = np.mean([np.sum((e[i] - means[c]) ** 2) for i, c in enumerate(labels)])
    between = np.mean([np.sum((m - e.mean(0)) ** 2) for m in means.values()])
    return between / within


def test_wccn_start_weighs_between_class_over_within_class_variation(sface, features):
    start = train_head(sface, features["train"], None, TrainConfig(max_epochs=0, init="wccn"))
    assert _separation(start.model, features["train"]) > 2 * _separation(sface, features["train"])


def test_lda_start_keeps_the_discriminant_directions_and_separates_held_out_syndromes(
        sface, features):
    wccn = train_head(sface, features["train"], None, TrainConfig(max_epochs=0, init="wccn"))
    lda = train_head(sface, features["train"], None, TrainConfig(max_epochs=0, init="lda"))
    assert lda.model.spec.embedding_dim == len(CLASSES) - 1
    assert embed_features(lda.model, features["test"].features).shape[1] == len(CLASSES) - 1
    # on subjects it never saw, the syndromes stand further apart than with the WCCN start
    assert (_separation(lda.model, features["test"])
            > 1.2 * _separation(wccn.model, features["test"]))


def test_lda_with_the_neutral_edits_counts_a_pasted_region_as_variation_within_a_class(
        sface, features, splits):
    train = features["train"]
    edits = neutral_edit_features(sface, train, splits["train"].images)
    assert len(edits) == 9 * len(train) and edits.labels[:9] == (train.labels[0],) * 9
    assert edits.image_ids[0].startswith(train.image_ids[0])
    plain = train_head(sface, train, None, TrainConfig(max_epochs=0, init="lda"))
    blind = train_head(sface, train, None, TrainConfig(max_epochs=0, init="lda"), edits=edits)

    def reaction(model) -> float:
        """How far a pasted region moves a face, in units of the syndromes' spread."""
        e = embed_features(model, train.features).astype(np.float64)
        moved = embed_features(model, edits.features).astype(np.float64)
        labels = np.array(train.labels)
        means = np.stack([e[labels == c].mean(0) for c in sorted(set(train.labels))])
        spread = np.linalg.norm(means - means.mean(0), axis=1).mean()
        return float(np.linalg.norm(moved - np.repeat(e, 9, axis=0), axis=1).mean() / spread)

    print(f"a pasted region moves a face {reaction(blind.model):.2f} (with the edits) and "
          f"{reaction(plain.model):.2f} (without) of the syndromes' spread")
    assert reaction(blind.model) < 0.5 * reaction(plain.model)
