"""The localization loop (docs/method.md#the-loop-and-its-stop): retrieve → segment → remove, until little is left.

Everything is computed on the largest centred square of the input: at its native resolution for CLIP, resized to
the bundle's image size S for the diffusion model. Masks are mapped back onto the full input canvas at the end
(the cropped-away margins belong to no concept).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from services.common.bundle import Bundle
from services.common.images import center_crop_box, image_to_tensor, resize_mask, uncrop_mask
from services.localizer.attention import capture_attention, encode_image, encode_prompt
from services.localizer.kl import resolve_backend
from services.localizer.retriever import Reranker, Retriever
from services.localizer.segmentor import DiffSegConfig, Segmentation, instances, segment, word_token_positions

PROMPT_WORDS = ("things", "background")  # the prompt is "<noun> things background"
STOP_REASONS = ("remaining_fraction", "max_rounds", "max_concepts", "no_progress", "no_new_noun", "no_concept")


@dataclass(frozen=True)
class LocalizeOptions:
    """The published values are the defaults (docs/method.md#options)."""

    max_concepts: int | None = None  # None: no cap other than max_rounds
    max_rounds: int = 11
    remaining_fraction_threshold: float = 0.1
    l1_penalty: float = 0.2
    min_area_fraction: float = 0.025
    merge_threshold: float = 1.1
    merge_rounds: int = 3
    timestep: int = 150
    refinement: str = "kmeans"  # kmeans | none


@dataclass
class Concept:
    noun: str
    mask: np.ndarray  # bool [H, W] at the input's resolution
    area_fraction: float
    round: int
    retrieval: list[tuple[str, float]]


@dataclass
class LocalizeResult:
    concepts: list[Concept]
    timings: list[tuple[str, float]]
    rounds: int
    remaining_fraction: float  # of the square's pixels the loop had not removed: what the stop test compares
    width: int
    height: int
    stop_reason: str  # one of STOP_REASONS
    removed: np.ndarray = field(repr=False, default=None)  # bool [S, S]: what the loop removed (on the square)
    uncovered_fraction: float = 1.0  # of the input's pixels outside every returned concept


class Localizer:
    """Holds the bundle's models (loaded once); `localize` is one image's loop. Not thread-safe: callers
    serialise (the server holds a lock)."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        onnx_providers: list[str] | None = None,
        kl_backend: str = "auto",
        reranker: Reranker | None = None,
    ):
        self.bundle = bundle
        self.size = bundle.image_size
        self.pipe = bundle.load_diffusion(device, dtype)
        self.retriever = Retriever(bundle, onnx_providers, reranker)
        self.kl_backend = resolve_backend(kl_backend, device)
        # what a request leaves unset: the published values, or this bundle's own recommendations
        self.defaults = bundle.recommended_defaults("localize", LocalizeOptions())

    @torch.no_grad()
    def segment_noun(self, square: np.ndarray, noun: str, options: LocalizeOptions) -> tuple[Segmentation, float]:
        """One round's segmentation of the S × S image `square` (uint8 RGB) with the prompt "<noun> things
        background": one UNet pass for the attention, DiffSeg, the vote. Returns it and the attention's seconds."""
        t0 = time.perf_counter()
        words = [noun, *PROMPT_WORDS]
        text_states, _ = encode_prompt(self.pipe, " ".join(words))
        x = image_to_tensor(Image.fromarray(square))
        maps = capture_attention(self.pipe, encode_image(self.pipe, x), text_states, options.timestep)
        t1 = time.perf_counter()
        config = DiffSegConfig(merge_threshold=options.merge_threshold, merge_rounds=options.merge_rounds,
                               refine_kmeans=options.refinement == "kmeans", kl_backend=self.kl_backend)
        return segment(maps, word_token_positions(self.pipe.tokenizer, words), self.size, config), t1 - t0

    @torch.no_grad()
    def localize(
        self,
        image: Image.Image,
        options: LocalizeOptions | None = None,
        check: Callable[[], None] = lambda: None,
    ) -> LocalizeResult:
        """Run the loop on an RGB image (`options` None: the bundle's defaults). `check` runs before every round
        and may raise to stop (cancellation)."""
        options = self.defaults if options is None else options
        width, height = image.size
        crop = image.crop(center_crop_box(width, height))
        crop_arr = np.asarray(crop, dtype=np.uint8)
        square_arr = np.asarray(crop.resize((self.size, self.size), Image.Resampling.BICUBIC), dtype=np.uint8)
        removed = np.zeros((self.size, self.size), dtype=bool)
        found: list[tuple[Concept, np.ndarray]] = []  # (concept without full-res mask yet, mask on the square)
        timings: list[tuple[str, float]] = []
        used: set[str] = set()
        previous: str | None = None
        stop, rounds = "max_rounds", 0

        for rnd in range(options.max_rounds):
            check()
            rounds = rnd + 1
            keep = ~removed
            t0 = time.perf_counter()
            crop_keep = resize_mask(keep, crop.size) if rnd else np.ones(crop_arr.shape[:2], dtype=bool)
            retrieval = self.retriever.retrieve(
                Image.fromarray(crop_arr * crop_keep[..., None]), options.l1_penalty, previous, frozenset(used)
            )
            timings.append(("retrieve", time.perf_counter() - t0))
            if retrieval.noun is None:
                stop = "no_new_noun"
                break
            noun = retrieval.noun
            used.add(noun)
            previous = noun

            t0 = time.perf_counter()
            seg, attention_s = self.segment_noun(square_arr * keep[..., None], noun, options)
            noun_mask = seg.noun & keep  # a removed (black) area is not found again
            round_masks = instances(noun_mask, options.min_area_fraction)
            newly_removed = (seg.noun | seg.background) & keep
            timings += [("attention", attention_s), ("segment", time.perf_counter() - t0 - attention_s)]

            for m in round_masks:
                found.append((Concept(noun, None, 0.0, rnd, list(retrieval.words)), m))
            if options.max_concepts is not None and len(found) >= options.max_concepts:
                del found[options.max_concepts :]  # the round's masks are largest first: the smallest go
                stop = "max_concepts"
                break
            if not newly_removed.any():
                stop = "no_progress"
                break
            removed |= newly_removed
            if remaining(removed) <= options.remaining_fraction_threshold:
                stop = "remaining_fraction"
                break

        t0 = time.perf_counter()
        concepts = []
        covered = np.zeros((height, width), dtype=bool)
        for concept, square_mask in found:
            full = uncrop_mask(square_mask, width, height)
            concept.mask = full
            concept.area_fraction = float(full.mean())
            covered |= full
            concepts.append(concept)
        concepts = [c for c in concepts if c.area_fraction > 0]
        concepts.sort(key=lambda c: (c.round, -c.area_fraction))
        timings.append(("masks", time.perf_counter() - t0))
        if not concepts and stop in ("remaining_fraction", "max_rounds"):
            stop = "no_concept"  # the pixels went to background (or to segments too small): nothing was found
        return LocalizeResult(
            concepts=concepts,
            timings=timings,
            rounds=rounds,
            remaining_fraction=remaining(removed),
            width=width,
            height=height,
            stop_reason=stop,
            removed=removed,
            uncovered_fraction=float(1.0 - covered.mean()),
        )


def remaining(removed: np.ndarray) -> float:
    """The loop's remaining fraction: the share of the square's pixels that no round removed (as a noun's segment
    or as background). The stop test compares it with `remaining_fraction_threshold`, and the response reports it."""
    return float(1.0 - removed.mean())
