"""UCE concept metrics (docs/method.md#evaluation): SIM^I, SIM^C, ACC^1, ACC^3 per image encoder.

No official evaluation code exists for ICE, so every protocol choice is explicit here and a parameter:

- **Source region** of a concept (`source_region`): the source image with every pixel outside the concept's mask
  set to `Protocol.background_fill` (black, white, gray = RGB 128, or mean = the mean colour inside the mask),
  then cropped per `Protocol.crop`: `none` keeps the whole canvas; `mask_box` takes the mask's bounding box
  enlarged to a square around its centre. Where that square leaves the image, the missing pixels take the fill
  colour too (they are outside the mask like any other background pixel), so the concept is never cut off and the
  crop stays square, which the encoders' centre crop would otherwise trim.
- **Embeddings**: each encoder's unit vector (`encoders.py`); similarity = cosine in [-1, 1], not rescaled.
- **SIM^I** of a concept: mean cosine between its generated images and its source region. Of a request or set:
  mean over concepts.
- **SIM^C** of a source image: mean cosine between its composition images (generated from a prompt with all
  its concept tokens; for an image with one concept, from that concept's token alone) and the whole source image
  (not masked, not cropped; the encoder's own resize + centre crop applies). Of a set: mean over the items that
  have composition images. Without any, SIM^C is absent and `Scores.sim_c_absent_reason` says why.
- **ACC^1 / ACC^3**: every generated image of a concept is classified among the source regions of *all* concepts in
  scope (one image, or the whole set) by cosine. Its rank is 1 + the number of *other* concepts scoring at least as
  high as its own (ties count against it). Correct when rank = 1 / rank <= 3. Accuracy of a concept = fraction of
  its images correct; of a request or set = mean over concepts.
- **rank** of a concept: the rank of its own source region when the normalised mean of its generated embeddings
  is classified the same way.
- **Scope**: `evaluate` (one image) ranks among that image's own concepts (`scope="request"`): with at most 3
  concepts ACC^3 is 1 by construction, so these are not the paper's numbers. The paper ranks among every concept
  of its benchmark set: `SetEvaluation` (`scope="set"`), served as EvaluateSet.

Set-level evaluation is streamed: `SetEvaluation.add` embeds one item (decoding its images one batch at a time)
and keeps only embeddings (and the item's SIM^C cosines); `result()` classifies over the union of all concepts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from services.evaluator.encoders import Embedder

BACKGROUND_FILLS = ("black", "white", "gray", "mean")
CROPS = ("none", "mask_box")
_FIXED_FILLS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}

ImageSource = Image.Image | Callable[[], Image.Image]


@dataclass(frozen=True)
class Protocol:
    """How a concept's source region is formed (see the module docstring)."""

    background_fill: str = "black"
    crop: str = "mask_box"

    def __post_init__(self):
        if self.background_fill not in BACKGROUND_FILLS:
            raise ValueError(f"background_fill {self.background_fill!r} not in {BACKGROUND_FILLS}")
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r} not in {CROPS}")


# ----------------------------------------------------------------------------------------------------------------
# source regions


def fill_colour(pixels: np.ndarray, mask: np.ndarray, fill: str) -> tuple[int, int, int]:
    if fill == "mean":
        return tuple(int(round(c)) for c in pixels[mask].reshape(-1, 3).mean(axis=0))
    return _FIXED_FILLS[fill]


def mask_square_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the square around the mask's bounding box centre; may extend past the image."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty")
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(bottom - top, right - left)
    left -= (side - (right - left)) // 2
    top -= (side - (bottom - top)) // 2
    return left, top, left + side, top + side


