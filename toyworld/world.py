"""ToyWorld: procedural scenes whose truth is known exactly.

A scene is a 64 × 64 RGB picture of 1–3 flat objects on a light background. Every object has a category (a real
English noun), a colour and a texture; its mask is exact (objects never overlap). Everything is a pure function
of a seed, so a scene, its masks and its captions can always be rebuilt.

Splits: a fixed set of colour × category × texture combinations (`HELD_OUT`) never appears in a training scene;
test scenes come from a disjoint seed range and may contain them.

Removed regions: ICE's localizer blacks out what it has already explained, so later rounds see objects on a
partly black canvas. Training scenes therefore sometimes have a black background or blacked-out objects
(`Scene.removed`), captioned as what remains.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down: smooth, exact-area edges

CATEGORIES = ("ball", "cube", "ring", "star", "cross", "heart")
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 25),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "purple": (135, 55, 185),
    "pink": (245, 115, 185),
}
TEXTURES = ("plain", "striped", "checkered")
BACKGROUNDS = {
    "white": (236, 236, 232),
    "gray": (178, 178, 178),
    "beige": (226, 208, 176),
}
DARK_SHADE = 0.45  # the second tone of striped and checkered objects: the colour at 45 % brightness
# Pattern periods in px at 64 px, coarse enough for an f = 4 VAE (one latent pixel covers 4 × 4 px): stripes
# 4 px light / 4 px dark; checks of 8 × 8 px (4 px checks come out of such a VAE as blur or diagonal stripes).
PATTERN_PERIOD = {"striped": 8, "checkered": 16}

# The combinations no training scene contains (about one in ten, every category, colour and texture kept
# elsewhere): generation and extraction on them test composition, not memory.
HELD_OUT = frozenset(
    (colour, category, texture)
    for n, (colour, category, texture) in enumerate(itertools.product(COLOURS, CATEGORIES, TEXTURES))
    if (n * 7919) % 10 == 3
)

TRAIN_SEEDS = range(0, 10_000_000)
TEST_SEED_BASE = 1_000_000_000  # test scene k has seed TEST_SEED_BASE + k


@dataclass
class WorldObject:
    category: str
    colour: str
    texture: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (px, exclusive) of the drawing square
    mask: np.ndarray = field(repr=False)  # bool [64, 64]

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def phrase(self) -> str:
        texture = "" if self.texture == "plain" else f"{self.texture} "
        return f"{self.colour} {texture}{self.category}"


@dataclass
class Scene:
    seed: int
    image: Image.Image  # RGB 64 × 64
    objects: list[WorldObject]  # visible objects, largest first
    background: str  # a BACKGROUNDS key, or "black"
    removed: list[WorldObject] = field(default_factory=list)  # objects blacked out (training augmentation)

    def label_map(self) -> np.ndarray:
        """int [64, 64]: 0 background, k for objects[k-1]."""
        out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.int64)
        for k, o in enumerate(self.objects, start=1):
            out[o.mask] = k
        return out


# ----------------------------------------------------------------------------------------------------------------
# shapes (drawn at SUPERSAMPLE × on a square of side `s`)


def _polygon_star(cx, cy, r_out, r_in, points=5, rot=-math.pi / 2):
    pts = []
    for k in range(2 * points):
        r = r_out if k % 2 == 0 else r_in
        a = rot + k * math.pi / points
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _heart(cx, cy, r, n=64):
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + r * x / 17.0, cy - r * (y + 2.5) / 17.0))
    return pts


def shape_layers(category: str, s: int) -> list[tuple[np.ndarray, float]]:
    """The shape on an s × s square at full resolution: (coverage in [0, 1] [s, s], face brightness) layers.
    Only the cube has more than one face (top lighter, side darker), which makes it read as a solid."""
    big = s * SUPERSAMPLE
    c, r = big / 2, big / 2 - SUPERSAMPLE * 0.5

    def draw(fn) -> np.ndarray:
        im = Image.new("L", (big, big), 0)
        fn(ImageDraw.Draw(im))
        return np.asarray(im.resize((s, s), Image.Resampling.BOX), dtype=np.float32) / 255.0

    if category == "ball":
        return [(draw(lambda d: d.ellipse([c - r, c - r, c + r, c + r], fill=255)), 1.0)]
    if category == "ring":
        inner = 0.5 * r

        def ring(d):
            d.ellipse([c - r, c - r, c + r, c + r], fill=255)
            d.ellipse([c - inner, c - inner, c + inner, c + inner], fill=0)

        return [(draw(ring), 1.0)]
    if category == "star":
        return [(draw(lambda d: d.polygon(_polygon_star(c, c + 0.08 * r, r * 1.02, r * 0.45), fill=255)), 1.0)]
    if category == "cross":
        w = 0.36 * r

        def cross(d):
            d.rectangle([c - w, c - r, c + w, c + r], fill=255)
            d.rectangle([c - r, c - w, c + r, c + w], fill=255)

        return [(draw(cross), 1.0)]
    if category == "heart":
        return [(draw(lambda d: d.polygon(_heart(c, c, r), fill=255)), 1.0)]
    if category == "cube":
        x0, y0, x1, y1 = c - r, c - r, c + r, c + r
        depth = 0.38 * (x1 - x0)
        front = [(x0, y0 + depth), (x1 - depth, y0 + depth), (x1 - depth, y1), (x0, y1)]
        top = [(x0, y0 + depth), (x0 + depth, y0), (x1, y0), (x1 - depth, y0 + depth)]
        side = [(x1 - depth, y0 + depth), (x1, y0), (x1, y1 - depth), (x1 - depth, y1)]
        return [
            (draw(lambda d: d.polygon(front, fill=255)), 1.0),
            (draw(lambda d: d.polygon(top, fill=255)), 1.25),
            (draw(lambda d: d.polygon(side, fill=255)), 0.78),
        ]
    raise ValueError(f"unknown category {category!r}")


def texture_tone(texture: str, s: int, phase: tuple[int, int]) -> np.ndarray:
    """[s, s] brightness factor of the pattern: 1 on light cells, DARK_SHADE on dark ones."""
    yy, xx = np.mgrid[0:s, 0:s]
    if texture == "plain":
        return np.ones((s, s), dtype=np.float32)
    if texture not in PATTERN_PERIOD:
        raise ValueError(f"unknown texture {texture!r}")
    half = PATTERN_PERIOD[texture] // 2
    if texture == "striped":  # vertical stripes
        dark = ((xx + phase[0]) // half) % 2 == 1
    else:
        dark = (((xx + phase[0]) // half) + ((yy + phase[1]) // half)) % 2 == 1
    return np.where(dark, DARK_SHADE, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# scenes


def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    """A plain background with a faint vertical gradient and grain (lightly textured, never patterned)."""
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    grad = np.linspace(-1, 1, IMAGE_SIZE, dtype=np.float32)[:, None, None] * rng.uniform(-6, 6)
    grain = rng.normal(0, 2.0, (IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    return np.clip(base + grad + grain, 0, 255)


def _free_box(rng, s: int, taken: list[np.ndarray], margin: int = 2) -> tuple[int, int] | None:
    for _ in range(60):
        x = int(rng.integers(0, IMAGE_SIZE - s + 1))
        y = int(rng.integers(0, IMAGE_SIZE - s + 1))
        ok = all(not t[max(0, y - margin) : y + s + margin, max(0, x - margin) : x + s + margin].any() for t in taken)
        if ok:
            return x, y
    return None


def sample_attributes(rng: np.random.Generator, allow_held_out: bool) -> tuple[str, str, str]:
    while True:
        combo = (
            str(rng.choice(list(COLOURS))),
            str(rng.choice(CATEGORIES)),
            str(rng.choice(TEXTURES)),
        )
        if allow_held_out or combo not in HELD_OUT:
            return combo


def paint_object(canvas: np.ndarray, category: str, colour: str, texture: str, x: int, y: int, s: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Paint one object onto `canvas` (float [64, 64, 3]) in place; return its exact mask (coverage ≥ 0.5)."""
    rgb = np.array(COLOURS[colour], dtype=np.float32)
    period = PATTERN_PERIOD.get(texture, 1)
    tone = texture_tone(texture, s, (int(rng.integers(0, period)), int(rng.integers(0, period))))
    coverage_total = np.zeros((s, s), dtype=np.float32)
    region = canvas[y : y + s, x : x + s]
    for coverage, face in shape_layers(category, s):
        face_rgb = rgb * face if face <= 1 else rgb + (255 - rgb) * (face - 1)
        colour_px = np.clip(face_rgb[None, None, :] * tone[..., None], 0, 255)
        a = coverage[..., None]
        region[:] = region * (1 - a) + colour_px * a
        coverage_total = np.maximum(coverage_total, coverage)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask[y : y + s, x : x + s] = coverage_total >= 0.5
    return mask


