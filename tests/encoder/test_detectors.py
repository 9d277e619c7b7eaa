"""The detector registry, YuNet's decoding against OpenCV's, and how far mtcnn and yunet agree."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from encoder.assets import PHOTOS, yunet_onnx_path
from encoder.detect import (
    DEFAULT_DETECTOR,
    LANDMARK_ORDER,
    DetectorSpec,
    create_detector,
    detector_spec,
    list_detectors,
    register_detector,
    shared_detector,
)
from encoder.detectors.compare import landmark_disagreement_px, match_detections
from encoder.errors import UnknownDetector
from encoder.image import load_rgb
from encoder.pipeline import FacePipeline

SINGLE_FACE = [p.name for p in PHOTOS if p.faces == 1 and not p.aligned]

# ---------------------------------------------------------------- the registry


def test_both_detectors_are_registered_and_the_default_is_one_of_them():
    assert {"mtcnn", "yunet"} <= set(list_detectors())
    assert DEFAULT_DETECTOR in list_detectors()


def test_unknown_detector_names_the_known_ones():
    with pytest.raises(UnknownDetector, match="'retinaface'.*mtcnn, yunet"):
        create_detector("retinaface")
    with pytest.raises(UnknownDetector):
        detector_spec("")
    with pytest.raises(UnknownDetector, match="known detectors"):
        shared_detector("MTCNN")


def test_pipeline_refuses_an_unknown_detector_when_built_not_on_the_first_photo():
    with pytest.raises(UnknownDetector, match="'nope'"):
        FacePipeline("nope")


def test_a_name_cannot_be_registered_twice_by_another_builder():
    spec = detector_spec("yunet")
    with pytest.raises(ValueError, match="registered twice"):
        register_detector(spec)(lambda **options: None)


def test_specs_declare_their_input_policy_and_a_complete_landmark_order():
    for name in ("mtcnn", "yunet"):
        spec = detector_spec(name)
        assert spec.name == name
        assert spec.detect_side in (480, 640) and spec.stride >= 1 and spec.min_face_size > 0
        assert sorted(spec.landmark_order) == sorted(LANDMARK_ORDER)
    assert detector_spec("yunet").stride == 32
    with pytest.raises(ValueError, match="landmark_order"):
        DetectorSpec("bad", 640, 1, ("eye_left", "eye_left", "nose", "mouth_left", "x"), 10)


def test_spec_reorders_a_networks_landmarks_into_the_canonical_order():
    order = ("nose", "eye_right", "eye_left", "mouth_right", "mouth_left")
    spec = DetectorSpec("reordered", 640, 1, order, 10)
    emitted = np.arange(10.0).reshape(5, 2)  # row i is the network's i-th point
    canonical = emitted[spec.to_canonical]
    for i, name in enumerate(LANDMARK_ORDER):
        assert np.array_equal(canonical[i], emitted[order.index(name)])


def test_shared_detector_is_one_instance_per_name():
    assert shared_detector("yunet") is shared_detector("yunet")
    assert shared_detector("yunet") is not shared_detector("mtcnn")


# ---------------------------------------------------------------- YuNet decoding


@pytest.mark.parametrize("name", ["grace_hopper.jpg", "t1.jpg", "person_a_1.jpg"])
def test_yunet_decodes_exactly_as_opencvs_face_detector_yn(photo_paths, name):
    """Same file, same pixels: onnxruntime on the float-folded graph + our decoding
    == OpenCV's FaceDetectorYN on the quantized file (boxes, 5 points, scores)."""
    rgb = load_rgb(photo_paths[name])
    ours = create_detector("yunet", detect_side=None).detect(rgb)
    h, w = rgb.shape[:2]
    reference = cv2.FaceDetectorYN.create(str(yunet_onnx_path()), "", (w, h), 0.6, 0.3, 5000)
    _, found = reference.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
    found = found[np.argsort(-found[:, 14])]
    assert ours.count == len(found)
    for det, row in zip(ours.detections, found, strict=True):
        x, y, bw, bh = row[:4]
        assert np.allclose(det.box, [x, y, x + bw, y + bh], atol=0.05)
        assert np.allclose(det.landmarks, row[4:14].reshape(5, 2), atol=0.05)
        assert det.score == pytest.approx(float(row[14]), abs=1e-4)


@pytest.mark.parametrize("detector", ["mtcnn", "yunet"])
def test_landmarks_come_in_the_canonical_image_left_right_order(faces_by_detector, detector):
    for name, face in faces_by_detector[detector].items():
        eye_l, eye_r, nose, mouth_l, mouth_r = face.alignment.landmarks_photo
        assert eye_l[0] < eye_r[0] and mouth_l[0] < mouth_r[0], name
        assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1]), name


def test_yunet_finds_the_faces_of_a_photo_whose_sides_are_not_multiples_of_32(photo_paths):
    rgb = load_rgb(photo_paths["grace_hopper.jpg"])[:587, :499]
    result = create_detector("yunet", detect_side=None).detect(rgb)
    assert result.count == 1 and result.best.score > 0.85


# ---------------------------------------------------------------- agreement


@pytest.fixture(scope="module")
def both(photo_paths):
    """photo name -> (RGB, mtcnn result, yunet result) for every photo but the aligned crop."""
    out = {}
    for p in PHOTOS:
        if p.aligned:
            continue
        rgb = load_rgb(photo_paths[p.name])
        out[p.name] = (rgb, shared_detector("mtcnn").detect(rgb), shared_detector("yunet").detect(rgb))
    return out


