"""The synthetic-syndrome generator on real faces: locality, masks, augmentation, determinism, splits."""

from __future__ import annotations

import numpy as np
import pytest

from research import synth


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(axis=-1)


@pytest.mark.parametrize("name", sorted(synth.SYNDROMES))
def test_deformation_changes_pixels_inside_its_region_only(tom_source, name):
    canvas, lm = tom_source.canvas, tom_source.landmarks
    field = synth.deformation_field(name, lm, canvas.shape[:2])
    out, region = synth.deform(canvas, lm, name)
    diff = _abs_diff(out, canvas)
    assert np.array_equal(out[~field.support], canvas[~field.support])
    assert diff[region].mean() > 3.0, "the syndrome must visibly change its region"
    assert diff[~region].mean() < 0.15 * diff[region].mean()
    assert region.sum() < 0.06 * region.size, "a syndrome is local, not the whole face"


@pytest.mark.parametrize(
    ("name", "landmarks_inside"),
    [("wide_eyes", (0, 1)), ("narrow_eyes", (0, 1)), ("downslant", (0, 1)), ("broad_nose", (2,))],
)
def test_region_mask_covers_the_landmarks_it_deforms(tom_source, name, landmarks_inside):
    _, region = synth.deform(tom_source.canvas, tom_source.landmarks, name)
    for i in landmarks_inside:
        x, y = np.rint(tom_source.landmarks[i]).astype(int)
        assert region[y, x]
    others = [i for i in range(5) if i not in landmarks_inside]
    for i in others:
        x, y = np.rint(tom_source.landmarks[i]).astype(int)
        assert not region[y, x]


def test_lower_face_regions_sit_below_the_nose_in_order(tom_source):
    lm = tom_source.landmarks
    rows = {}
    for name in ("long_philtrum", "small_chin"):
        _, region = synth.deform(tom_source.canvas, lm, name)
        rows[name] = np.nonzero(region)[0].mean()
    mouth_y = lm[3:, 1].mean()
    assert lm[2, 1] < rows["long_philtrum"] < mouth_y < rows["small_chin"]


def test_wide_and_narrow_eyes_move_the_eyes_in_opposite_directions(tom_source):
    lm = tom_source.landmarks
    shape = tom_source.canvas.shape[:2]
    left = np.rint(lm[0]).astype(int)
    wide = synth.deformation_field("wide_eyes", lm, shape).displacement[left[1], left[0]]
    narrow = synth.deformation_field("narrow_eyes", lm, shape).displacement[left[1], left[0]]
    assert wide[0] < -2.0 < 2.0 < narrow[0]


def test_deformation_grows_with_strength(tom_source):
    canvas, lm = tom_source.canvas, tom_source.landmarks
    weak, region = synth.deform(canvas, lm, "broad_nose", strength=0.5)
    strong, _ = synth.deform(canvas, lm, "broad_nose", strength=1.5)
    assert _abs_diff(strong, canvas)[region].mean() > 1.5 * _abs_diff(weak, canvas)[region].mean()


def test_mask_and_landmarks_move_with_augmentation(tom_source):
    canvas, lm = tom_source.canvas, tom_source.landmarks
    deformed, region = synth.deform(canvas, lm, "wide_eyes")
    aug = synth.Augmentation(angle_deg=8.0, scale=1.05, shift=(5.0, -4.0), flip=True)
    moved, moved_mask, moved_lm = synth.augment(deformed, region, lm, aug)
    reference, _, _ = synth.augment(canvas, region, lm, aug)
    diff = _abs_diff(moved, reference)
    # The change made by the syndrome lies under the transformed mask, not the original one.
    assert diff[moved_mask].mean() > 4 * diff[~moved_mask].mean()
    assert diff[moved_mask].mean() > 1.5 * diff[region & ~moved_mask].mean()
    assert abs(int(moved_mask.sum()) - int(region.sum())) < 0.15 * region.sum()
    # Flipped landmarks keep index 0 on the image's left and sit inside the moved mask.
    assert moved_lm[0, 0] < moved_lm[1, 0] and moved_lm[3, 0] < moved_lm[4, 0]
    for i in (0, 1):
        x, y = np.rint(moved_lm[i]).astype(int)
        assert moved_mask[y, x]


def test_colour_jitter_leaves_geometry_and_mask_alone(tom_source):
    canvas, lm = tom_source.canvas, tom_source.landmarks
    _, region = synth.deform(canvas, lm, "broad_nose")
    aug = synth.Augmentation(brightness=15.0, contrast=1.1, saturation=0.8)
    out, mask, out_lm = synth.augment(canvas, region, lm, aug)
    assert np.array_equal(mask, region)
    np.testing.assert_allclose(out_lm, lm, atol=1e-4)
    assert not np.array_equal(out, canvas)


