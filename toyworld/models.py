"""The ToyWorld models: small configurations of the very classes a real bundle uses.

- diffusion: diffusers `AutoencoderKL` (f = 4: 64 px → 4 × 16 × 16), `UNet2DConditionModel` with self- and
  cross-attention at 16 × 16 and 8 × 8, transformers `CLIPTextModel` on the CLIP BPE tokenizer, and a
  v-prediction DDPM schedule (SD's scaled-linear betas rescaled to zero terminal SNR; sampled with trailing
  timesteps), so that samples start from pure noise as at inference;
- retriever/evaluator CLIP: an open_clip `CLIP` from a custom config (ViT 64 px, patch 8);
- evaluator DINO: a transformers `ViTModel` (64 px, patch 8), trained self-supervised.
"""

from __future__ import annotations

import torch

from toyworld.world import IMAGE_SIZE

LATENT_SIZE = IMAGE_SIZE // 4
TEXT_WIDTH = 128

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    steps_offset=1,
)

CLIP_CONFIG = {
    "model_name": "toyworld-vit-p8",
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 192, "layers": 4, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3,
                 "mlp_ratio": 2.0},
    "preprocess_cfg": {"image_size": IMAGE_SIZE, "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                       "resize_mode": "shortest"},
}  # fmt: skip

DINO_CONFIG = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=192, num_hidden_layers=4,
                   num_attention_heads=6, intermediate_size=384)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # set from the trained encoder's latent spread
    )


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=TEXT_WIDTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=16,
        norm_num_groups=16,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER)


def build_clip():
    from services.common.bundle import build_open_clip_model

    return build_open_clip_model(CLIP_CONFIG)


def build_dino():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(**DINO_CONFIG), add_pooling_layer=False)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
