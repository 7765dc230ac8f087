"""One stage-2 training step (UNet forward + backward into the token context, masked loss + attention loss)
with our attention capture — the explicit probabilities of the 16×16 cross-attention layers only, every other
layer on the fused SDPA processor — against the published approach: every layer's processor records every
attention probability map (self and cross, all resolutions) and the loss then picks the 16×16 cross maps.
Same random mid-size UNet, same inputs. Memory: bytes saved for backward by autograd during the step
(activations and recorded maps, deduplicated by storage), the part of peak memory the two steps differ in."""

from __future__ import annotations

import torch
from harness import BenchResult, timeit

from services.learner import losses as L
from services.learner.attention import AttentionStore, capture_layers, install_capture


class RecordEverything:
    """The published AttentionStore approach: an explicit-softmax processor on every layer, keeping every map."""

    def __init__(self):
        self.maps: list[tuple[str, torch.Tensor]] = []

    def processor(self, name: str):
        store = self

        class Recording:
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                         *args, **kwargs):
                context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
                batch, queries, _ = hidden_states.shape
                q = attn.head_to_batch_dim(attn.to_q(hidden_states))
                k = attn.head_to_batch_dim(attn.to_k(context))
                v = attn.head_to_batch_dim(attn.to_v(context))
                probs = attn.get_attention_scores(q, k, None)
                store.maps.append((name, probs.view(batch, attn.heads, queries, -1)[1:]))
                out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))
                return out / attn.rescale_output_factor

        return Recording()

    def average(self, names: set[str], side: int) -> torch.Tensor:
        heads = torch.cat([m for n, m in self.maps if n in names], dim=1).mean(dim=1)
        return heads.reshape(heads.shape[0], side, side, heads.shape[-1])


LATENT = 64  # SD's 512 px latent: 64x64 self-attention in the first block, the loss layers at 16x16


def _unet(quick: bool):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    channels = (32, 64, 128) if quick else (64, 128, 256)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        # diffusers' `attention_head_dim` is the number of heads: one head per 64 channels, as in SD (head dim 64)
        layers_per_block=2, cross_attention_dim=64, attention_head_dim=tuple(c // 64 or 1 for c in channels),
        norm_num_groups=16)
    return unet.eval().requires_grad_(False)


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu" and t.untyped_storage().data_ptr():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run(quick: bool = False) -> list[BenchResult]:
    unet = _unet(quick)
    names, side = capture_layers(unet)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, LATENT, LATENT, generator=g)
    noise = torch.randn(2, 4, LATENT, LATENT, generator=g)
    t = torch.tensor([500, 700])
    context = torch.randn(2, 77, 64, generator=g)
    mask = torch.zeros(1, 1, 8 * LATENT, 8 * LATENT)
    mask[..., 2 * LATENT : 6 * LATENT, 3 * LATENT : 7 * LATENT] = 1
    positions = [5, 6]

    def step(average):
        ctx = context.clone().requires_grad_(True)
        pred = unet(latents, t, encoder_hidden_states=ctx).sample
        loss = L.masked_reconstruction(pred[1:], noise[1:], mask) + torch.nn.functional.mse_loss(pred[:1], noise[:1])
        attention = average()[..., positions].mean(-1)
        loss = loss + 1e-5 * L.attention_loss(attention, mask)
        loss.backward()
        return ctx.grad

    store: AttentionStore = install_capture(unet)
    store.keep = slice(1, 2)

    def ours():
        try:
            return step(store.average)
        finally:
            store.clear()

    grad_ours = ours()
    t_ours = timeit(ours, repeat=3 if quick else 5)
    mem_ours = _saved_bytes(ours)

    recorder = RecordEverything()
    unet.set_attn_processor({n: recorder.processor(n.removesuffix(".processor")) for n in unet.attn_processors})

    def reference():
        try:
            return step(lambda: recorder.average(set(names), side))
        finally:
            recorder.maps = []

    grad_ref = reference()
    t_ref = timeit(reference, repeat=3 if quick else 5)
    mem_ref = _saved_bytes(reference)
    agree = float((grad_ours - grad_ref).abs().max() / grad_ref.abs().max())
    size = "quick (32,64,128)" if quick else "mid (64,128,256)"
    return [sinkhorn_result(quick), BenchResult(
        "learner_train_step", t_ours, t_ref, "every attention map of every layer recorded (published approach)",
        unit="step",
        notes=f"UNet {size}, 2 layers/block, latent {LATENT}x{LATENT}, batch 2 (class+instance), fp32 CPU; "
              f"capture on {len(names)} cross-attention layers at {side}x{side}",
        extra={"saved_for_backward_mb_ours": mem_ours / 2**20, "saved_for_backward_mb_reference": mem_ref / 2**20,
               "context_grad_max_rel_diff": agree})]


def sinkhorn_result(quick: bool) -> BenchResult:
    """The attention loss's Sinkhorn (200 log-domain iterations at ε = 1e-3 on the 16×16 grid, float64, every
    learner step) with our subnormal-free log-sum-exp against the same iterations with torch.logsumexp."""
    g = torch.Generator().manual_seed(0)
    side = 16
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:40, 12:50] = 1
    mu = L.mask_to_grid(mask, side).reshape(1, -1).double()
    mu = mu / mu.sum()
    nu = torch.rand(1, side * side, generator=g, dtype=torch.float64) ** 4
    nu = nu / nu.sum()
    cost = L.grid_cost(side, dtype=torch.float64)

    def ours():
        return L._log_sinkhorn(mu, nu, cost, L.SINKHORN_EPSILON, L.SINKHORN_ITERATIONS)

    def reference():
        return L._log_sinkhorn(mu, nu, cost, L.SINKHORN_EPSILON, L.SINKHORN_ITERATIONS, logsumexp=torch.logsumexp)

    a, b = ours(), reference()
    finite = torch.isfinite(b[0])
    diff = max(float((a[0] - b[0])[finite].abs().max()), float((a[1] - b[1]).abs().max())) * L.SINKHORN_EPSILON
    return BenchResult(
        "learner_sinkhorn_attention_loss", timeit(ours, repeat=3 if quick else 5),
        timeit(reference, repeat=3 if quick else 5), "the same iterations with torch.logsumexp (subnormals formed)",
        notes="16x16 grid, 200 iterations, float64, batch 1",
        extra={"max_abs_diff_of_scaled_potentials": diff})
