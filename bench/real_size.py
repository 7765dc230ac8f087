"""Random weights with the real architectures, for runs at real size without downloading anything.

    python bench/real_size.py --out build/real-size/weights [--seed 0]

writes what `ice-bundle assemble` takes from real checkpoints:

- `sd21-base/`: a diffusers Stable Diffusion pipeline with the configuration of stabilityai/stable-diffusion-2-1-base
  (UNet 865.9M parameters at a 64×64 latent, cross-attention 1024, linear projections, head dims 5/10/20/20; the
  23-layer OpenCLIP-H text encoder, 340M; the f=8 VAE; PNDM sampler, ε-prediction; 512 px images);
- `ViT-B-32.json` + `ViT-B-32.safetensors`: open_clip's ViT-B-32 (its own shipped configuration);
- `dino-vits16/`: a transformers ViT with DINO ViT-S/16's configuration (224 px, patch 16, width 384, 12 layers).

The weights are random (seeded): every stage runs at its real size and speed, its outputs mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, mid_block_scale_factor=1,
)  # fmt: skip
SD21_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=1,
)  # fmt: skip
SD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
SD21_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)  # fmt: skip
DINO_VITS16 = dict(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                   intermediate_size=1536, qkv_bias=True)


def write_sd21_base(out: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from services.common.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_TEXT_ENCODER))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**SD21_BASE_UNET)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**SD_VAE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=PNDMScheduler(**SD21_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_open_clip(out_dir: Path, name: str = "ViT-B-32", seed: int = 0) -> tuple[Path, Path]:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = open_clip.get_model_config(name)
    model = open_clip.create_model(name, pretrained=None)
    weights = out_dir / f"{name}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    config_path = out_dir / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return config_path, weights


def write_dino(out: Path, seed: int = 0) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(**DINO_VITS16), add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": 224, "width": 224}, resample=3, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    return out


def write_all(out: Path, seed: int = 0, log=print) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sd = write_sd21_base(out / "sd21-base", seed)
    log(f"  SD-2.1-base pipeline written ({time.perf_counter() - t0:.0f} s)")
    config, weights = write_open_clip(out, "ViT-B-32", seed)
    dino = write_dino(out / "dino-vits16", seed)
    log(f"  ViT-B-32 and ViT-S/16 written ({time.perf_counter() - t0:.0f} s)")
    paths = {"diffusion": sd, "open_clip_config": config, "open_clip_weights": weights, "dino": dino}
    (out / "done.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write_all(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
