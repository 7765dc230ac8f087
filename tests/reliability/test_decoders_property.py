"""Property-based tests of the image and mask decoders (services/common/images.py), beyond tests/test_images.py:
structured mutations of valid PNG / JPEG / WebP files (chunks and segments dropped, repeated, resized, with valid
checksums so the decoder meets the semantic damage), random dimensions written into headers, random EXIF
orientations, random mask sizes. Properties: the decoder either returns an upright RGB image of the declared size
or raises InvalidArgument / ResourceExhausted naming the field; a header declaring more than the limits is refused
before any pixel is allocated; masks round-trip and refuse every size but the expected one."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.images import DEFAULT_LIMITS, decode_image, decode_mask, encode_mask
from tests.reliability.corpus import encode, photo, png_chunk

# PIL warns at open for canvases between its two bomb thresholds; the decoder refuses them right after
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
FIELD = "concepts[3].images[1]"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE = photo(40, 24, seed=3)


def _decode_or_typed_error(data: bytes, field: str = FIELD):
    """The decoded image, or None after a typed error naming the field; anything else fails the test."""
    try:
        img = decode_image(data, field=field)
    except (InvalidArgument, ResourceExhausted) as exc:
        assert exc.field == field and exc.message.startswith(field)
        return None
    assert img.mode == "RGB"
    return img


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append((data[at + 4 : at + 8], data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(kind, body) for kind, body in chunks)


PNG_CHUNKS = _png_chunks(encode(BASE, "PNG", compress_level=1))


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 4, 8, 16]),
       st.sampled_from([0, 2, 3, 4, 6]), st.integers(0, 1))
def test_png_header_with_any_dimensions(width, height, depth, color_type, interlace):
    chunks = list(PNG_CHUNKS)
    chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, interlace))
    t0 = time.perf_counter()
    img = _decode_or_typed_error(_png(chunks))
    assert time.perf_counter() - t0 < 5  # nothing huge was allocated or inflated
    if img is not None:
        assert img.size == (width, height)
    if width * height > DEFAULT_LIMITS.max_pixels or max(width, height) > DEFAULT_LIMITS.max_side:
        assert img is None


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["drop", "repeat", "swap", "truncate", "junk", "resize"]),
                          st.integers(0, 100), st.binary(min_size=0, max_size=64)), min_size=1, max_size=4))
def test_png_chunk_mutations_with_valid_checksums(edits):
    chunks = list(PNG_CHUNKS)
    for op, k, junk in edits:
        i = k % len(chunks)
        kind, body = chunks[i]
        if op == "drop" and len(chunks) > 1:
            del chunks[i]
        elif op == "repeat":
            chunks.insert(i, (kind, body))
        elif op == "swap":
            j = (i + 1) % len(chunks)
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == "truncate":
            chunks[i] = (kind, body[: k % (len(body) + 1)])
        elif op == "junk":
            chunks.insert(i, (junk[:4].ljust(4, b"x"), junk[4:]))
        elif op == "resize" and kind == b"IDAT":
            raw = zlib.decompressobj().decompress(body)  # as much as an earlier edit left
            chunks[i] = (kind, zlib.compress(raw[: k * 10] + junk))
    img = _decode_or_typed_error(_png(chunks))
    if img is not None:
        assert img.size[0] >= DEFAULT_LIMITS.min_side and img.size[1] >= DEFAULT_LIMITS.min_side


JPEG = encode(BASE, "JPEG", quality=85)


def _jpeg_segments(data: bytes) -> list[bytes]:
    """The marker segments before the scan, then the scan and EOI as one piece."""
    segments, at = [data[:2]], 2
    while at < len(data):
        marker = data[at + 1]
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if marker == 0xDA:  # start of scan: the rest is entropy-coded data
            segments.append(data[at:])
            break
        segments.append(data[at : at + 2 + length])
        at += 2 + length
    return segments


JPEG_SEGMENTS = _jpeg_segments(JPEG)


@SETTINGS
@given(st.integers(0, 65535), st.integers(0, 65535))
def test_jpeg_frame_with_any_dimensions(width, height):
    at = JPEG.index(b"\xff\xc0")
    data = JPEG[: at + 5] + struct.pack(">HH", height, width) + JPEG[at + 9 :]
    t0 = time.perf_counter()
    img = _decode_or_typed_error(data)
    assert time.perf_counter() - t0 < 5
    if img is not None:
        assert img.size == (width, height)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["drop", "repeat", "cut", "flip"]), st.integers(0, 10_000)),
                min_size=1, max_size=3))
def test_jpeg_segment_mutations(edits):
    segments = list(JPEG_SEGMENTS)
    for op, k in edits:
        i = 1 + k % (len(segments) - 1)
        if op == "drop" and len(segments) > 2:
            del segments[i]
        elif op == "repeat":
            segments.insert(i, segments[i])
        elif op == "cut":
            segments[i] = segments[i][: k % (len(segments[i]) + 1)]
        elif op == "flip" and segments[i]:
            seg = bytearray(segments[i])
            seg[k % len(seg)] ^= 0xFF
            segments[i] = bytes(seg)
    _decode_or_typed_error(b"".join(segments))


@SETTINGS
@given(st.integers(0, 65535))
def test_any_exif_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = _decode_or_typed_error(encode(BASE, "JPEG", exif=exif.tobytes()))
    if img is not None and orientation in (5, 6, 7, 8):
        assert img.size == (24, 40)
    elif img is not None:
        assert img.size == (40, 24)


WEBP = encode(BASE, "WEBP", quality=70)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, len(WEBP)))
def test_webp_container_sizes_and_truncation(riff_size, chunk_size, cut):
    data = bytearray(WEBP)
    data[4:8] = struct.pack("<I", riff_size)
    data[16:20] = struct.pack("<I", chunk_size)
    _decode_or_typed_error(bytes(data[: max(cut, 12)]))


@SETTINGS
@given(st.integers(1, 1 << 24), st.integers(1, 1 << 24))
def test_webp_extended_canvas_of_any_size(width, height):
    body = bytes([0x10, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", len(body)) + body
    rest = WEBP[12:]
    data = b"RIFF" + struct.pack("<I", 4 + len(vp8x) + len(rest)) + b"WEBP" + vp8x + rest
    t0 = time.perf_counter()
    img = _decode_or_typed_error(data)
    assert time.perf_counter() - t0 < 5
    if width * height > DEFAULT_LIMITS.max_pixels or max(width, height) > DEFAULT_LIMITS.max_side:
        assert img is None


@SETTINGS
@given(st.integers(1, 48), st.integers(1, 48), st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**32 - 1),
       st.sampled_from(["L", "1", "P", "LA", "RGBA", "I;16"]))
def test_mask_sizes_and_modes(w, h, ew, eh, seed, mode):
    m = np.random.default_rng(seed).random((h, w)) > 0.5
    if mode == "I;16":
        img = Image.fromarray(m.astype(np.uint16) * 1000)
    elif mode in ("LA", "RGBA"):
        alpha = Image.fromarray(m.astype(np.uint8) * 255, "L")
        img = Image.new(mode, (w, h))
        img.putalpha(alpha)
    else:
        img = Image.fromarray(m.astype(np.uint8) * 255, "L").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    try:
        out = decode_mask(buf.getvalue(), field="concepts[0].mask", expected_size=(ew, eh))
    except InvalidArgument as exc:
        assert (w, h) != (ew, eh) and exc.field == "concepts[0].mask"
        return
    assert (w, h) == (ew, eh)
    assert out.dtype == bool and out.shape == (h, w)
    assert np.array_equal(out, m)


@SETTINGS
@given(st.binary(min_size=0, max_size=256), st.integers(0, 300))
def test_mask_decoder_never_raises_untyped_errors(noise, cut):
    data = bytearray(encode_mask(np.eye(16, dtype=bool)))
    for i, b in enumerate(noise):
        data[(8 + i * 13) % len(data)] ^= b
    try:
        decode_mask(bytes(data[: max(len(data) - cut, 0)]), field="ground_truth[2]", expected_size=(16, 16))
    except (InvalidArgument, ResourceExhausted) as exc:
        assert exc.field == "ground_truth[2]"
