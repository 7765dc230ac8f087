"""Generation in batches (services/learner/generate.py, memory.generation_batch): the images of a call go through
the UNet together, as many as the memory estimate lets fit, and each image is the one its seed gave when images
were generated one at a time, to float rounding: at most `PIXEL_TOLERANCE` levels of 255 on any pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.learner import generate as G
from services.learner import memory as M

PIXEL_TOLERANCE = 2  # levels of 255; batched matrix products round differently from single-image ones
STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return tiny_bundle.load_diffusion("cpu", torch.float32)  # the bundle's pipeline: generate() takes any


PROMPTS = [G.Prompt("a photo of a cup", "c0"), G.Prompt("a red ball", "c1", "color")]


def _images(pipe, batch_size):
    return [(p, n, s, np.asarray(img).astype(int))
            for p, n, s, img in G.generate(pipe, PROMPTS, 3, 11, steps=STEPS, guidance_scale=5.0,
                                           batch_size=batch_size)]


def _unet_calls(pipe):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls, hook


def test_batched_images_are_the_images_their_seeds_give_one_at_a_time(pipe):
    calls, hook = _unet_calls(pipe)
    try:
        one = _images(pipe, 1)
        one_calls, calls[:] = list(calls), []
        batched = _images(pipe, 4)
        batched_calls = list(calls)
    finally:
        hook.remove()
    # one at a time: each image's STEPS passes of 2 (guidance); batched: the 6 images in batches of 4 and 2
    assert one_calls == [2] * (6 * STEPS)
    assert batched_calls == [8] * STEPS + [4] * STEPS
    assert [(p, n, s) for p, n, s, _ in batched] == [(p, n, s) for p, n, s, _ in one]
    assert [s for _, _, s, _ in one] == [11, 12, 13] * 2
    for (_, _, _, a), (_, _, _, b) in zip(one, batched, strict=True):
        assert np.abs(a - b).max() <= PIXEL_TOLERANCE
    # the tolerance is far below what another seed changes: the comparison could fail
    assert np.abs(one[0][3] - one[1][3]).max() > 20 * PIXEL_TOLERANCE


def test_the_batch_is_what_the_memory_estimate_lets_fit(pipe):
    per_image = M.trace_generation(pipe, "cpu") // M.GENERATION_TRACE_BATCH
    assert per_image > 0

    def room(n):  # bytes for n images at the traced peak, with the estimator's margin
        return int(n * per_image * (1 + M.MARGIN_FRACTION)) + M.MARGIN_BYTES + 1

    assert M.generation_batch(pipe, 20, "cpu", available=room(5)) == 5
    assert M.generation_batch(pipe, 20, "cpu", available=room(5) - per_image) == 4
    assert M.generation_batch(pipe, 20, "cpu", available=0) == 1  # never less than one image
    assert M.generation_batch(pipe, 20, "cpu", available=room(1000)) == 20  # never more than the call has
    assert M.generation_batch(pipe, 100, "cpu", available=room(1000)) == M.MAX_GENERATION_BATCH
    # a bigger image needs more per image: the trace follows the models' configuration
    assert M.trace_generation(pipe, "cpu", batch=8) > M.trace_generation(pipe, "cpu", batch=4)


def test_generate_sizes_its_batches_by_the_estimate_by_default(pipe, monkeypatch):
    monkeypatch.setattr(M, "free_memory", lambda device: 10 << 30)
    calls, hook = _unet_calls(pipe)
    try:
        out = list(G.generate(pipe, PROMPTS, 3, 0, steps=2, guidance_scale=5.0))
    finally:
        hook.remove()
    assert len(out) == 6 and calls == [12, 12]  # all six images in one batch of 2 × 6
