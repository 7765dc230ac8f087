"""Evaluator embedding throughput: batched forward passes against one image per forward pass, same images, same
encoder, preprocessing included in both (it is what the service pays per image).

Encoders: the tiny bundle's CLIP (ONNX, onnxruntime) and DINO (transformers ViT), and a ViT-S/16 at 224 px with
random weights (DINO's real size; the weights do not change the cost), where batching matters more than for
the tiny towers. The tiny bundle is ICE_TEST_BUNDLE if set, else built into a temporary directory.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
from harness import BenchResult, timeit
from PIL import Image

from services.common.bundle import Bundle, dino_transform
from services.common.service import resolve_device
from services.evaluator.encoders import DinoEncoder, load_encoders

BATCH = 32


def _images(n: int, side: int = 256) -> list[Image.Image]:
    from skimage import data

    photos = [data.coffee(), data.astronaut(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = photos[i % len(photos)]
        h, w = arr.shape[:2]
        top, left = rng.integers(0, h // 4), rng.integers(0, w // 4)
        out.append(Image.fromarray(arr[top:, left:]).resize((side, side)))
    return out


def _vit_s16(device: str) -> DinoEncoder:
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       patch_size=16, image_size=224)
    model = ViTModel(config, add_pooling_layer=False).eval().to(device)
    return DinoEncoder(model, dino_transform({"size": 224}), device)


def _compare(name: str, encoder, images: list[Image.Image], repeat: int) -> BenchResult:
    """Batched and one-at-a-time runs alternate, so load from other processes hits both alike."""
    n = len(images)
    encoder.embed(images[:BATCH], batch_size=BATCH)  # warm-up
    batched, single = [], []
    for _ in range(repeat):
        batched.append(timeit(lambda: encoder.embed(images, batch_size=BATCH), repeat=1, warmup=0) / n)
        single.append(timeit(lambda: encoder.embed(images, batch_size=1), repeat=1, warmup=0) / n)
    b, s = statistics.median(batched), statistics.median(single)
    return BenchResult(name, b, s, "same encoder, one image per forward pass", unit="image",
                       notes=f"{n} images, batch {BATCH}, preprocessing included",
                       extra={"images_per_s_batched": 1 / b, "images_per_s_single": 1 / s})


def run(quick: bool = False) -> list[BenchResult]:
    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = os.environ.get("ICE_TEST_BUNDLE")
        if not bundle_dir:
            from services.common.tiny_bundle import build_tiny_bundle

            bundle_dir = build_tiny_bundle(Path(tmp) / "tiny", seed=0)
        encoders = load_encoders(Bundle.open(bundle_dir), device)
        images = _images(64 if quick else 256)
        results = [_compare(f"evaluator_embed_tiny_{name}", enc, images, 5 if quick else 9)
                   for name, enc in encoders.items()]
    vit_images = images[: 16 if quick else 64]
    results.append(_compare("evaluator_embed_vit_s16_224", _vit_s16(device), vit_images, 3 if quick else 5))
    for r in results:
        print(f"   {r.name}: batched {r.extra['images_per_s_batched']:.1f} img/s, "
              f"one at a time {r.extra['images_per_s_single']:.1f} img/s, ratio {r.ratio:.2f}x")
    return results