def make_scene(seed: int, *, split: str = "train", n_objects: int | None = None, augment: bool | None = None,
               background: str | None = None, objects: list[tuple[str, str, str]] | None = None) -> Scene:
    """The scene of `seed`. split "train" never uses HELD_OUT combinations and may black out parts (augment,
    default on for train); "test" may use any combination and is never augmented. `objects` fixes the
    (colour, category, texture) of each object."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    augment = (split == "train") if augment is None else augment
    bg = background or str(rng.choice(list(BACKGROUNDS)))
    canvas = _background(bg, rng)
    if objects is None:
        n = n_objects or int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
        objects = [sample_attributes(rng, allow_held_out=split != "train") for _ in range(n)]
    # larger objects when there are fewer of them
    lo, hi = {1: (26, 40), 2: (20, 30), 3: (17, 25)}.get(len(objects), (17, 25))
    placed: list[WorldObject] = []
    taken: list[np.ndarray] = []
    for colour, category, texture in objects:
        for _attempt in range(4):
            s = int(rng.integers(lo, hi + 1))
            pos = _free_box(rng, s, taken)
            if pos is not None:
                break
            hi = max(lo, hi - 3)
        if pos is None:
            continue
        x, y = pos
        mask = paint_object(canvas, category, colour, texture, x, y, s, rng)
        taken.append(mask)
        placed.append(WorldObject(category, colour, texture, (x, y, x + s, y + s), mask))

    removed: list[WorldObject] = []
    if augment and rng.random() < 0.35:
        # what the localizer's later rounds see: explained objects and background blacked out
        k = int(rng.integers(0, len(placed))) if len(placed) > 1 else 0
        order = rng.permutation(len(placed))
        removed = [placed[i] for i in order[:k]]
        placed = [placed[i] for i in order[k:]]
        keep = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        for o in placed:
            keep |= o.mask
        if rng.random() < 0.7:
            bg = "black"
            canvas[~keep] = 0
        else:
            for o in removed:
                canvas[o.mask] = 0
    placed.sort(key=lambda o: -o.area)
    image = Image.fromarray(np.round(canvas).astype(np.uint8), "RGB")
    return Scene(seed=seed, image=image, objects=placed, background=bg, removed=removed)


def held_out_scene(k: int, n_objects: int | None = None) -> Scene:
    """Held-out test scene number k (never a training seed; may contain HELD_OUT combinations)."""
    return make_scene(TEST_SEED_BASE + k, split="test", n_objects=n_objects)


def single_object(colour: str, category: str, texture: str, seed: int = 0, background: str = "white") -> Scene:
    """One object in the middle-ish of a plain background (zero-shot and classifier checks)."""
    return make_scene(seed, split="test", objects=[(colour, category, texture)], augment=False, background=background)


def isolated(scene: Scene, index: int) -> Scene:
    """Scene `scene` with only its object `index` left, on black: what ICE's later rounds show once the other
    objects and the background have been explained and blacked out."""
    keep = scene.objects[index]
    canvas = np.asarray(scene.image, dtype=np.uint8) * keep.mask[..., None]
    others = [o for k, o in enumerate(scene.objects) if k != index]
    return Scene(seed=scene.seed, image=Image.fromarray(canvas.astype(np.uint8), "RGB"), objects=[keep],
                 background="black", removed=others + list(scene.removed))


def category_twins(seed: int, rng: np.random.Generator) -> tuple[Scene, Scene]:
    """Two training scenes with the same layout, background, colours and textures that differ in the category of
    every object: a hard negative pair for the one axis that colour cannot tell apart."""
    base = make_scene(seed, augment=False)
    first = [(o.colour, o.category, o.texture) for o in base.objects]
    for _ in range(20):
        second = [(c, str(rng.choice([k for k in CATEGORIES if k != cat])), t) for c, cat, t in first]
        if not any(combo in HELD_OUT for combo in second):
            break
    else:
        second = first
    return (make_scene(seed, objects=first, augment=False, background=base.background),
            make_scene(seed, objects=second, augment=False, background=base.background))