def test_both_detectors_find_every_face_of_every_bundled_photo(both):
    for p in PHOTOS:
        if p.aligned:
            continue
        _, mtcnn, yunet = both[p.name]
        assert mtcnn.count == yunet.count == p.faces, p.name
        assert len(match_detections(mtcnn, yunet)) == p.faces, p.name


@pytest.mark.parametrize("name", SINGLE_FACE)
def test_single_face_landmarks_agree_within_5_px_of_the_aligned_crop(both, name):
    # measured 1.4-4.0 px in the 112x112 crop (bench/bench_pipeline.py)
    _, mtcnn, yunet = both[name]
    assert landmark_disagreement_px(mtcnn.best, yunet.best) < 5.0


def test_group_photo_landmarks_agree_within_11_px_per_face(both):
    # six ~50 px faces in the detection image: measured 3.6-9.0 px, mean 6.0
    _, mtcnn, yunet = both["t1.jpg"]
    px = [landmark_disagreement_px(a, b) for a, b in match_detections(mtcnn, yunet)]
    assert len(px) == 6 and max(px) < 11.0 and np.mean(px) < 8.0, px


def _crop_cosines(sface, results) -> torch.Tensor:
    """Per single-face photo, the SFace cosine of its crops aligned on two detections:
    ``results[name]`` is (RGB, one detection result, the other)."""
    from encoder.align import align_face

    crops = []
    for name in SINGLE_FACE:
        rgb, a, b = results[name]
        crops += [align_face(rgb, a.best.landmarks).crop, align_face(rgb, b.best.landmarks).crop]
    with torch.inference_mode():
        emb = torch.nn.functional.normalize(sface(sface.preprocess(np.stack(crops))), dim=1)
    return (emb[0::2] * emb[1::2]).sum(dim=1)


def test_single_face_crops_of_both_detectors_embed_alike_with_sface(both, sface):
    cosines = _crop_cosines(sface, both)
    # measured 0.93-0.98; the same person photographed twice scores 0.6-0.78
    assert cosines.min() > 0.9, cosines


def test_yunet_on_opencvs_dnn_finds_what_onnxruntime_finds(photo_paths):
    """The fallback where onnxruntime is not installed (the container image) runs the same graph."""
    rgb = load_rgb(photo_paths["t1.jpg"])
    ort_result = create_detector("yunet", runtime="onnxruntime").detect(rgb)
    cv_result = create_detector("yunet", runtime="opencv").detect(rgb)
    assert ort_result.count == cv_result.count == 6
    for a, b in zip(ort_result.detections, cv_result.detections, strict=True):
        assert np.allclose(a.landmarks, b.landmarks, atol=0.01)
        assert a.score == pytest.approx(b.score, abs=1e-4)
    with pytest.raises(ValueError, match="runtime"):
        create_detector("yunet", runtime="tensorrt")


# ------------------------------------------------- YuNet at its bounded detect side


@pytest.fixture(scope="module")
def bounded_and_full(photo_paths):
    """photo name -> (RGB, YuNet at its spec's detect side, YuNet at full resolution)."""
    bounded = shared_detector("yunet")
    full = create_detector("yunet", detect_side=None)
    out = {}
    for p in PHOTOS:
        if not p.aligned:
            rgb = load_rgb(photo_paths[p.name])
            out[p.name] = (rgb, bounded.detect(rgb), full.detect(rgb))
    return out


def test_yunet_detects_at_a_bounded_side_and_maps_the_landmarks_back(bounded_and_full):
    side = detector_spec("yunet").detect_side
    assert side == 640  # GM-Arc's longest side (480 moved the landmarks; see yunet.py)
    rgb, bounded, full = bounded_and_full["t1.jpg"]
    assert bounded.detect_scale == pytest.approx(side / max(rgb.shape[:2]), rel=1e-2)
    assert full.detect_scale == 1.0


@pytest.mark.parametrize("name", SINGLE_FACE)
def test_bounded_side_landmarks_lie_within_a_few_px_of_full_size_detection(bounded_and_full, name):
    # measured at 640, the photos over 640 px: 1.2-2.8 px in the 112x112 crop (at 480: 0-4.6)
    _, bounded, full = bounded_and_full[name]
    assert bounded.count == full.count == 1
    assert landmark_disagreement_px(full.best, bounded.best) < 5.5


def test_bounded_side_finds_the_group_photos_faces_where_full_size_does(bounded_and_full):
    # six ~50 px faces at side 640: measured up to 7.3 px, mean 4.6 (at 480: 1.6-9.5, mean 4.9)
    _, bounded, full = bounded_and_full["t1.jpg"]
    px = [landmark_disagreement_px(a, b) for a, b in match_detections(full, bounded)]
    assert len(px) == 6 and max(px) < 10.5 and np.mean(px) < 6.0, px


def test_bounded_side_crops_embed_like_full_size_crops_with_sface(bounded_and_full, sface):
    cosines = _crop_cosines(sface, bounded_and_full)
    # measured 0.93-1.0 (mtcnn's crops against yunet's: 0.93-0.98)
    assert cosines.min() > 0.9, cosines
