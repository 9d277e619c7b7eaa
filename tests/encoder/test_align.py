"""5-point similarity alignment, its inverse, and maps warped back onto the photo."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import SimilarityTransform

from encoder.align import (
    ARCFACE_TEMPLATE_112,
    TEMPLATES,
    align_face,
    apply_affine,
    get_template,
    identity_alignment,
    similarity_transform,
    warp_to_crop,
    warp_to_photo,
)


def _random_similarity(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(-np.pi, np.pi)
    scale = rng.uniform(0.2, 5.0)
    c, s = np.cos(angle), np.sin(angle)
    return np.array(
        [
            [scale * c, -scale * s, rng.uniform(-300, 300)],
            [scale * s, scale * c, rng.uniform(-300, 300)],
        ]
    )


# ---------------------------------------------------------------- templates


def test_arcface_template_is_insightfaces_arcface_dst():
    assert ARCFACE_TEMPLATE_112.shape == (5, 2)
    assert ARCFACE_TEMPLATE_112[0].tolist() == [38.2946, 51.6963]
    assert ARCFACE_TEMPLATE_112[4].tolist() == [70.7299, 92.2041]
    assert TEMPLATES["arcface112"].points is ARCFACE_TEMPLATE_112


def test_gm100_and_facenet160_templates_scale_the_arcface_geometry():
    assert get_template("gm100gray").size == (100, 100)
    assert np.allclose(get_template("gm100gray").points, ARCFACE_TEMPLATE_112 * 100 / 112)
    assert get_template("facenet160").size == (160, 160)
    assert np.allclose(get_template("facenet160").points, ARCFACE_TEMPLATE_112 * 160 / 112)


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ValueError, match="arcface112"):
        get_template("nope")


# ---------------------------------------------------------------- the transform


def test_similarity_transform_recovers_an_exact_similarity():
    rng = np.random.default_rng(1)
    for _ in range(20):
        truth = _random_similarity(rng)
        src = rng.uniform(0, 500, (5, 2))
        estimated = similarity_transform(src, apply_affine(truth, src))
        assert np.allclose(estimated, truth, atol=1e-8)


def test_similarity_transform_is_the_least_squares_fit_of_skimage():
    rng = np.random.default_rng(2)
    for _ in range(20):
        src = rng.uniform(0, 500, (5, 2))
        dst = apply_affine(_random_similarity(rng), src) + rng.normal(0, 5, (5, 2))
        reference = SimilarityTransform.from_estimate(src, dst).params[:2]
        assert np.allclose(similarity_transform(src, dst), reference, atol=1e-8)


def test_similarity_transform_never_reflects():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 100, (5, 2))
    mirrored = src * np.array([-1.0, 1.0])
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_degenerate_landmarks_raise_value_error():
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="finite"):
        similarity_transform(np.full((5, 2), np.nan), ARCFACE_TEMPLATE_112)


# ---------------------------------------------------------------- align_face


def test_landmarks_already_on_the_template_give_the_identity_warp(photo_paths):
    from encoder.image import load_rgb

    crop = load_rgb(photo_paths["Tom_Hanks_54745.png"])
    alignment = align_face(crop, ARCFACE_TEMPLATE_112)
    assert np.allclose(alignment.photo_to_crop, [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    assert np.array_equal(alignment.crop, crop)


def test_align_face_lands_landmarks_on_each_template(faces, photo_paths):
    from encoder.image import load_rgb

    face = faces["grace_hopper.jpg"]
    rgb = load_rgb(photo_paths["grace_hopper.jpg"])
    for name, template in TEMPLATES.items():
        alignment = align_face(rgb, face.alignment.landmarks_photo, name)
        assert alignment.crop.shape == (*template.size, 3)
        assert alignment.template == name
        scale = template.size[0] / 112
        # the fit's residual is face shape and pose: 2.0 px (mtcnn), 3.4 px (yunet) at 112
        assert alignment.template_error_px() < 4.0 * scale


def test_inverse_maps_template_points_back_to_the_detected_landmarks(faces):
    for name, face in faces.items():
        a = face.alignment
        round_trip = a.crop_to_photo @ np.vstack([a.photo_to_crop, [0, 0, 1]])
        assert np.allclose(round_trip, [[1, 0, 0], [0, 1, 0]], atol=1e-9), name
        back = apply_affine(a.crop_to_photo, get_template(a.template).points)
        # the fit's residual in photo pixels: the crop residual times the photo/crop scale
        photo_per_crop_px = np.sqrt(abs(np.linalg.det(a.crop_to_photo[:, :2])))
        mean_error = np.linalg.norm(back - a.landmarks_photo, axis=1).mean()
        assert mean_error <= a.template_error_px() * photo_per_crop_px + 1e-6, name
        assert np.allclose(apply_affine(a.crop_to_photo, a.landmarks_crop), a.landmarks_photo)


def test_border_replicate_fills_outside_pixels_with_edge_colours(photo_paths):
    from encoder.image import load_rgb

    rgb = load_rgb(photo_paths["grace_hopper.jpg"])
    # landmarks near the top-left corner: much of the crop falls outside the photo
    corner = ARCFACE_TEMPLATE_112 * 0.8 - 30
    black = align_face(rgb, corner, border="constant").crop
    edge = align_face(rgb, corner, border="replicate").crop
    assert (black[:5, :5] == 0).all()
    assert (edge[:5, :5] != 0).any()


def test_align_face_rejects_bad_inputs(photo_paths):
    from encoder.image import load_rgb

    rgb = load_rgb(photo_paths["grace_hopper.jpg"])
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        align_face(rgb, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="uint8"):
        align_face(rgb.astype(np.float32), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="border"):
        align_face(rgb, ARCFACE_TEMPLATE_112, border="wrap")


# ---------------------------------------------------------------- warp_to_photo


def test_all_ones_feature_map_warps_to_one_inside_the_face_and_zero_far_away(faces):
    a = faces["grace_hopper.jpg"].alignment
    photo_map, mask = warp_to_photo(np.ones((7, 7)), a, return_mask=True)
    assert photo_map.shape == a.photo_size and photo_map.dtype == np.float32
    assert np.isfinite(photo_map).all()
    # the triangle of eyes and mouth lies well inside the crop
    inner = a.landmarks_photo.mean(axis=0).round().astype(int)
    x1, y1 = a.landmarks_photo.min(axis=0).astype(int)
    x2, y2 = a.landmarks_photo.max(axis=0).astype(int)
    assert np.allclose(photo_map[y1:y2, x1:x2], 1.0, atol=1e-5)
    assert photo_map[inner[1], inner[0]] == pytest.approx(1.0)
    assert photo_map[:10, :10].max() == 0.0 and photo_map[-10:, -10:].max() == 0.0
    assert mask[y1:y2, x1:x2].all() and not mask[:10, :10].any()
    # the covered area is the crop's area times the squared scale
    scale2 = abs(np.linalg.det(a.crop_to_photo[:, :2]))
    assert mask.sum() == pytest.approx(112 * 112 * scale2, rel=0.03)


def test_a_hot_spot_at_the_template_nose_lands_on_the_detected_nose(faces):
    for name, face in faces.items():
        a = face.alignment
        yy, xx = np.mgrid[0:112, 0:112]
        nx, ny = ARCFACE_TEMPLATE_112[2]
        hot = np.exp(-((xx - nx) ** 2 + (yy - ny) ** 2) / (2 * 3.0**2))
        photo_map = warp_to_photo(hot, a)
        py, px = np.unravel_index(np.argmax(photo_map), photo_map.shape)
        nose_on_photo = apply_affine(a.crop_to_photo, ARCFACE_TEMPLATE_112[2:3])[0]
        assert np.hypot(px - nose_on_photo[0], py - nose_on_photo[1]) <= 2.0, name


def test_warp_to_crop_undoes_warp_to_photo_inside_the_crop(faces):
    a = faces["person_a_2.jpg"].alignment
    rng = np.random.default_rng(4)
    smooth = np.kron(rng.normal(size=(7, 7)), np.ones((16, 16))).astype(np.float32)
    back = warp_to_crop(warp_to_photo(smooth, a), a)
    inner = (slice(20, 92), slice(20, 92))
    assert np.abs(back[inner] - smooth[inner]).mean() < 0.05


def test_warp_to_photo_rejects_non_finite_maps(faces):
    a = faces["grace_hopper.jpg"].alignment
    bad = np.ones((7, 7))
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        warp_to_photo(bad, a)


def test_identity_alignment_maps_the_crop_onto_itself(photo_paths):
    from encoder.image import load_rgb

    crop = load_rgb(photo_paths["Tom_Hanks_54745.png"])
    a = identity_alignment(crop)
    ramp = np.tile(np.arange(112, dtype=np.float32), (112, 1))
    assert np.allclose(warp_to_photo(ramp, a), ramp, atol=1e-4)
