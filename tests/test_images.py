"""Image and mask decoding: limits, bombs, corrupt data, EXIF, geometry."""

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.images import (
    ImageLimits,
    center_crop_resize,
    decode_image,
    decode_mask,
    encode_mask,
    encode_png,
    uncrop_mask,
)


def _png(w=32, h=24, mode="RGB", color=(200, 30, 10)) -> bytes:
    return encode_png(Image.new(mode, (w, h), color))


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR that declares width x height, with one tiny IDAT: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_decodes_png_jpeg_webp_to_rgb():
    img = Image.new("RGB", (40, 30), (10, 120, 250))
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out = decode_image(buf.getvalue())
        assert out.mode == "RGB" and out.size == (40, 30)
        assert np.abs(np.asarray(out, dtype=int)[15, 20] - [10, 120, 250]).max() < 12


def test_bomb_refused_before_decoding():
    bomb = _png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(InvalidArgument) as err:
        decode_image(bomb, field="image")
    assert err.value.field == "image" and "exceeds" in err.value.message


def test_truncated_png_is_invalid_argument():
    data = _png(64, 64)
    with pytest.raises(InvalidArgument) as err:
        decode_image(data[: len(data) // 2], field="source_image")
    assert err.value.field == "source_image"


def test_text_file_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="not a decodable image"):
        decode_image(b"hello, this is plain text\n" * 10)


def test_empty_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="empty"):
        decode_image(b"")


def test_oversized_file_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="bytes exceeds"):
        decode_image(_png(64, 64), limits=ImageLimits(max_bytes=50))


def test_tiny_and_one_pixel_wide_images_refused():
    for w, h in ((1, 1), (1, 500)):
        with pytest.raises(InvalidArgument, match="below the minimum"):
            decode_image(_png(w, h))


def test_other_formats_refused():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="BMP")
    with pytest.raises(InvalidArgument, match="BMP"):
        decode_image(buf.getvalue())


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue())
    assert out.size == (20, 40)
    arr = np.asarray(out.convert("L"), dtype=int)
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # the stripe is now on top


def test_transparent_png_composited_on_white():
    out = decode_image(_png(16, 16, mode="RGBA", color=(255, 0, 0, 0)))
    assert tuple(np.asarray(out)[8, 8]) == (255, 255, 255)


def test_center_crop_resize_square():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # the centre square is white
    out = center_crop_resize(img, 64)
    assert out.size == (64, 64) and np.asarray(out).min() > 240


def test_mask_round_trip_and_shape_validation():
    m = np.zeros((24, 32), bool)
    m[5:10, 3:20] = True
    data = encode_mask(m)
    assert np.array_equal(decode_mask(data, expected_size=(32, 24)), m)
    with pytest.raises(InvalidArgument, match="does not match") as err:
        decode_mask(data, field="concepts[1].mask", expected_size=(64, 64))
    assert err.value.field == "concepts[1].mask"


def test_mask_must_be_png():
    buf = io.BytesIO()
    Image.new("L", (16, 16), 255).save(buf, format="JPEG")
    with pytest.raises(InvalidArgument, match="PNG"):
        decode_mask(buf.getvalue())


def test_uncrop_mask_places_square_in_centre():
    sq = np.ones((8, 8), bool)
    out = uncrop_mask(sq, width=30, height=10)
    assert out.shape == (10, 30)
    assert out[:, 10:20].all() and not out[:, :10].any() and not out[:, 20:].any()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2048))
def test_decoder_never_raises_anything_but_typed_errors(data):
    try:
        decode_image(data)
    except InvalidArgument:
        pass


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=512), st.integers(0, 200))
def test_mutated_png_gives_image_or_typed_error(noise, cut):
    data = bytearray(_png(24, 24))
    for i, b in enumerate(noise[:64]):
        data[(33 + i * 7) % len(data)] ^= b
    try:
        img = decode_image(bytes(data[: len(data) - cut]))
        assert img.mode == "RGB"
    except InvalidArgument:
        pass


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_mask_round_trip_property(w, h, seed):
    m = np.random.default_rng(seed).random((h, w)) > 0.5
    assert np.array_equal(decode_mask(encode_mask(m), expected_size=(w, h)), m)
