"""Options of the SDK calls, as dataclasses mirroring the contract's option messages.

A field left `None` is not sent, so the server's default (the published value, written beside each field in
the .proto) applies. Ranges are checked by the server, which names the field at fault.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_ANCHORS = ("texture", "material", "color")
# `few_class_images` / `--few-class-images`: one class image for every ten training steps instead of one per step
FEW_CLASS_IMAGES_PER_STEP = 0.1


def few_class_images(total_steps: int, per_step: float = FEW_CLASS_IMAGES_PER_STEP) -> int:
    """The class-image count of the quick choice: `per_step` of a job's steps, at least one. A job uses at most
    one class image per step (step n takes image n mod count), so this makes its preparation `per_step` as long;
    the prior-preservation loss then sees each image about 1/per_step times."""
    return max(1, math.ceil(total_steps * per_step))


@dataclass(frozen=True)
class LocalizeOptions:
    max_concepts: int | None = None
    max_rounds: int | None = None
    remaining_fraction_threshold: float | None = None
    l1_penalty: float | None = None
    min_area_fraction: float | None = None
    merge_threshold: float | None = None
    merge_rounds: int | None = None
    timestep: int | None = None
    seed: int | None = None
    refinement: str | None = None  # "none" | "kmeans"

    def set_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Schedule:
    """The learning schedule (docs/method.md#schedule). Defaults: 400 / 400 / 300 steps, 1000 class images."""

    phase1_steps: int | None = None
    phase2_steps: int | None = None
    refinement_steps: int | None = None
    embedding_learning_rate: float | None = None
    unet_learning_rate: float | None = None
    checkpoint_every: int | None = None
    num_class_images: int | None = None
    class_prompt: str | None = None
    prior_loss_weight: float | None = None
    lambda_attention: float | None = None
    noise_offset: float | None = None
    t_dist: float | None = None
    reg_weight: float | None = None
    reg_intrinsic_weight: float | None = None
    pos_neg_margin: float | None = None

    def set_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def quick(cls) -> Schedule:
        """A few steps of each phase: for smoke tests and demos on a CPU; the concepts learn next to nothing."""
        return cls(phase1_steps=2, phase2_steps=2, refinement_steps=1, num_class_images=2, checkpoint_every=0)


@dataclass(frozen=True)
class GenerateOptions:
    num_images: int | None = None  # per prompt; server default 8 (as the published inference script)
    num_inference_steps: int | None = None  # server default 50
    guidance_scale: float | None = None  # server default 7.5
    seed: int | None = None


@dataclass(frozen=True)
class ExtractOptions:
    """Everything `extract` does after localization, in one object (also what `ice extract` fills from flags)."""

    localize: LocalizeOptions = field(default_factory=LocalizeOptions)
    schedule: Schedule = field(default_factory=Schedule)
    anchors: tuple[str, ...] = ()  # empty = the server's default (texture, material, color)
    generate: GenerateOptions = field(default_factory=GenerateOptions)
    seed: int | None = None  # the learning job's seed
    composition: bool = True  # also render all concepts together, for SIM^C
    encoders: tuple[str, ...] = ()  # empty = every encoder of the bundle
    evaluate: bool = True
    few_class_images: bool = False  # the schedule's class images scaled to the job (`few_class_images`)


def image_bytes(image: Any) -> bytes:
    """Encoded image bytes from a path, bytes, a PIL image or an HxWx3 uint8 array."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def mask_png(mask: Any) -> bytes:
    """A mask as single-channel PNG bytes from PNG bytes, a path or a boolean/uint8 array."""
    if isinstance(mask, bytes | bytearray | str | Path):
        return image_bytes(mask)
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()
