"""Class images for prior preservation (docs/learner.md#class-images): which a job uses, where they come from, and
their generation, resumable image by image and stoppable within one denoising step. No gRPC.

A job's step n uses class image n mod num_class_images, so it never uses more than min(num_class_images, total
steps) of them (`used_count`): only those are made. Image n is generated with seed n, in the batch of
`CLASS_IMAGE_BATCH` images that starts at the multiple of the batch size below n, whatever the count asked for:
every image is the same wherever and whenever it is made. They come from, in this order:

1. the bundle: `class_images/` holds the first N images of one class prompt (`class_images/class_images.json`
   says which prompt, how many, with how many denoising steps), hashed in bundle.json like every file. `ice-bundle
   class-images` makes them once; then no machine generates them again. A job with that prompt takes images
   0..N-1 from there;
2. the learner's cache (`--class-images-dir`): one folder per (diffusion weights, prompt, denoising steps) with
   one PNG per image, each written under a temporary name and renamed, so a process killed while generating
   loses at most the batch being made: the next attempt keeps every finished image and goes on from the next
   batch. Replicas sharing the folder write identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.common.bundle import CLASS_IMAGES_DIR as BUNDLE_DIR
from services.common.bundle import CLASS_IMAGES_INDEX as BUNDLE_INDEX
from services.common.errors import BundleError

CLASS_IMAGE_BATCH = 4  # images per pipeline call (also what the memory estimate traces)


class Stop(Exception):
    """Raised by `should_stop` (through the pipeline's step callback) to end generation at once."""


def used_count(num_class_images: int, total_steps: int) -> int:
    """How many class images a job uses: image n mod num_class_images at step n, for its total_steps steps."""
    return max(0, min(num_class_images, total_steps))


def image_name(n: int) -> str:
    return f"{n:05d}.png"


def diffusion_digest(bundle) -> str:
    """What a generated class image depends on in the bundle: its diffusion files (another vocabulary, CLIP or a
    bundle's own class images change nothing)."""
    h = hashlib.sha256()
    for rel, entry in sorted(bundle.info["files"].items()):
        if rel.startswith("diffusion/"):
            h.update(f"{rel}\t{entry['sha256']}\n".encode())
    return h.hexdigest()


def cache_folder(bundle, cache_dir: Path, prompt: str, steps: int) -> Path:
    key = hashlib.sha256(f"{diffusion_digest(bundle)}\n{prompt}\n{steps}".encode()).hexdigest()[:24]
    return Path(cache_dir) / key


@dataclass(frozen=True)
class Carried:
    """The class images a bundle carries."""

    prompt: str
    count: int
    steps: int


def carried(bundle) -> Carried | None:
    """The bundle's own class images (None when it has none). A listed image missing from bundle.json is a
    BundleError: it would be generated again silently otherwise."""
    if BUNDLE_INDEX not in bundle.info["files"]:
        return None
    try:
        data = json.loads((bundle.root / BUNDLE_INDEX).read_text(encoding="utf-8"))
        info = Carried(str(data["prompt"]), int(data["count"]), int(data["num_inference_steps"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"not a class-image index: {exc}", BUNDLE_INDEX) from None
    for n in range(info.count):
        if f"{BUNDLE_DIR}/{image_name(n)}" not in bundle.info["files"]:
            raise BundleError(f"lists {info.count} images but {image_name(n)} is not in bundle.json", BUNDLE_INDEX)
    return info


@dataclass
class ClassImagePlan:
    """The class images of one job: `paths[n]` is image n (from the bundle or the cache)."""

    prompt: str
    steps: int  # denoising steps of a generated image
    paths: list[Path]
    from_bundle: int  # images 0..from_bundle-1 are the bundle's
    missing: list[int] = field(default_factory=list)  # indices of the cache's images not made yet

    @property
    def count(self) -> int:
        return len(self.paths)

    @property
    def to_generate(self) -> int:
        return len(self.missing)

    @property
    def ready(self) -> int:
        return self.count - self.to_generate

    @property
    def source(self) -> str:
        """"bundle", "cache" or "bundle+cache" (where the images come from), "" for none."""
        if not self.paths:
            return ""
        if self.from_bundle >= self.count:
            return "bundle"
        return "bundle+cache" if self.from_bundle else "cache"

    def refresh(self) -> None:
        self.missing = [n for n in range(self.from_bundle, self.count) if not self.paths[n].is_file()]


def plan(bundle, prompt: str, count: int, cache_dir: Path, steps: int) -> ClassImagePlan:
    """Where each of the `count` class images of `prompt` comes from, and which of them are still to be made."""
    own = carried(bundle)
    from_bundle = min(own.count, count) if own is not None and own.prompt == prompt else 0
    folder = cache_folder(bundle, cache_dir, prompt, steps)
    paths = [bundle.root / BUNDLE_DIR / image_name(n) if n < from_bundle else folder / image_name(n)
             for n in range(count)]
    result = ClassImagePlan(prompt, steps, paths, from_bundle)
    result.refresh()
    return result


def _batches(missing: list[int]) -> list[list[int]]:
    """The aligned batches that hold the missing images: each a whole batch, so image n always shares its batch
    with the same seeds (batch composition changes the numerics of a pipeline call)."""
    starts = sorted({n - n % CLASS_IMAGE_BATCH for n in missing})
    return [list(range(s, s + CLASS_IMAGE_BATCH)) for s in starts]


def generate(
    plan: ClassImagePlan,
    pipeline: Callable[[], object],
    *,
    autocast=None,
    should_stop: Callable[[], None] = lambda: None,
    on_progress: Callable[[int, int, float], None] = lambda ready, count, seconds: None,
) -> list[Path]:
    """Make the plan's missing images with the pipeline `pipeline()` returns (built only when something is
    missing). `should_stop` is called before every batch and after every denoising step and may raise to stop at
    once (the images already written stay). `on_progress(ready, count, seconds_per_image)` follows every batch."""
    if not plan.missing:
        return plan.paths
    folder = plan.paths[plan.missing[0]].parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.json").write_text(json.dumps({"prompt": plan.prompt, "num_inference_steps": plan.steps}))
    should_stop()
    pipe = pipeline()

    def on_step_end(_pipe, _step, _timestep, callback_kwargs):
        should_stop()
        return callback_kwargs

    for seeds in _batches(plan.missing):
        should_stop()
        started = time.perf_counter()
        with autocast or nullcontext():
            images = make_batch(pipe, plan.prompt, seeds, plan.steps, on_step_end)
        for s, img in zip(seeds, images, strict=True):  # the batch's images beyond the count are kept too
            target = folder / image_name(s)
            tmp = folder / f".{image_name(s)}.{os.getpid()}.tmp"
            img.save(tmp, format="PNG")
            os.replace(tmp, target)
        plan.refresh()
        on_progress(plan.ready, plan.count, (time.perf_counter() - started) / len(seeds))
    del pipe
    return plan.paths


def make_batch(pipe, prompt: str, seeds: list[int], steps: int, on_step_end=None) -> list:
    """One pipeline call: the images of `seeds`, image s drawn from a generator seeded with s."""
    return pipe([prompt] * len(seeds), num_inference_steps=steps,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                callback_on_step_end=on_step_end).images


def add_to_bundle(root: Path, *, prompt: str | None = None, count: int | None = None, steps: int = 50,
                  device: str = "cpu", force: bool = False, progress: Callable[[str], None] = print) -> dict:
    """Generate a bundle's class images once and make them part of it (`ice-bundle class-images`): the first
    `count` images of `prompt` (default: the class prompt of the bundle's recommended schedule, and as many images
    as a job of that schedule uses), made exactly as a learner makes them (the job's own models, fp32 on a CPU,
    bf16 autocast on CUDA), written to `class_images/` and hashed into bundle.json (the digest changes: a new
    bundle version). Resumable: the images are made in `.class_images.partial/` inside the bundle, image by
    image, and a rerun goes on from there. Returns the new bundle info."""
    import shutil

    from services.common.assemble import rehash_bundle
    from services.common.bundle import Bundle
    from services.learner.trainer import Schedule, components_pipeline, load_components

    root = Path(root)
    bundle = Bundle.open(root, verify_hashes=True)
    if carried(bundle) is not None and not force:
        raise FileExistsError(f"{root} carries class images already (use --force to make them again)")
    schedule = bundle.recommended_defaults("schedule", Schedule())
    prompt = prompt or schedule.class_prompt
    count = used_count(schedule.num_class_images, schedule.total_steps) if count is None else count
    if not 1 <= count <= 5000:
        raise ValueError(f"--count {count} is outside [1, 5000]")
    staging = root / ".class_images.partial"
    folder = cache_folder(bundle, staging, prompt, steps)  # made as a learner's cache is (not from the bundle)
    wanted = ClassImagePlan(prompt, steps, [folder / image_name(n) for n in range(count)], 0)
    wanted.refresh()
    progress(f"class images of {prompt!r}: {count} ({wanted.to_generate} to generate, {steps} denoising steps "
             f"each, on {device})")
    models = {}

    def pipeline():
        models["parts"] = load_components(bundle, device)
        tokenizer, text_encoder, unet, vae, _ = models["parts"]
        return components_pipeline(root / "diffusion", tokenizer, text_encoder, unet, vae)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else None
    generate(wanted, pipeline, autocast=autocast,
             on_progress=lambda ready, total, seconds: progress(f"  {ready}/{total} ({seconds:.2f} s an image)"))
    models.clear()
    target = root / BUNDLE_DIR
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for n, path in enumerate(wanted.paths):
        shutil.copyfile(path, target / image_name(n))
    (root / BUNDLE_INDEX).write_text(json.dumps({"prompt": prompt, "count": count, "num_inference_steps": steps,
                                                 "seeds": "image n is generated with seed n"}, indent=2) + "\n")
    shutil.rmtree(staging)
    info = rehash_bundle(root, {"class_images": {"prompt": prompt, "count": count, "num_inference_steps": steps}})
    progress(f"bundle digest {info['digest']}")
    return info
