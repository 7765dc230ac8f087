"""Cross-attention capture for the attention loss (docs/method.md#losses), on the layers the loss reads only.

The loss needs the softmax cross-attention probabilities of the down- and up-block layers at 16×16 (the
mid block is excluded), averaged over all their heads. Only those layers get `CaptureCrossAttnProcessor`,
which computes the probabilities explicitly (`attn.get_attention_scores`) and keeps them in the graph; every
other layer keeps diffusers' fused scaled-dot-product processor. The published code instead records every
attention map of every layer and then throws most of them away.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor

LOSS_RESOLUTION = 16


def layer_resolutions(unet) -> dict[str, int]:
    """Spatial side of the latent seen by each cross-attention layer (`…attn2`) of the down and up blocks."""
    latent = int(unet.config.sample_size)
    levels = len(unet.config.block_out_channels)
    out = {}
    for name, _module in unet.attn_processors.items():
        name = name.removesuffix(".processor")
        if not name.endswith("attn2"):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = levels - 1 - int(parts[1])
        else:  # mid block: excluded by the published aggregation
            continue
        out[name] = latent // (2**level)
    return out


def capture_layers(unet, preferred: int = LOSS_RESOLUTION) -> tuple[list[str], int]:
    """The cross-attention layers at `preferred` (or, when the model has none there, the nearest resolution)."""
    resolutions = layer_resolutions(unet)
    if not resolutions:
        raise ValueError("the UNet has no cross-attention in its down or up blocks")
    side = min(set(resolutions.values()), key=lambda r: (abs(r - preferred), -r))
    return sorted(n for n, r in resolutions.items() if r == side), side


class AttentionStore:
    """Probabilities captured during one forward, for the batch entries in `keep` (the instance samples)."""

    def __init__(self, side: int):
        self.side = side
        self.keep: slice = slice(None)
        self.maps: list[torch.Tensor] = []

    def clear(self) -> None:
        self.maps = []

    def average(self) -> torch.Tensor:
        """[B_kept, side, side, tokens]: the mean over every head of every captured layer."""
        if not self.maps:
            raise RuntimeError("no cross-attention was captured in this forward pass")
        heads = torch.cat(self.maps, dim=1)  # [B, layers·heads, Q, K]
        avg = heads.float().mean(dim=1)
        return avg.reshape(avg.shape[0], self.side, self.side, avg.shape[-1])


class CaptureCrossAttnProcessor(AttnProcessor):
    """Diffusers' explicit attention path, recording the probabilities of the kept batch entries."""

    def __init__(self, store: AttentionStore):
        super().__init__()
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("CaptureCrossAttnProcessor is for cross-attention layers only")
        batch, queries, _ = hidden_states.shape
        mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, mask)  # [B·heads, Q, K]
        if queries != self.store.side**2:
            raise ValueError(f"captured layer has {queries} queries, expected {self.store.side}²")
        self.store.maps.append(probs.view(batch, attn.heads, queries, -1)[self.store.keep])
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_capture(unet, preferred: int = LOSS_RESOLUTION) -> AttentionStore:
    """Put the capturing processor on the loss layers only; returns the store they fill."""
    names, side = capture_layers(unet, preferred)
    store = AttentionStore(side)
    modules = dict(unet.named_modules())
    for name in names:
        modules[name].set_processor(CaptureCrossAttnProcessor(store))
    return store
