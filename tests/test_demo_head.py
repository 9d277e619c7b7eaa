"""``make demo`` serves SFace with a syndrome head fitted on people who are neither in the
served gallery nor held out (``server.demo``): the split stays subject-disjoint, every
syndrome keeps enough gallery people for calibrated confidence, and the fitted head is a
checkpoint the server's configuration loads."""

from __future__ import annotations

import pytest

from gallery.calibration import MIN_SUBJECTS
from research.synth import DEMO_HELD_OUT, LABELS
from server import demo


@pytest.fixture(scope="module")
def demo_data():
    return demo.make_demo_data(seed=0)


def test_head_people_are_neither_gallery_nor_held_out(demo_data):
    split, cohort, training = demo_data
    head, gallery, held = set(split.head), set(split.gallery), set(split.held_out)
    assert len(head) == demo.HEAD_PEOPLE
    assert not head & gallery and not head & held and not gallery & held
    assert held == set(DEMO_HELD_OUT)
    assert {s.subject for s in training} == head
    assert set(cohort.gallery_subjects) == gallery
    assert set(cohort.query_subjects) == held
    gallery_ids = {s.image_id for s in cohort.gallery} | {s.image_id for s in cohort.queries}
    assert not gallery_ids & {s.image_id for s in training}, "a training face is served"


def test_every_syndrome_keeps_enough_gallery_people_for_confidence(demo_data):
    _, cohort, training = demo_data
    for label in LABELS:
        people = {s.subject for s in cohort.gallery if s.label == label}
        assert len(people) >= max(MIN_SUBJECTS, 5), (label, people)
        assert any(s.label == label for s in training), f"the head never sees {label}"


def test_demo_queries_are_the_ones_written_by_queries_option(demo_data):
    _, cohort, _ = demo_data
    full = demo.make_cohort(seed=0)
    assert [s.image_id for s in cohort.queries] == [s.image_id for s in full.queries]
    assert all((a.image == b.image).all() for a, b in zip(cohort.queries, full.queries,
                                                          strict=True))


def test_split_is_seeded_and_refuses_a_gallery_too_small():
    people = [f"p{i}" for i in range(11)] + list(DEMO_HELD_OUT)
    assert demo.split_people(people, seed=3) == demo.split_people(people, seed=3)
    assert demo.split_people(people, seed=0) != demo.split_people(people, seed=1)
    with pytest.raises(ValueError):
        demo.split_people(people, head_people=11 - MIN_SUBJECTS + 1)


def test_fitted_head_is_a_checkpoint_the_server_config_loads(demo_data, tmp_path):
    import numpy as np

    from encoder.views import configured_ensemble
    from server.config import EncoderConfig

    _, cohort, training = demo_data
    small = [s for s in training if s.subject in sorted({t.subject for t in training})[:3]]
    small = [s for label in LABELS for s in [t for t in small if t.label == label][:3]]
    info = demo.fit_head(small, tmp_path / "head.pt")
    assert info["faces"] == len(small) and info["dimensions"] == len(LABELS) - 1
    config = EncoderConfig(name="finetuned", weights=info["checkpoint"])
    ensemble = configured_ensemble(config.name, config.scheme_id(), config.weights)
    (encoder,) = ensemble.encoders.values()
    assert encoder.spec.embedding_dim == len(LABELS) - 1
    assert config.scheme_id() == "finetuned:orig,finetuned:flip"
    features = encoder.features(encoder.preprocess(np.stack([cohort.queries[0].image])))
    assert np.isfinite(encoder.head(features).detach().numpy()).all()


def test_summary_names_the_served_encoder_and_the_planted_region_figure():
    summary = {
        "disclaimer": demo.DISCLAIMER,
        "cohort": {"syndromes": {k: {} for k in LABELS}, "gallery_subjects": ["a"] * 6,
                   "held_out_subjects": list(DEMO_HELD_OUT), "head_subjects": ["h"] * 5,
                   "query_images": 12},
        "encoder": {"checkpoint": "x.pt", "dimensions": 5, "faces": 60, "fit_s": 40.0},
        "server": {"address": "127.0.0.1:1", "encoder_id": "finetuned"},
        "held_out": {"queries": 12, "macro_top1": 0.5, "macro_top3": 1.0,
                     "leans_on_planted": 9,
                     "confidence": {"mean": 0.4, "mean_right": 0.5, "mean_wrong": 0.3,
                                    "over_99": 0, "given": 12, "accuracy": 0.5}},
    }
    text = demo._markdown(summary)
    assert demo.DISCLAIMER in text
    assert "syndrome head" in text and "5 other people, none of them in the gallery" in text
    assert "40.0 s" in text and "planted region first: 9/12" in text
    assert "over 99 % on 0 of 12" in text
    assert "make serve" in text and "frozen SFace" in text
    assert "frozen SFace" in demo.encoder_words({**summary, "encoder": {"fit_s": 0.0}})
