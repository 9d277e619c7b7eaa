"""Composite faces: numpy means of real aligned crops, group size and balance checks."""

from __future__ import annotations

import numpy as np
import pytest

from explain.syndrome.maps import GroupTooSmall, check_group, composite


def test_composite_equals_numpy_mean_of_crops(group):
    stack, subjects = group
    comp = composite(stack, subjects=subjects)
    expected = stack.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(comp.mean, expected, atol=1e-4)
    assert comp.image.dtype == np.uint8 and comp.image.shape == (112, 112, 3)
    np.testing.assert_array_equal(comp.image, np.clip(np.rint(expected), 0, 255).astype(np.uint8))
    # the composite is a new face, not any member
    assert all(np.abs(comp.image.astype(int) - c).mean() > 5 for c in stack)


def test_subject_balanced_composite_gives_every_subject_equal_weight(group, crops):
    stack, _ = group
    three_a = np.stack([stack[0], stack[1], stack[0], stack[2]])
    comp = composite(three_a, subjects=("a", "a", "a", "b"), balance="subject")
    expected = 0.5 * three_a[:3].astype(np.float64).mean(0) + 0.5 * three_a[3].astype(np.float64)
    np.testing.assert_allclose(comp.mean, expected, atol=1e-3)
    plain = composite(three_a, subjects=("a", "a", "a", "b"))
    assert np.abs(plain.mean - expected).max() > 1.0


def test_group_below_minimum_size_raises(group):
    stack, _ = group
    with pytest.raises(GroupTooSmall, match="at least 2"):
        composite(stack[:1])
    with pytest.raises(GroupTooSmall, match="at least 5"):
        composite(stack, min_size=5)


def test_small_and_imbalanced_groups_warn(group):
    stack, subjects = group
    assert any("small group" in w for w in composite(stack, subjects=subjects).warnings)
    check = check_group(8, ["a"] * 6 + ["b", "c"], small_size=5)
    assert len(check.warnings) == 1 and "imbalanced" in check.warnings[0]
    assert check.subjects == 3 and check.images_per_subject_max == 6
    assert check_group(6, ["a", "a", "b", "b", "c", "c"], small_size=5).warnings == ()