def source_region(image: Image.Image, mask: np.ndarray, protocol: Protocol = Protocol()) -> Image.Image:
    """The concept's source region: outside-mask pixels filled, then cropped, per `protocol`."""
    pixels = np.asarray(image.convert("RGB"))
    if mask.shape != pixels.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} != image shape {pixels.shape[:2]}")
    if not mask.any():
        raise ValueError("mask is empty")
    colour = fill_colour(pixels, mask, protocol.background_fill)
    filled = np.where(mask[..., None], pixels, np.asarray(colour, dtype=np.uint8))
    if protocol.crop == "none":
        return Image.fromarray(filled)
    left, top, right, bottom = mask_square_box(mask)
    h, w = mask.shape
    canvas = np.empty((bottom - top, right - left, 3), dtype=np.uint8)
    canvas[:] = colour
    # paste the part of the square that lies inside the image
    y0, y1, x0, x1 = max(top, 0), min(bottom, h), max(left, 0), min(right, w)
    canvas[y0 - top : y1 - top, x0 - left : x1 - left] = filled[y0:y1, x0:x1]
    return Image.fromarray(canvas)


# ----------------------------------------------------------------------------------------------------------------
# inputs and embeddings


@dataclass
class ConceptInput:
    concept_id: str
    mask: np.ndarray  # bool [H, W] on the source image
    images: Sequence[ImageSource]  # generated from the concept alone


@dataclass
class ItemInput:
    """One source image with its concepts (a PIL image or a zero-argument loader for each generated image)."""

    item_id: str
    source: Image.Image
    concepts: list[ConceptInput]
    composition: Sequence[ImageSource] = ()


@dataclass
class ConceptEmbeddings:
    concept_id: str
    source: torch.Tensor  # [D] unit embedding of the source region
    generated: torch.Tensor  # [n, D] unit embeddings of the generated images


@dataclass
class ItemEmbeddings:
    item_id: str
    concepts: list[ConceptEmbeddings]
    composition_sims: torch.Tensor  # [m] cosine of each composition image with the whole source image


def _loader(src: ImageSource) -> Callable[[], Image.Image]:
    return (lambda: src) if isinstance(src, Image.Image) else src


def embed_item(item: ItemInput, embedder: Embedder, encoders: Sequence[str], protocol: Protocol = Protocol()) -> dict[str, ItemEmbeddings]:
    """Embed everything of one item in one batched pass per encoder: {encoder: ItemEmbeddings}."""
    regions = [lambda c=c: source_region(item.source, c.mask, protocol) for c in item.concepts]
    generated = [_loader(s) for c in item.concepts for s in c.images]
    composition = [_loader(s) for s in item.composition]
    sources = [lambda: item.source, *regions, *generated, *composition]
    embedded = embedder.embed(sources, encoders)

    out = {}
    n_concepts, n_generated = len(item.concepts), len(generated)
    for name, emb in embedded.items():
        whole, region_emb = emb[0], emb[1 : 1 + n_concepts]
        gen_emb = emb[1 + n_concepts : 1 + n_concepts + n_generated]
        comp_emb = emb[1 + n_concepts + n_generated :]
        concepts, start = [], 0
        for k, c in enumerate(item.concepts):
            concepts.append(ConceptEmbeddings(c.concept_id, region_emb[k], gen_emb[start : start + len(c.images)]))
            start += len(c.images)
        out[name] = ItemEmbeddings(item.item_id, concepts, comp_emb @ whole)
    return out


# ----------------------------------------------------------------------------------------------------------------
# scores


@dataclass
class ConceptScores:
    concept_id: str
    sim_i: float
    acc1: float
    acc3: float
    rank: int


@dataclass
class Scores:
    sim_i: float
    sim_c: float | None
    acc1: float
    acc3: float
    concepts: list[ConceptScores] = field(default_factory=list)
    scope: str = "set"  # what ACC and ranks were measured among: "request" (one image's concepts) or "set"
    concepts_in_scope: int = 0
    sim_c_absent_reason: str = ""  # why sim_c is None ("" when it is set)


@dataclass
class SetScores:
    overall: Scores
    items: list[tuple[str, Scores]]  # per item, in order; ranks measured among all the set's concepts


