"""Procedural classifiers for ToyWorld pictures: colour, category and texture of an object, with no learning.

They read any 64 × 64 RGB picture, rendered or generated: the background is the median colour of the picture's
border; the foreground is every pixel far from it; the object is the largest 8-connected foreground component.

- colour: the median of the object's light tone (within 80 % of its bright end: the dark tone of a pattern and
  the cube's shaded side are excluded) → the nearest world colour;
- texture: the share of dark-tone pixels inside the (eroded) object; when there are enough, vertical stripes are
  constant down each column while checks alternate both ways;
- category: the silhouette, cropped to its box and resized to 32 × 32, against each category's drawn silhouette
  (with its holes) → the best IoU.

On rendered scenes they are exact (tested); on generated pictures they are the judge of the generation ceiling.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from toyworld.world import CATEGORIES, COLOURS, shape_layers

TEMPLATE = 32
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background colour
_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    found: bool  # an object was found at all
    colour: str
    category: str
    texture: str
    category_iou: float  # silhouette agreement of the chosen category (0-1)
    area: int  # object pixels


NOTHING = Reading(False, "", "", "", 0.0, 0)


def _array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32)


def background_colour(rgb: np.ndarray) -> np.ndarray:
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3),
                             rgb[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def foreground(rgb: np.ndarray) -> np.ndarray:
    return np.linalg.norm(rgb - background_colour(rgb), axis=-1) > FOREGROUND_DISTANCE


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _silhouette(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    im = Image.fromarray(crop.astype(np.uint8) * 255).resize((TEMPLATE, TEMPLATE), Image.Resampling.BILINEAR)
    return np.asarray(im) >= 128


@functools.lru_cache(maxsize=1)
def templates() -> dict[str, np.ndarray]:
    out = {}
    for category in CATEGORIES:
        coverage = np.max([c for c, _ in shape_layers(category, 96)], axis=0)
        out[category] = _silhouette(coverage >= 0.5)
    return out


def classify_category(mask: np.ndarray) -> tuple[str, float]:
    sil = _silhouette(mask)
    scores = {c: float((sil & t).sum() / max((sil | t).sum(), 1)) for c, t in templates().items()}
    best = max(scores, key=scores.get)
    return best, scores[best]


def _brightness(rgb: np.ndarray) -> np.ndarray:
    return rgb.max(axis=-1)


def classify_colour(rgb: np.ndarray, mask: np.ndarray) -> str:
    pixels = rgb[mask]
    bright = _brightness(pixels)
    light = pixels[bright >= 0.8 * np.percentile(bright, 90)]  # the light tone, however much dark tone there is
    value = np.median(light, axis=0)
    return _COLOUR_NAMES[int(np.argmin(np.linalg.norm(_COLOUR_RGB - value, axis=1)))]


def classify_texture(rgb: np.ndarray, mask: np.ndarray) -> str:
    inner = ndimage.binary_erosion(mask, iterations=1)
    if inner.sum() < 30:
        inner = mask
    bright = _brightness(rgb)
    light_level = np.percentile(bright[inner], 85)
    dark = (bright < light_level * 0.58) & inner  # the dark tone is 0.45, the cube's shaded side 0.68 of the top
    if dark[inner].mean() < 0.18:
        return "plain"
    # agreement of neighbours inside the object: down a column (vertical pairs) and along a row
    both_v = inner[1:, :] & inner[:-1, :]
    both_h = inner[:, 1:] & inner[:, :-1]
    same_v = float((dark[1:, :] == dark[:-1, :])[both_v].mean())
    same_h = float((dark[:, 1:] == dark[:, :-1])[both_h].mean())
    return "striped" if same_v - same_h > 0.12 else "checkered"


def read_object(image, mask: np.ndarray | None = None) -> Reading:
    """Colour, category and texture of the object in `image` (the largest foreground blob, or `mask`)."""
    rgb = _array(image)
    obj = largest_component(foreground(rgb)) if mask is None else np.asarray(mask, dtype=bool)
    if obj.sum() < 20:
        return NOTHING
    category, iou = classify_category(obj)
    return Reading(True, classify_colour(rgb, obj), category, classify_texture(rgb, obj), iou, int(obj.sum()))
