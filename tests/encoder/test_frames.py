"""Animated GIFs and multi-page TIFFs: the first frame with a face is used and named;
the decompression-bomb message quotes one limit and maps to RESOURCE_EXHAUSTED."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from encoder.errors import ImageTooLarge, NoFaceFound
from encoder.image import DEFAULT_MAX_FRAMES, decode_image, iter_frames
from tests.encoder.test_image import _png_with_header

NAME = "grace_hopper.jpg"


@pytest.fixture(scope="module")
def hopper(photo_paths) -> Image.Image:
    with Image.open(photo_paths[NAME]) as im:
        return im.convert("RGB")


def _animated(frames: list[Image.Image], fmt: str) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _black(size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, (0, 0, 0))


def test_gif_with_a_black_first_frame_uses_the_face_in_frame_2(pipeline, hopper, faces):
    gif = _animated([_black(hopper.size), hopper, _black(hopper.size)], "GIF")
    face = pipeline.face(gif)
    assert face.frame == 1 and face.face_count == 1
    # the GIF palette costs some colour, not the face's position
    moved = np.linalg.norm(face.alignment.landmarks_photo - faces[NAME].alignment.landmarks_photo, axis=1)
    assert moved.mean() < 3.0
    assert [f.frame for f in pipeline.faces(gif)] == [1]
    rgb, result = pipeline.detect(gif)
    assert result.count == 1 and rgb.any()  # the frame with the face, not the black one


def test_gif_whose_first_frame_has_the_face_uses_frame_0_and_decodes_no_further(
    pipeline, hopper
):
    gif = _animated([hopper, _black(hopper.size)], "GIF")
    assert pipeline.face(gif).frame == 0


def test_still_photos_report_frame_0(faces):
    assert {f.frame for f in faces.values()} == {0}


def test_gif_without_a_face_in_any_frame_names_the_frames_tried(pipeline, hopper):
    gif = _animated([_black(hopper.size), Image.new("RGB", hopper.size, (90, 90, 90))], "GIF")
    with pytest.raises(NoFaceFound) as info:
        pipeline.face(gif)
    message = str(info.value)
    assert "2-frame GIF" in message and "tried frames 0, 1" in message, message
    assert "512x600" in message


def test_long_animation_is_searched_only_in_its_first_frames(pipeline, hopper):
    size = (64, 64)
    frames = [Image.new("RGB", size, (i, i, i)) for i in range(0, 240, 10)]  # 24 face-less frames
    gif = _animated(frames, "GIF")
    with pytest.raises(NoFaceFound) as info:
        pipeline.face(gif)
    tried = ", ".join(str(i) for i in range(DEFAULT_MAX_FRAMES))
    assert f"24-frame GIF (64x64): tried frames {tried} (0-based, the first 8)" in str(info.value)


def test_multi_page_tiff_uses_the_first_page_with_a_face(pipeline, hopper):
    tiff = _animated([_black(hopper.size), hopper], "TIFF")
    face = pipeline.face(tiff)
    assert face.frame == 1
    assert np.array_equal(pipeline.load(tiff, frame=1), np.asarray(hopper))
    assert not pipeline.load(tiff).any()  # frame 0 is still the first page


def test_iter_frames_gives_index_count_and_format_and_stops_at_max_frames(hopper):
    gif = _animated([_black(hopper.size), hopper, _black(hopper.size)], "GIF")
    frames = list(iter_frames(gif, max_frames=2))
    assert [(f.index, f.count, f.format) for f in frames] == [(0, 3, "GIF"), (1, 3, "GIF")]
    assert not frames[0].rgb.any() and frames[1].rgb.any()
    assert np.array_equal(frames[0].rgb, decode_image(gif))
    [still] = iter_frames(np.asarray(hopper))
    assert (still.index, still.count) == (0, 1)


def test_load_of_a_frame_the_image_lacks_is_an_error(pipeline, hopper):
    with pytest.raises(ValueError, match="no frame 3"):
        pipeline.load(_animated([hopper, hopper], "GIF"), frame=3)


# ---------------------------------------------------------------- decompression bombs


def _limits_quoted(message: str) -> list[str]:
    return re.findall(r"limit(?: is| of)? ([\d.,]+ ?\w+)", message)


@pytest.mark.parametrize(
    ("width", "height"), [(100_000, 100_000), (50_000, 1_000), (20_000, 20_000)]
)
def test_bomb_message_quotes_exactly_one_limit(width, height):
    # 1e10 px trips Pillow's own bomb check at open, 5e7 ours, 4e8 Pillow's warning range
    with pytest.raises(ImageTooLarge) as info:
        decode_image(_png_with_header(width, height))
    message = str(info.value)
    assert _limits_quoted(message) == ["40.0 megapixels"], message
    assert "178956970" not in message and "DOS" not in message
    assert f"{width * height / 1e6:.1f} megapixels" in message


def test_bomb_message_quotes_pillows_limit_when_that_is_the_lower_one():
    with pytest.raises(ImageTooLarge) as info:
        decode_image(_png_with_header(100_000, 100_000), max_pixels=10**12)
    assert _limits_quoted(str(info.value)) == [f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.1f} megapixels"]


def test_image_too_large_maps_to_resource_exhausted_and_other_image_errors_do_not():
    import grpc

    from encoder.errors import NotAnImage
    from server.errors import status_for

    assert status_for(ImageTooLarge("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(NotAnImage("x")) == grpc.StatusCode.INVALID_ARGUMENT