NO_COMPOSITION = "no composition images were sent"


def _aggregate(concepts: list[ConceptScores], sim_c: list[float], scope: str, in_scope: int) -> Scores:
    return Scores(
        sim_i=float(np.mean([c.sim_i for c in concepts])),
        sim_c=float(np.mean(sim_c)) if sim_c else None,
        acc1=float(np.mean([c.acc1 for c in concepts])),
        acc3=float(np.mean([c.acc3 for c in concepts])),
        concepts=concepts,
        scope=scope,
        concepts_in_scope=in_scope,
        sim_c_absent_reason="" if sim_c else NO_COMPOSITION,
    )


def ranks(scores: torch.Tensor, own: int) -> torch.Tensor:
    """Rank of column `own` in each row of `scores` [n, C]: 1 + the number of other columns scoring >= it."""
    return (scores >= scores[:, own : own + 1]).sum(dim=1)  # the own column counts itself once


def score_items(items: Sequence[ItemEmbeddings], scope: str = "set") -> SetScores:
    """Scores of every concept among all the concepts of `items`, per item and overall."""
    all_concepts = [c for item in items for c in item.concepts]
    if not all_concepts:
        raise ValueError("no concepts to score")
    regions = torch.stack([c.source for c in all_concepts])  # [C, D]
    per_item: list[tuple[str, Scores]] = []
    every: list[ConceptScores] = []
    item_sim_c: list[float] = []
    k = 0
    for item in items:
        scored = []
        for c in item.concepts:
            sims = c.generated @ regions.T  # [n, C]
            image_ranks = ranks(sims, k)
            mean = torch.nn.functional.normalize(c.generated.mean(dim=0), dim=0)
            scored.append(
                ConceptScores(
                    concept_id=c.concept_id,
                    sim_i=float(sims[:, k].mean()),
                    acc1=float((image_ranks == 1).float().mean()),
                    acc3=float((image_ranks <= 3).float().mean()),
                    rank=int(ranks((mean @ regions.T)[None], k)[0]),
                )
            )
            k += 1
        sim_c = [float(item.composition_sims.mean())] if item.composition_sims.numel() else []
        item_sim_c += sim_c
        per_item.append((item.item_id, _aggregate(scored, sim_c, scope, len(all_concepts))))
        every += scored
    return SetScores(_aggregate(every, item_sim_c, scope, len(all_concepts)), per_item)


class SetEvaluation:
    """Streamed evaluation of a set: `add` one item at a time (only embeddings are kept), then `result()`."""

    def __init__(self, embedder: Embedder, encoders: Sequence[str], protocol: Protocol = Protocol()):
        self.embedder = embedder
        self.encoders = list(encoders)
        self.protocol = protocol
        self.items: dict[str, list[ItemEmbeddings]] = {name: [] for name in self.encoders}

    def add(self, item: ItemInput) -> None:
        for name, emb in embed_item(item, self.embedder, self.encoders, self.protocol).items():
            self.items[name].append(emb)

    @property
    def item_count(self) -> int:
        return len(self.items[self.encoders[0]]) if self.encoders else 0

    @property
    def concept_count(self) -> int:
        return sum(len(i.concepts) for i in self.items[self.encoders[0]]) if self.encoders else 0

    def result(self) -> dict[str, SetScores]:
        return {name: score_items(items) for name, items in self.items.items()}


def evaluate(item: ItemInput, embedder: Embedder, encoders: Sequence[str], protocol: Protocol = Protocol()) -> dict[str, Scores]:
    """The scores of one source image's concepts, accuracy measured among its own concepts only
    (`scope="request"`; see the module docstring)."""
    evaluation = SetEvaluation(embedder, encoders, protocol)
    evaluation.add(item)
    return {name: score_items(items, scope="request").overall for name, items in evaluation.items.items()}
