"""One UNet pass of the bundle's diffusion model that records its attention probabilities (docs/method.md#segmentor).

Only this pass swaps in `CaptureAttnProcessor`; the previous processors are restored afterwards, so other code
keeps diffusers' default (fused, probability-free) attention. The capture averages heads at once and sums the
layers of each resolution, so a 64×64 layer costs one [4096, 4096] buffer, not eight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import AttnProcessor


@dataclass
class AttentionMaps:
    """Head- and layer-averaged attention probabilities per latent resolution (side length)."""

    self_attention: dict[int, torch.Tensor] = field(default_factory=dict)  # s -> [s², s²] float32
    cross_attention: dict[int, torch.Tensor] = field(default_factory=dict)  # s -> [s², tokens] float32
    _self_counts: dict[int, int] = field(default_factory=dict)
    _cross_counts: dict[int, int] = field(default_factory=dict)

    def add(self, probs: torch.Tensor, heads: int, cross: bool) -> None:
        """`probs` [batch·heads, queries, keys] of one layer (batch 1)."""
        mean = probs.float().reshape(-1, heads, *probs.shape[1:]).mean(dim=(0, 1))
        side = int(round(mean.shape[0] ** 0.5))
        store, counts = (self.cross_attention, self._cross_counts) if cross else (self.self_attention, self._self_counts)
        store[side] = store[side] + mean if side in store else mean
        counts[side] = counts.get(side, 0) + 1

    def finish(self) -> AttentionMaps:
        """Divide each resolution's sum by its number of layers."""
        for store, counts in ((self.self_attention, self._self_counts), (self.cross_attention, self._cross_counts)):
            for side in store:
                store[side] = store[side] / counts[side]
        return self


class _RecordingAttention:
    """Stands in for a diffusers `Attention` inside the stock processor, recording what it returns from
    `get_attention_scores`; every other attribute is the real module's."""

    def __init__(self, attn, maps: AttentionMaps, cross: bool):
        self._attn, self._maps, self._cross = attn, maps, cross

    def __getattr__(self, name):
        return getattr(self._attn, name)

    def get_attention_scores(self, query, key, attention_mask=None):
        probs = self._attn.get_attention_scores(query, key, attention_mask)
        self._maps.add(probs, self._attn.heads, self._cross)
        return probs


class CaptureAttnProcessor(AttnProcessor):
    """diffusers' reference attention (explicit probabilities), recording them into `maps`."""

    def __init__(self, maps: AttentionMaps, cross: bool):
        super().__init__()
        self.maps, self.cross = maps, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        proxy = _RecordingAttention(attn, self.maps, self.cross)
        return super().__call__(proxy, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def encode_prompt(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder hidden states [1, 77, D], input ids [77]) of the prompt, padded to the model length."""
    tok = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    ids = tok.input_ids.to(pipe.text_encoder.device)
    hidden = pipe.text_encoder(ids)[0]
    return hidden, tok.input_ids[0]


@torch.no_grad()
def encode_image(pipe, image: torch.Tensor) -> torch.Tensor:
    """[1, 3, S, S] in [-1, 1] -> the VAE's mean latent × scaling factor (no sampling, as published)."""
    vae = pipe.vae
    latent = vae.encode(image.to(vae.device, vae.dtype)).latent_dist.mean
    return latent * vae.config.scaling_factor


@torch.no_grad()
def capture_attention(pipe, latent: torch.Tensor, text_states: torch.Tensor, timestep: int) -> AttentionMaps:
    """One UNet forward pass on `latent` at `timestep` (no noise added, no denoising loop), recording attention."""
    unet = pipe.unet
    maps = AttentionMaps()
    previous = unet.attn_processors
    processors = {name: CaptureAttnProcessor(maps, cross=name.endswith("attn2.processor")) for name in previous}
    unet.set_attn_processor(processors)
    try:
        t = torch.tensor([timestep], device=unet.device)
        unet(latent.to(unet.device, unet.dtype), t, encoder_hidden_states=text_states.to(unet.dtype))
    finally:
        unet.set_attn_processor(previous)
    return maps.finish()
