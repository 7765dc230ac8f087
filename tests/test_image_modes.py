"""Every pixel mode the PNG, JPEG and WebP decoders produce reaches RGB with the right values.

PNG files are written by hand (every colour type and bit depth the format allows, with and without a tRNS
chunk), so the expected RGB is computed from the raw samples, independently of PIL: grey and colour samples of
depth d scale by 255 / (2^d - 1); palette indices look up the palette; transparent pixels are composited on
white. JPEG (grey, RGB, CMYK) and WebP (RGB, RGBA, lossless) are checked on flat colours. A 16-bit grey PNG
(PIL mode "I;16") once decoded to an all-white image."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.images import decode_image, decode_mask

CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
COMBOS = [(ct, d) for ct, depths in DEPTHS.items() for d in depths]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _pack_rows(samples: np.ndarray, depth: int) -> bytes:
    """[H, W*C] unsigned samples -> PNG scanlines (filter byte 0), big-endian, sub-byte samples packed MSB first."""
    rows = []
    for row in samples:
        if depth == 16:
            data = row.astype(">u2").tobytes()
        elif depth == 8:
            data = row.astype(np.uint8).tobytes()
        else:
            per_byte = 8 // depth
            padded = np.concatenate([row, np.zeros((-len(row)) % per_byte, dtype=row.dtype)])
            groups = padded.reshape(-1, per_byte).astype(np.uint16)
            shifts = np.arange(per_byte - 1, -1, -1) * depth
            data = (groups << shifts).sum(axis=1).astype(np.uint8).tobytes()
        rows.append(b"\x00" + data)
    return b"".join(rows)


def _png(samples: np.ndarray, width: int, height: int, ct: int, depth: int, palette=None, trns=None) -> bytes:
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, ct, 0, 0, 0))
    if palette is not None:
        out += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if trns is not None:
        out += _chunk(b"tRNS", trns)
    return out + _chunk(b"IDAT", zlib.compress(_pack_rows(samples, depth))) + _chunk(b"IEND", b"")


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return rgb * a + 255.0 * (1 - a)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(combo=st.sampled_from(COMBOS), width=st.integers(8, 19), height=st.integers(8, 13),
       seed=st.integers(0, 2**32 - 1), with_trns=st.booleans())
def test_every_png_colour_type_and_depth_decodes_to_the_right_rgb(combo, width, height, seed, with_trns):
    ct, depth = combo
    rng = np.random.default_rng(seed)
    top = 2**depth - 1
    samples = rng.integers(0, top + 1, size=(height, width * CHANNELS[ct]), dtype=np.int64)
    palette = trns = None
    if ct == 3:
        palette = rng.integers(0, 256, size=(2**depth, 3))
        expected = palette[samples].astype(float)
        if with_trns:  # alpha per palette entry
            alphas = rng.integers(0, 256, size=2**depth)
            trns = alphas.astype(np.uint8).tobytes()
            expected = _on_white(expected, alphas[samples].astype(float))
    else:
        scaled = samples * 255.0 / top
        pixels = scaled.reshape(height, width, CHANNELS[ct])
        colour = pixels[..., :3] if ct in (2, 6) else np.repeat(pixels[..., :1], 3, axis=2)
        expected = colour
        if ct in (4, 6):
            expected = _on_white(colour, pixels[..., -1])
        elif with_trns:  # one transparent grey value / RGB triple, written at the file's own depth
            key = samples.reshape(height, width, CHANNELS[ct])[0, 0]
            trns = b"".join(struct.pack(">H", int(v)) for v in key)
            hit = (samples.reshape(height, width, CHANNELS[ct]) == key).all(axis=2)
            expected = np.where(hit[..., None], 255.0, colour)
    data = _png(samples, width, height, ct, depth, palette, trns)
    img = decode_image(data, field="image")
    assert img.mode == "RGB" and img.size == (width, height)
    got = np.asarray(img).astype(float)
    # 16-bit samples may be reduced by rounding (v * 255 / 65535) or by their high byte (one level apart); with an
    # alpha channel both colour and alpha are, and compositing rounds once more: up to 1 + 1 + 0.5 levels
    tolerance = (2.51 if ct in (4, 6) else 1.01) if depth == 16 else 1.01
    assert np.abs(got - expected).max() <= tolerance, (ct, depth, np.abs(got - expected).max())


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp = (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    got = np.asarray(decode_image(buf.getvalue()))[..., 0].astype(float)
    assert np.abs(got - ramp * 255.0 / 65535).max() <= 0.51
    assert got.mean() < 200  # an all-white image had mean 255
    mask = np.zeros((48, 64), dtype=np.uint16)
    mask[10:20, 5:30] = 1  # the smallest nonzero 16-bit value is inside
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    assert (decode_mask(buf.getvalue()) == (mask > 0)).all()


@pytest.mark.parametrize("mode,colour,expected", [
    ("L", 90, (90, 90, 90)),
    ("RGB", (200, 40, 120), (200, 40, 120)),
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),      # no ink: white
    ("CMYK", (0, 0, 0, 255), (0, 0, 0)),          # full black ink
    ("CMYK", (255, 0, 0, 0), (0, 255, 255)),      # cyan ink absorbs red
])
def test_jpeg_modes(mode, colour, expected):
    buf = io.BytesIO()
    Image.new(mode, (32, 24), colour).save(buf, format="JPEG", quality=95)
    img = decode_image(buf.getvalue())
    assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
    assert np.abs(np.asarray(img).astype(float) - expected).max() <= 3


@pytest.mark.parametrize("mode,colour,expected", [
    ("RGB", (10, 200, 30), (10, 200, 30)),
    ("RGBA", (10, 200, 30, 0), (255, 255, 255)),  # fully transparent: white
    ("RGBA", (10, 200, 30, 255), (10, 200, 30)),
])
def test_webp_modes(mode, colour, expected):
    buf = io.BytesIO()
    Image.new(mode, (32, 24), colour).save(buf, format="WEBP", lossless=True, exact=True)
    assert np.abs(np.asarray(decode_image(buf.getvalue())).astype(float) - expected).max() <= 1


def test_a_mode_no_decoder_should_give_is_refused_by_name(monkeypatch):
    from services.common import images

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    # a decoder that would hand over floating-point pixels (none of PNG, JPEG and WebP does today)
    monkeypatch.setattr(images, "_load_pixels", lambda img, field: Image.new("F", img.size))
    with pytest.raises(InvalidArgument, match="pixel mode 'F' is not supported"):
        decode_image(buf.getvalue(), field="source_image")
