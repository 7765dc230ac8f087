"""Image and mask decoding with limits, and the geometry every stage shares.

Every failure raises `InvalidArgument` naming the request field, so every service answers INVALID_ARGUMENT with a
`google.rpc.BadRequest` field violation for any undecodable image, a bomb or an image over the limits alike.
(A whole gRPC message over the server's size limit is refused earlier by gRPC itself with RESOURCE_EXHAUSTED.)
The header is inspected before any pixel is decoded, so a decompression bomb (a tiny file that declares a
huge canvas) is refused without allocating it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from services.common.errors import InvalidArgument

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000  # width * height as declared in the header
    max_side: int = 16_384
    min_side: int = 8  # smaller images carry no usable object; 1xN images are refused


DEFAULT_LIMITS = ImageLimits()


def _open_checked(data: bytes, field: str, limits: ImageLimits) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument("expected encoded image bytes", field=field)
    if len(data) == 0:
        raise InvalidArgument("is empty; expected a PNG, JPEG or WebP image", field=field)
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"{len(data)} bytes exceeds the limit of {limits.max_bytes} bytes", field=field)
    try:
        img = Image.open(io.BytesIO(bytes(data)))  # lazy: reads only the header
    except Image.DecompressionBombError as exc:  # PIL's own guard fires at open for giant canvases
        raise InvalidArgument(f"declared size exceeds the limits; refusing to decode ({exc})", field=field) from exc
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, SyntaxError, ...)
        raise InvalidArgument("is not a decodable image (PNG, JPEG or WebP expected)", field=field) from exc
    if img.format not in ALLOWED_FORMATS:
        raise InvalidArgument(f"format {img.format} is not accepted; use PNG, JPEG or WebP", field=field)
    w, h = img.size
    if w > limits.max_side or h > limits.max_side or w * h > limits.max_pixels:
        raise InvalidArgument(
            f"declared size {w}x{h} exceeds the limits ({limits.max_side} px a side, "
            f"{limits.max_pixels} pixels); refusing to decode",
            field=field,
        )
    if w < limits.min_side or h < limits.min_side:
        raise InvalidArgument(f"size {w}x{h} is below the minimum of {limits.min_side} px a side", field=field)
    return img


def _load_pixels(img: Image.Image, field: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # our own limits were checked above; PIL's bomb warning is an error for us
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument("image is a decompression bomb", field=field) from exc
    except Exception as exc:
        raise InvalidArgument(f"image data is corrupt or truncated ({type(exc).__name__})", field=field) from exc
    return img


# Pixel modes the PNG, JPEG and WebP decoders produce, and how each reaches 8-bit RGB. 16-bit grayscale PNGs
# decode to "I;16" (older Pillow: "I", values 0..65535): PIL's own conversion clips those values at 255 (a white
# image), so they are scaled here; 16-bit colour PNGs already decode to 8-bit "RGB"/"RGBA" (high byte).
HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})


def _scale_high_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit "L" (v * 255 / 65535, rounded), or "LA" when a tRNS grey value made
    some pixels transparent."""
    values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    grey = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    transparent = img.info.get("transparency")
    if isinstance(transparent, int):
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), mode="L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def _key_to_8bit(key, depth: int):
    """A tRNS colour key (an int or an RGB tuple) of a `depth`-bit PNG in 8-bit units, as PIL's pixels are."""
    def scale(v: int) -> int:
        return v >> 8 if depth == 16 else v * 255 // (2**depth - 1)

    return tuple(scale(int(v)) for v in key) if isinstance(key, tuple) else scale(int(key))


def decode_image(data: bytes, field: str = "image", limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes into an upright RGB PIL image (EXIF orientation applied). High-bit-depth
    pixels are scaled to 8 bits; transparent pixels are composited on white; a pixel mode outside
    `EIGHT_BIT_MODES | HIGH_BIT_MODES` is INVALID_ARGUMENT."""
    img = _load_pixels(_open_checked(data, field, limits), field)
    if img.mode not in EIGHT_BIT_MODES | HIGH_BIT_MODES:
        raise InvalidArgument(f"pixel mode {img.mode!r} is not supported (8- or 16-bit grey, palette, RGB, RGBA, "
                              "CMYK)", field=field)
    png_depth = data[24] if img.format == "PNG" else 8  # IHDR's bit depth (the header was checked at open)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # a corrupt EXIF block
        raise InvalidArgument("image has a corrupt EXIF orientation block", field=field) from exc
    if png_depth != 8 and img.mode in ("1", "L", "RGB") and "transparency" in img.info:
        # PIL scales the samples of a 1/2/4/16-bit PNG to 8 bits but keeps tRNS's key in the file's units
        img.info["transparency"] = _key_to_8bit(img.info["transparency"], png_depth)
    if img.mode in HIGH_BIT_MODES:
        img = _scale_high_bit(img)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        # composite on white: transparent regions must not turn black (which reads as an object)
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square (left, top, right, bottom)."""
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Largest centred square, resized to size x size (bicubic), as the method's preprocessing does."""
    return img.crop(center_crop_box(*img.size)).resize((size, size), Image.Resampling.BICUBIC)


def image_to_tensor(img: Image.Image):
    """RGB PIL image -> float32 torch tensor [1, 3, H, W] in [-1, 1] (the VAE's input range)."""
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(
    data: bytes,
    field: str = "mask",
    expected_size: tuple[int, int] | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Decode a single-channel PNG mask into a bool array [H, W] (nonzero = inside).

    `expected_size` is (width, height); a mask of another size is INVALID_ARGUMENT.
    """
    img = _open_checked(data, field, ImageLimits(limits.max_bytes, limits.max_pixels, limits.max_side, 1))
    if img.format != "PNG":
        raise InvalidArgument(f"masks must be PNG (lossless), got {img.format}", field=field)
    img = _load_pixels(img, field)
    if expected_size is not None and img.size != tuple(expected_size):
        raise InvalidArgument(
            f"mask size {img.size[0]}x{img.size[1]} does not match the image size "
            f"{expected_size[0]}x{expected_size[1]}",
            field=field,
        )
    if img.mode in ("RGBA", "LA"):
        arr = np.asarray(img.getchannel("A"))  # alpha carries the mask for RGBA cut-outs
    elif img.mode in HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.int64)  # 16-bit: any nonzero value is inside
    else:
        arr = np.asarray(img.convert("L"))
    return arr > 0


def encode_mask(mask: np.ndarray) -> bytes:
    """bool/0-1 array [H, W] -> single-channel PNG (0 or 255)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return encode_png(Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L"))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (width, height)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize(size, Image.Resampling.NEAREST)
    return np.asarray(img) > 127


def uncrop_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Map a mask computed on the centre-crop square back onto the full (width, height) canvas.

    Pixels outside the square (the cropped-away margins) are outside every concept.
    """
    left, top, right, bottom = center_crop_box(width, height)
    square = resize_mask(mask, (right - left, bottom - top))
    out = np.zeros((height, width), dtype=bool)
    out[top:bottom, left:right] = square
    return out
