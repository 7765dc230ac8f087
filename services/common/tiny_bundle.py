"""The tiny bundle: every component from small configs of the real classes, randomly initialised, deterministic.

It exercises every code path in seconds on a CPU; its outputs carry no meaning. Facts other code may rely on:

- image_size 64 px; VAE downsample factor 4 -> latent 4 x 16 x 16; vae scaling_factor 0.18215.
- UNet: CrossAttnDownBlock2D x2 / CrossAttnUpBlock2D x2 + cross-attention mid block: self- and cross-attention
  at 16x16 (down_blocks.0, up_blocks.1) and at 8x8 (down_blocks.1, mid_block, up_blocks.0); cross_attention_dim 32.
- Text encoder: CLIPTextModel, hidden 32, 2 layers, vocab 49408 (OpenAI CLIP BPE ids), 77 positions, eos 49407.
- CLIP (open_clip): ViT image 64 px, patch 8, width 64; text width 64; embed_dim 32.
- DINO: ViTModel, image 64 px, patch 8, hidden 48 (use the CLS token of last_hidden_state).
- vocabulary: services/common/data/tiny_vocab.tsv.

Same seed -> byte-identical files (hence the same digest); each model is built under ``torch.manual_seed(seed + k)``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from services.common import assemble as A
from services.common import bundle as B

TINY_IMAGE_SIZE = 64
TINY_LATENT_SIZE = 16
TINY_VOCAB = Path(__file__).parent / "data" / "tiny_vocab.tsv"

# Stable Diffusion's training noise schedule.
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)

TINY_CLIP_CONFIG = {
    "model_name": "tiny-vit-p8",
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 64,
        "patch_size": 8,
        "width": 64,
        "layers": 2,
        "head_width": 16,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 2,
        "mlp_ratio": 2.0,
    },
    "preprocess_cfg": {
        "image_size": 64,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_tiny_bundle(out_dir: str | Path, seed: int = 0, *, force: bool = False, progress=A._noop) -> Path:
    """Write a tiny random bundle to `out_dir` (must be absent or empty unless `force`). Returns the path."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, ViTConfig, ViTImageProcessor, ViTModel

    from services.common.tokenizer import build_clip_tokenizer

    out = Path(out_dir)
    t0 = time.perf_counter()
    tmp = A.staging_dir(out, force)
    try:
        _seed_all(seed)
        progress("building the tiny diffusion pipeline")
        tokenizer = build_clip_tokenizer()
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(
            sample_size=TINY_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 32, 64),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=16,
            sample_size=TINY_IMAGE_SIZE,
            scaling_factor=0.18215,
        )
        scheduler = DDPMScheduler(**SD_SCHEDULER)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp / B.DIFFUSION_DIR, safe_serialization=True)

        progress("building the tiny open_clip model")
        (tmp / "clip").mkdir()
        torch.manual_seed(seed + 4)
        clip_model = B.build_open_clip_model(TINY_CLIP_CONFIG)
        state = {k: v.detach().contiguous().clone() for k, v in clip_model.state_dict().items()}
        save_file(state, str(tmp / B.CLIP_WEIGHTS), metadata={"format": "pt"})
        (tmp / B.CLIP_CONFIG).write_text(json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n")

        progress("building the tiny DINO ViT")
        torch.manual_seed(seed + 5)
        dino = ViTModel(
            ViTConfig(
                image_size=64,
                patch_size=8,
                hidden_size=48,
                num_hidden_layers=2,
                num_attention_heads=3,
                intermediate_size=96,
            ),
            add_pooling_layer=False,
        )
        dino.save_pretrained(tmp / B.DINO_DIR, safe_serialization=True)
        ViTImageProcessor(
            do_resize=True,
            size={"height": 64, "width": 64},
            resample=3,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ).save_pretrained(tmp / B.DINO_DIR)

        (tmp / "vocab").mkdir()
        shutil.copyfile(TINY_VOCAB, tmp / B.VOCAB_TSV)
        torch.manual_seed(seed + 6)
        info = A.finalize_bundle(
            tmp, name=f"tiny-seed{seed}", version="1", kind="tiny", precision="float32", progress=progress
        )
        A.commit_staging(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"built {info['name']} in {time.perf_counter() - t0:.1f}s")
    return out