def test_generation_is_deterministic_given_a_seed(sources):
    sizes = {"wide_eyes": 3, "small_chin": 2}
    a = list(synth.generate(sources, sizes, seed=7))
    b = list(synth.generate(sources, sizes, seed=7))
    c = list(synth.generate(sources, sizes, seed=8))
    assert [s.image_id for s in a] == [s.image_id for s in b]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
        assert x.augmentation == y.augmentation and x.subject == y.subject
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c, strict=True))


def test_changing_one_class_size_leaves_other_samples_unchanged(sources):
    small = list(synth.generate(sources, {"wide_eyes": 2, "broad_nose": 2}, seed=3))
    large = list(synth.generate(sources, {"wide_eyes": 5, "broad_nose": 2}, seed=3))
    by_id = {s.image_id: s for s in large}
    for s in small:
        assert np.array_equal(s.image, by_id[s.image_id].image)


def test_class_sizes_are_honoured_and_spread_over_subjects(sources):
    sizes = {"wide_eyes": 12, "narrow_eyes": 3, "long_philtrum": 0}
    samples = list(synth.generate(sources, sizes, seed=0))
    counts = {k: sum(1 for s in samples if s.label == k) for k in sizes}
    assert counts == sizes
    subjects = {s.subject for s in samples if s.label == "wide_eyes"}
    assert len(subjects) >= 8  # round-robin over the sources before repeating one
    assert all(s.image.shape == (112, 112, 3) and s.mask.shape == (112, 112) for s in samples)


def test_multi_face_photo_gives_one_subject_per_face(sources):
    t1 = [s for s in sources if s.source_id.startswith("t1.jpg")]
    assert len(t1) == 6 and len({s.subject for s in t1}) == 6
    person_a = [s for s in sources if s.subject == "person_a"]
    assert len(person_a) == 2  # two photos, one subject


def test_subject_splits_are_disjoint_and_samples_follow_them(sources):
    subjects = [s.subject for s in sources]
    splits = synth.split_subjects(subjects, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    synth.assert_subject_disjoint(splits)
    assert sorted(sum(splits.values(), ())) == sorted(set(subjects))
    assert all(len(v) >= 1 for v in splits.values())
    seen = {}
    for name, members in splits.items():
        src = [s for s in sources if s.subject in members]
        for sample in synth.generate(src, {"downslant": 4}, seed=0, split=name):
            assert sample.subject in members
            seen.setdefault(sample.subject, set()).add(name)
    assert all(len(v) == 1 for v in seen.values())
    assert synth.split_subjects(subjects, {"a": 0.5, "b": 0.5}, seed=1) == \
        synth.split_subjects(subjects, {"a": 0.5, "b": 0.5}, seed=1)


def test_overlapping_splits_are_rejected():
    with pytest.raises(synth.SubjectLeak):
        synth.assert_subject_disjoint({"train": ["s1", "s2"], "test": ["s2", "s3"]})


def test_subject_folds_partition_the_subjects():
    subjects = [f"s{i}" for i in range(10)]
    folds = synth.subject_folds(subjects, 3, seed=0)
    assert sorted(sum(folds, ())) == subjects
    assert all(len(f) >= 3 for f in folds)


def test_dataset_folder_round_trips_through_the_manifest(sources, tmp_path):
    samples = list(synth.generate(sources, {"broad_nose": 2, "downslant": 1}, seed=0, split="train"))
    manifest = synth.write_dataset(samples, tmp_path)
    rows = synth.read_manifest(manifest)
    assert [r.image_id for r in rows] == [s.image_id for s in samples]
    header = manifest.read_text().splitlines()[0].split(",")
    assert header[:3] == ["image_id", "subject", "label"]  # GestaltMatcher's split CSV columns
    for row, sample in zip(rows, samples, strict=True):
        image, mask = synth.load_image_and_mask(tmp_path, row)
        assert np.array_equal(image, sample.image) and np.array_equal(mask, sample.mask)
        assert row.subject == sample.subject and row.label == sample.label
        np.testing.assert_allclose(row.landmarks, sample.landmarks, atol=0.01)


def test_the_demo_cohort_puts_every_syndrome_on_every_gallery_subject_and_holds_people_out(
        sources):
    held = (sources[0].subject,)
    c = synth.cohort(sources, held, per_source=1, queries_per_source=1, seed=0)
    assert held[0] not in c.gallery_subjects and c.query_subjects == held
    per_label = {lab: {s.subject for s in c.gallery if s.label == lab} for lab in synth.SYNDROMES}
    assert all(subjects == set(c.gallery_subjects) for subjects in per_label.values())
    assert len(c.gallery) == len(synth.SYNDROMES) * sum(1 for s in sources
                                                       if s.subject not in held)
    assert {s.label for s in c.queries} == set(synth.SYNDROMES)
    assert all(synth.gallery_genes(s) == synth.LABELS[s.label].genes for s in c.gallery)
