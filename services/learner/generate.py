"""Generation with a job's learned tokens (docs/method.md#generation): the published object-level and per-attribute
prompts, or free prompts, with a DPM-Solver multistep scheduler, seeded per image."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from services.common.bundle import MODEL_BUILD_LOCK
from services.common.errors import InvalidArgument
from services.learner.artifacts import apply_artifacts

MAX_SEED = 2**64


@dataclass(frozen=True)
class GenerationDefaults:
    """What a Generate request leaves unset: the published inference values (docs/method.md#generation), or the bundle's own."""

    num_images: int = 8
    num_inference_steps: int = 50
    guidance_scale: float = 7.5


def generation_defaults(bundle) -> GenerationDefaults:
    return bundle.recommended_defaults("generate", GenerationDefaults())


def request_options(bundle, request) -> tuple[int, int, float, int]:
    """(images per prompt, steps, guidance, seed) of a Generate-shaped request: its set fields, else the defaults
    (the seed drawn); INVALID_ARGUMENT naming the field out of range."""
    d = generation_defaults(bundle)

    def given(name: str) -> bool:  # a request may lack a field (an export has no image count)
        return name in request.DESCRIPTOR.fields_by_name and request.HasField(name)

    num_images = request.num_images if given("num_images") else d.num_images
    steps = request.num_inference_steps if given("num_inference_steps") else d.num_inference_steps
    guidance = request.guidance_scale if given("guidance_scale") else d.guidance_scale
    for value, low, high, name in ((num_images, 1, 64, "num_images"), (steps, 1, 200, "num_inference_steps"),
                                   (guidance, 0, 50, "guidance_scale")):
        if not low <= value <= high:
            raise InvalidArgument(f"{value} is outside [{low}, {high}]", field=name)
    seed = request.seed if given("seed") else secrets.randbits(63)
    return num_images, steps, guidance, seed


@dataclass(frozen=True)
class Prompt:
    text: str
    concept_id: str = ""
    attribute: str = ""


def _tokens(manifest: dict, concept_id: str, role: str) -> list[dict]:
    return [t for t in manifest["tokens"] if t["concept_id"] == concept_id and t["role"] == role]


def object_level_prompts(manifest: dict, concept_ids: list[str]) -> list[Prompt]:
    """"a photo of <&i>" followed by the concept's intrinsic tokens, e.g. "a photo of <&0><#0><%0><$0>"."""
    out = []
    for cid in concept_ids:
        tokens = [t["token"] for t in _tokens(manifest, cid, "concept") + _tokens(manifest, cid, "intrinsic")]
        out.append(Prompt("a photo of " + "".join(tokens), cid))
    return out


def intrinsic_prompts(manifest: dict, concept_ids: list[str]) -> list[Prompt]:
    """"a {token} {anchor}" per intrinsic anchor (e.g. "a <#0> texture"), then "a <&i>"."""
    out = []
    for cid in concept_ids:
        out += [Prompt(f"a {t['token']} {t['attribute']}", cid, t["attribute"])
                for t in _tokens(manifest, cid, "intrinsic")]
        out += [Prompt(f"a {t['token']}", cid) for t in _tokens(manifest, cid, "concept")]
    return out


def load_pipeline(bundle, folder: Path, device: str = "cpu"):
    """A private pipeline of the bundle with the job's artifacts applied and the DPM-Solver scheduler."""
    return base_pipeline(bundle, device, lambda pipe: apply_artifacts(pipe, folder))


def base_pipeline(bundle, device: str = "cpu", prepare=None):
    """A private pipeline of the bundle with the DPM-Solver scheduler; `prepare(pipe)` (learned tokens, deltas)
    runs under the model-build lock."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    with MODEL_BUILD_LOCK:  # see services.common.bundle.MODEL_BUILD_LOCK
        pipe = StableDiffusionPipeline.from_pretrained(
            str(bundle.root / "diffusion"), safety_checker=None, requires_safety_checker=False,
            local_files_only=True, use_safetensors=True, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.to(device)
        if prepare is not None:
            prepare(pipe)
    return pipe


def generate(pipe, prompts: list[Prompt], num_images: int, seed: int, steps: int = 50,
             guidance_scale: float = 7.5, batch_size: int | None = None,
             ) -> Iterator[tuple[Prompt, int, int, Image.Image]]:
    """(prompt, index, seed, image) for each image, prompt by prompt; image n of every prompt uses seed + n
    (mod 2⁶⁴). The images of all the prompts are sampled `batch_size` at a time (default: as many as the memory
    estimate lets fit, `memory.generation_batch`), each from its own generator: its starting noise and so its
    image do not depend on the batch it is in (the batched UNet rounds differently: at most 2 levels of 255 per
    pixel, tests/test_generation_batches.py)."""
    from services.learner.memory import generation_batch

    todo = [(prompt, n, (seed + n) % MAX_SEED) for prompt in prompts for n in range(num_images)]
    if batch_size is None:
        batch_size = generation_batch(pipe, len(todo), str(pipe.device))
    for start in range(0, len(todo), max(1, batch_size)):
        chunk = todo[start : start + max(1, batch_size)]
        images = pipe([prompt.text for prompt, _, _ in chunk], num_inference_steps=steps,
                      guidance_scale=guidance_scale,
                      generator=[torch.Generator("cpu").manual_seed(s) for _, _, s in chunk]).images
        for (prompt, n, image_seed), image in zip(chunk, images, strict=True):
            yield prompt, n, image_seed, image
