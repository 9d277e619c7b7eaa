"""Image decoding on the real photos: formats, modes, EXIF orientation, limits, typed errors."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from encoder.errors import (
    EmptyImage,
    ImageError,
    ImageTooLarge,
    NotAnImage,
    TruncatedImage,
    UnsupportedImage,
)
from encoder.image import decode_image, load_rgb


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hopper(photo_paths) -> Image.Image:
    """grace_hopper.jpg decoded: a real 512x600 RGB photo."""
    with Image.open(photo_paths["grace_hopper.jpg"]) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def hopper_rgb(hopper) -> np.ndarray:
    return np.asarray(hopper).copy()


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height RGB; the pixel data is a stub."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- real photos


def test_every_real_photo_decodes_to_rgb_uint8_of_its_header_size(photo_paths):
    for name, path in photo_paths.items():
        rgb = decode_image(path.read_bytes())
        with Image.open(path) as im:
            width, height = im.size
        assert rgb.dtype == np.uint8, name
        assert rgb.shape == (height, width, 3), name
        assert rgb.flags.c_contiguous and rgb.flags.writeable, name


def test_load_rgb_gives_the_same_pixels_for_every_source_kind(photo_paths, hopper):
    path = photo_paths["grace_hopper.jpg"]
    reference = load_rgb(path.read_bytes())
    assert np.array_equal(load_rgb(str(path)), reference)
    assert np.array_equal(load_rgb(Path(path)), reference)
    assert np.array_equal(load_rgb(bytearray(path.read_bytes())), reference)
    with Image.open(path) as im:
        assert np.array_equal(load_rgb(im), reference)
    assert np.array_equal(load_rgb(reference), reference)


def test_load_rgb_returns_a_copy_the_caller_may_modify(hopper_rgb):
    out = load_rgb(hopper_rgb)
    out[:] = 0
    assert hopper_rgb.any()


# ---------------------------------------------------------------- formats and modes


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_decode_exactly(hopper, hopper_rgb, fmt):
    assert np.array_equal(decode_image(_encode(hopper, fmt)), hopper_rgb)


def test_lossless_webp_decodes_exactly(hopper, hopper_rgb):
    assert np.array_equal(decode_image(_encode(hopper, "WEBP", lossless=True)), hopper_rgb)


def test_lossy_webp_decodes_close_to_the_original(hopper, hopper_rgb):
    out = decode_image(_encode(hopper, "WEBP", quality=90))
    assert out.shape == hopper_rgb.shape
    assert np.abs(out.astype(int) - hopper_rgb).mean() < 4


def test_grayscale_l_decodes_to_equal_rgb_channels(hopper):
    gray = hopper.convert("L")
    out = decode_image(_encode(gray, "PNG"))
    expected = np.asarray(gray)
    for c in range(3):
        assert np.array_equal(out[:, :, c], expected)


def test_bilevel_mode_1_decodes_to_black_and_white(hopper):
    bilevel = hopper.convert("1")
    out = decode_image(_encode(bilevel, "PNG"))
    assert set(np.unique(out).tolist()) == {0, 255}
    assert np.array_equal(out[:, :, 0] == 255, np.asarray(bilevel))


def test_rgba_alpha_is_composited_on_white(hopper, hopper_rgb):
    rgba = hopper.convert("RGBA")
    alpha = np.zeros(hopper_rgb.shape[:2], dtype=np.uint8)
    alpha[:, 200:] = 255
    alpha[:, 100:200] = 128
    rgba.putalpha(Image.fromarray(alpha))
    out = decode_image(_encode(rgba, "PNG")).astype(int)
    assert (out[:, :100] == 255).all()
    assert np.array_equal(out[:, 200:], hopper_rgb[:, 200:])
    half = (hopper_rgb[:, 100:200].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(out[:, 100:200] - half).max() <= 1


def test_la_gray_with_alpha_is_composited_on_white(hopper):
    gray = np.asarray(hopper.convert("L"))
    alpha = np.full(gray.shape, 255, dtype=np.uint8)
    alpha[:50] = 0
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    out = decode_image(_encode(la, "PNG"))
    assert (out[:50] == 255).all()
    assert np.array_equal(out[50:, :, 1], gray[50:])


def test_palette_image_decodes_to_its_palette_colours(hopper):
    palette = hopper.quantize(64)
    assert palette.mode == "P"
    out = decode_image(_encode(palette, "PNG"))
    assert np.array_equal(out, np.asarray(palette.convert("RGB")))


def test_palette_transparency_is_composited_on_white(hopper):
    palette = hopper.quantize(64)
    data = np.asarray(palette).copy()
    data[:40] = 63
    im = Image.fromarray(data, mode="P")
    im.putpalette(palette.getpalette())
    gif = _encode(im, "GIF", transparency=63)
    out = decode_image(gif)
    assert (out[:40] == 255).all()
    assert not (out[40:] == 255).all()


def test_rgb_png_with_a_transparent_colour_key_is_composited_on_white(hopper_rgb):
    rgb = hopper_rgb.copy()
    rgb[:30] = (1, 2, 3)
    out = decode_image(_encode(Image.fromarray(rgb), "PNG", transparency=(1, 2, 3)))
    assert (out[:30] == 255).all()
    assert np.array_equal(out[30:], rgb[30:])


def test_gif_decodes_its_first_frame(hopper):
    first = hopper.quantize(64)
    second = Image.new("RGB", hopper.size, (255, 0, 0)).quantize(4)
    gif = _encode(first, "GIF", save_all=True, append_images=[second])
    out = decode_image(gif)
    assert np.array_equal(out, np.asarray(first.convert("RGB")))


def test_cmyk_tiff_decodes_to_the_original_rgb(hopper, hopper_rgb):
    out = decode_image(_encode(hopper.convert("CMYK"), "TIFF"))
    assert np.array_equal(out, hopper_rgb)


def test_cmyk_jpeg_decodes_close_to_the_original_rgb(hopper, hopper_rgb):
    out = decode_image(_encode(hopper.convert("CMYK"), "JPEG", quality=95))
    assert out.shape == hopper_rgb.shape
    assert np.abs(out.astype(int) - hopper_rgb).mean() < 4


def test_16_bit_grayscale_png_is_scaled_to_8_bit(hopper):
    gray8 = np.asarray(hopper.convert("L")).astype(np.uint16)
    im16 = Image.fromarray(gray8 * 257)
    assert im16.mode.startswith("I;16")
    out = decode_image(_encode(im16, "PNG"))
    assert np.array_equal(out[:, :, 0], gray8.astype(np.uint8))
    assert np.array_equal(out[:, :, 2], gray8.astype(np.uint8))


def test_32_bit_integer_tiff_is_scaled_from_the_16_bit_range(hopper):
    gray8 = np.asarray(hopper.convert("L")).astype(np.int32)
    im32 = Image.fromarray(gray8 * 257, mode="I")
    out = decode_image(_encode(im32, "TIFF"))
    assert np.array_equal(out[:, :, 1], gray8.astype(np.uint8))


def test_float_images_are_unsupported_with_a_reason(hopper):
    im = Image.fromarray(np.asarray(hopper.convert("L")).astype(np.float32), mode="F")
    with pytest.raises(UnsupportedImage, match="'F'"):
        decode_image(_encode(im, "TIFF"))


def test_arrays_of_each_shape_become_rgb(hopper_rgb):
    gray = hopper_rgb[:, :, 0]
    assert np.array_equal(load_rgb(gray)[:, :, 2], gray)
    assert np.array_equal(load_rgb(gray[:, :, None])[:, :, 1], gray)
    rgba = np.dstack([hopper_rgb, np.zeros_like(gray)])
    assert (load_rgb(rgba) == 255).all()
    rgba[:, :, 3] = 255
    assert np.array_equal(load_rgb(rgba), hopper_rgb)


def test_non_uint8_arrays_are_rejected(hopper_rgb):
    with pytest.raises(UnsupportedImage, match="uint8"):
        load_rgb(hopper_rgb.astype(np.float32))
    with pytest.raises(UnsupportedImage):
        load_rgb(np.zeros((4, 4, 2), dtype=np.uint8))


def test_unsupported_source_types_raise_type_error():
    with pytest.raises(TypeError):
        load_rgb(12345)  # type: ignore[arg-type]


# ---------------------------------------------------------------- EXIF orientation


def test_exif_orientation_6_rotates_the_decoded_photo(hopper):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    plain = decode_image(_encode(hopper, "JPEG", quality=92))
    rotated = decode_image(_encode(hopper, "JPEG", quality=92, exif=exif.tobytes()))
    h, w = plain.shape[:2]
    assert rotated.shape == (w, h, 3)
    assert np.array_equal(rotated, np.rot90(plain, k=-1))


def test_exif_orientation_is_applied_to_pil_images_too(hopper):
    exif = Image.Exif()
    exif[0x0112] = 8
    data = _encode(hopper, "JPEG", quality=92, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as im:
        out = load_rgb(im)
    assert out.shape == (hopper.size[0], hopper.size[1], 3)


# ---------------------------------------------------------------- typed errors


def test_empty_input_raises_empty_image():
    with pytest.raises(EmptyImage, match="0 bytes"):
        decode_image(b"")


def test_empty_array_raises_empty_image():
    with pytest.raises(EmptyImage):
        load_rgb(np.zeros((0, 10, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"Patient: Jane Example, DOB 1970-01-01\n" * 10, "text"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "PDF"),
        (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "binary"),
        (b"PK\x03\x04" + b"\x00" * 200, "ZIP"),
    ],
)
def test_non_images_raise_not_an_image_naming_what_they_look_like(data, kind):
    with pytest.raises(NotAnImage, match=kind) as info:
        decode_image(data)
    assert "Jane" not in str(info.value)


def test_heic_is_reported_as_unsupported_not_as_garbage():
    data = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 100
    with pytest.raises(UnsupportedImage, match="HEIC"):
        decode_image(data)


def test_formats_outside_the_accepted_list_are_unsupported(hopper):
    with pytest.raises(UnsupportedImage, match="PPM"):
        decode_image(_encode(hopper, "PPM"))


@pytest.mark.parametrize("name", ["grace_hopper.jpg", "person_a_2.jpg", "astronaut.png"])
def test_real_file_cut_in_half_raises_truncated_image(photo_paths, name):
    data = photo_paths[name].read_bytes()
    with pytest.raises(TruncatedImage, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_header_only_fragment_of_a_png_raises_truncated_image(photo_paths):
    data = photo_paths["astronaut.png"].read_bytes()
    with pytest.raises(TruncatedImage):
        decode_image(data[:20])


def test_corrupt_jpeg_header_is_a_typed_error_not_a_crash(photo_paths):
    data = bytearray(photo_paths["grace_hopper.jpg"].read_bytes())
    data[2:200] = bytes(198)
    with pytest.raises(ImageError):
        decode_image(bytes(data))


def test_header_claiming_100k_by_100k_pixels_raises_before_decoding():
    with pytest.raises(ImageTooLarge, match="megapixels"):
        decode_image(_png_with_header(100_000, 100_000))


def test_header_above_our_limit_but_below_pillows_raises_with_size_and_limit():
    with pytest.raises(ImageTooLarge) as info:
        decode_image(_png_with_header(50_000, 1_000))
    message = str(info.value)
    assert "50000x1000" in message and "40.0 megapixels" in message


def test_real_photo_over_a_small_pixel_limit_raises_image_too_large(photo_paths):
    data = photo_paths["grace_hopper.jpg"].read_bytes()
    with pytest.raises(ImageTooLarge, match="512x600"):
        decode_image(data, max_pixels=100_000)
    assert decode_image(data, max_pixels=512 * 600).shape == (600, 512, 3)


def test_pixel_limit_applies_to_arrays_and_pil_images(hopper, hopper_rgb):
    with pytest.raises(ImageTooLarge):
        load_rgb(hopper_rgb, max_pixels=1000)
    with pytest.raises(ImageTooLarge):
        load_rgb(hopper, max_pixels=1000)


def test_byte_limit_is_checked_for_bytes_and_paths(photo_paths):
    path = photo_paths["grace_hopper.jpg"]
    size = path.stat().st_size
    with pytest.raises(ImageTooLarge, match=f"{size} bytes"):
        decode_image(path.read_bytes(), max_bytes=1000)
    with pytest.raises(ImageTooLarge):
        load_rgb(path, max_bytes=1000)


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "nope.jpg")


def test_refuses_to_decode_when_truncated_loading_was_enabled_globally(photo_paths, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = photo_paths["grace_hopper.jpg"].read_bytes()
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(data[: len(data) // 2])


def test_lazily_opened_truncated_pil_image_raises_truncated_image(photo_paths):
    data = photo_paths["grace_hopper.jpg"].read_bytes()
    with Image.open(io.BytesIO(data[: len(data) // 2])) as im:
        with pytest.raises(TruncatedImage):
            load_rgb(im)
