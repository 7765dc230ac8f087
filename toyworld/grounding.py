"""Grounded pretraining of the ToyWorld diffusion model: captions whose words know their pixels, the token-grounding
loss, and the binding figure that says whether a noun's cross-attention lies on its own object.

Why this exists. ICE's stage 1 asks the diffusion model's cross-attention for "<noun> things background" and gives
each DiffSeg segment to the word that attends to it most. That works in Stable Diffusion because web-scale training
made a noun's cross-attention map lie on that noun's object. A 3 M-parameter model trained for hours on two CPU
cores does not get that property from the diffusion loss alone: its map for "ball" covers every object (a
foreground map). The world knows every object's mask, so the model is taught it directly, in the manner of
TokenCompose: beside the v-prediction loss, each caption word that names an object (its category, colour and
texture words; "things" for the objects a caption leaves unnamed; "background" for the background) is pulled onto
that object's mask at the 16 × 16 and 8 × 8 cross-attention layers. Masks are used only here, to pretrain the
stand-in model; ICE itself never sees one.

- `grounded_caption(scene, rng)`: a caption as words, each with the mask it names (or none);
- `GroundingTargets`: a batch of captions as token ids and per-token masks at each attention resolution;
- `CrossAttentionRecorder`: records the cross-attention probabilities of every layer, in the autograd graph;
- `grounding_losses(...)`: L_token = (1 − Σ(A·M) / ΣA)² (heads averaged, per layer) and L_pixel = BCE(A / max A, M)
  (heads and layers of a resolution averaged);
- `binding_share(...)`: the figure the stage is for (docs/toyworld.md): for ICE's vote prompt
  "<category> things background", one UNet pass on the clean latent, the share of the noun's attention mass over
  all object pixels that lies on its own object (chance, a foreground map: the object's share of object area).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

from toyworld.captions import LEARNER_TEMPLATES, MATERIAL
from toyworld.world import IMAGE_SIZE, Scene, WorldObject

GROUNDED_SIDES = (16, 8)  # the cross-attention resolutions ICE reads (16) and the one below it
PUNCTUATION = {",", ":"}


# ----------------------------------------------------------------------------------------------------------------
# captions whose words carry their masks


@dataclass
class GroundedCaption:
    words: list[str]  # the caption split into words and punctuation marks
    masks: list[np.ndarray | None]  # bool [64, 64] per word: the pixels it names, or None (not grounded)

    @property
    def text(self) -> str:
        out = ""
        for w in self.words:
            out += w if (w in PUNCTUATION or not out) else " " + w
        return out


class _Builder:
    def __init__(self):
        self.words: list[str] = []
        self.masks: list[np.ndarray | None] = []

    def add(self, text: str, mask: np.ndarray | None = None) -> _Builder:
        for w in text.split():
            self.words.append(w)
            self.masks.append(mask)
        return self

    def punct(self, mark: str) -> _Builder:
        self.words.append(mark)
        self.masks.append(None)
        return self

    def done(self) -> GroundedCaption:
        return GroundedCaption(self.words, self.masks)


def _object_words(b: _Builder, o: WorldObject, mask: np.ndarray, rng: np.random.Generator) -> None:
    """One way of naming an object with some or all of its attributes (the forms of `captions.object_phrase`);
    the category, colour and texture words are grounded on the object."""
    texture = [] if o.texture == "plain" else [o.texture]
    forms = [
        [o.colour, *texture, o.category],
        [o.colour, o.category],
        [*texture, o.category],
        [o.category],
        [o.category, "of", o.colour, "color"],
        [o.colour, o.category, "with", o.texture, "texture"],
        [o.category, "with", o.texture, "texture"],
        [o.colour, *texture, o.category, "of", MATERIAL, "material"],
    ]
    weights = np.array([6, 3, 2, 1, 1, 2, 1, 1], dtype=float)
    named = {o.category, o.colour, o.texture}
    for w in forms[int(rng.choice(len(forms), p=weights / weights.sum()))]:
        b.add(w, mask if w in named else None)


def _objects(b: _Builder, objs: list[WorldObject], rng: np.random.Generator) -> None:
    for i, o in enumerate(objs):
        if i:
            b.add("and") if i == len(objs) - 1 else b.punct(",")
        b.add("a")
        _object_words(b, o, o.mask, rng)


def _union(objs: list[WorldObject]) -> np.ndarray:
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for o in objs:
        out |= o.mask
    return out


def grounded_caption(scene: Scene, rng: np.random.Generator, vote_share: float = 0.5,
                     empty_share: float = 0.1) -> GroundedCaption:
    """A caption of `scene` drawn with `rng`, each word with the mask it names.

    - `vote_share` of them in the form of ICE's stage-1 vote prompt, "<category> things background": the category
      of one visible object → every object of that category, "things" → the other objects, "background" → the
      background;
    - the rest in the scene templates of `captions.caption`; some name only part of the objects and end in
      "and other things", whose "things" is grounded on the unnamed ones;
    - a scene shown with a black background (ICE's later rounds) always says so, and one with blacked-out objects
      says "black shapes": a plain prompt then never asks for black (the leak of that augmentation into plain
      prompts held generation back);
    - `empty_share` empty captions (classifier-free guidance).
    """
    b = _Builder()
    if empty_share and rng.random() < empty_share:
        return b.done()
    objs = list(scene.objects)
    holes = _union(scene.removed)
    background = ~(_union(objs) | holes)  # black holes of removed objects are neither background nor object
    bg_words = "black" if scene.background == "black" else scene.background
    if not objs:
        return b.add("a").add(bg_words).add("background", background).done()
    if rng.random() < vote_share:
        first = objs[int(rng.integers(len(objs)))]
        same = [o for o in objs if o.category == first.category]
        others = [o for o in objs if o.category != first.category]
        b.add(first.category, _union(same)).add("things", _union(others) if others else None)
        return b.add("background", background).done()
    rng.shuffle(objs)
    if len(objs) == 1 and rng.random() < 0.3:
        o = objs[0]
        u = rng.random()
        if u < 0.25:
            b.add(o.category, o.mask)
        elif u < 0.45:
            b.add("a").add(o.colour, o.mask).add("color")
        elif u < 0.65:
            b.add("a").add(o.texture, o.mask).add("texture")
        else:
            template = str(rng.choice(LEARNER_TEMPLATES))
            head, tail = template.split("{}")
            b.add(head)
            _object_words(b, o, o.mask, rng)
            b.add(tail)
        if scene.background == "black" or scene.removed:
            b.add("on").add("a").add("black").add("background", background)
        return b.done()
    named, unnamed = objs, []
    if len(objs) > 1 and rng.random() < 0.3:
        k = int(rng.integers(1, len(objs)))
        named, unnamed = objs[:k], objs[k:]
    # the scene templates of `captions.caption`; a black or blacked-out scene always names its background
    v = rng.random() * (0.5 if scene.background == "black" or scene.removed else 1.0)
    if v < 0.10:
        b.add("things on a").add(bg_words).add("background", background).punct(":")
    elif 0.50 <= v < 0.65:
        b.add("a photo of")
    _objects(b, named, rng)
    if unnamed:
        b.add("and other").add("things", _union(unnamed))
    if scene.removed and scene.background != "black":
        b.add("and black shapes")
    if 0.10 <= v < 0.50:
        b.add("on a").add(bg_words).add("background", background)
    return b.done()


def nouns_only(caption: GroundedCaption) -> GroundedCaption:
    """The caption with only its category words, "things" and "background" grounded (its colour and texture
    words keep no mask): the words ICE's vote reads."""
    from toyworld.world import COLOURS, TEXTURES

    attributes = set(COLOURS) | set(TEXTURES)
    return GroundedCaption(list(caption.words),
                           [None if w in attributes else m for w, m in zip(caption.words, caption.masks, strict=True)])


# ----------------------------------------------------------------------------------------------------------------
# a batch as token ids and per-token targets


@dataclass
class GroundingTargets:
    ids: torch.Tensor  # [B, 77] token ids
    masks: dict[int, torch.Tensor]  # side -> [B, 77, side²] soft target (the mask's coverage of each cell)
    weights: torch.Tensor  # [B, 77]: 1 / (sub-tokens of its word) for grounded tokens, else 0

    def to(self, device) -> GroundingTargets:
        return GroundingTargets(self.ids.to(device), {s: m.to(device) for s, m in self.masks.items()},
                                self.weights.to(device))


def _token_ids(tokenizer, word: str) -> list[int]:
    return tokenizer(word, add_special_tokens=False).input_ids


def encode_captions(tokenizer, captions: list[GroundedCaption], max_length: int = 77,
                    sides: tuple[int, ...] = GROUNDED_SIDES) -> GroundingTargets:
    """Token ids laid out as the tokenizer lays out the whole text (BOS, the words' BPE tokens, EOS padding), each
    grounded token with its word's mask pooled to every side in `sides`."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = torch.full((len(captions), max_length), eos, dtype=torch.long)
    weights = torch.zeros(len(captions), max_length)
    masks = {s: torch.zeros(len(captions), max_length, s * s) for s in sides}
    for i, cap in enumerate(captions):
        row, pos = [bos], []
        for word, mask in zip(cap.words, cap.masks, strict=True):
            sub = _token_ids(tokenizer, word)
            if mask is not None and mask.any():
                pos.append((len(row), len(sub), mask))
            row.extend(sub)
        row = row[: max_length - 1] + [eos]
        ids[i, : len(row)] = torch.tensor(row)
        for start, n, mask in pos:
            if start + n >= max_length:
                continue
            m = torch.from_numpy(mask.astype(np.float32))[None, None]
            for s in sides:
                pooled = F.adaptive_avg_pool2d(m, s).flatten()
                masks[s][i, start : start + n] = pooled
            weights[i, start : start + n] = 1.0 / n
    return GroundingTargets(ids, masks, weights)


# ----------------------------------------------------------------------------------------------------------------
# recording cross-attention with gradients


class _RecordingCrossAttn(AttnProcessor):
    """diffusers' explicit attention path, keeping every cross-attention layer's probabilities [B, heads, Q, K]."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        batch, queries, _ = hidden_states.shape
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        self.store.append(probs.view(batch, attn.heads, queries, -1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class CrossAttentionRecorder:
    """Installs the recording processor on every cross-attention layer (`attn2`) of a UNet; `take()` returns and
    clears what the last forward recorded, grouped by side."""

    def __init__(self, unet):
        self.store: list[torch.Tensor] = []
        processors = dict(unet.attn_processors)
        for name in processors:
            if name.endswith("attn2.processor"):
                processors[name] = _RecordingCrossAttn(self.store)
        unet.set_attn_processor(processors)

    def take(self) -> dict[int, list[torch.Tensor]]:
        out: dict[int, list[torch.Tensor]] = {}
        for p in self.store:
            out.setdefault(int(round(p.shape[2] ** 0.5)), []).append(p)
        self.store.clear()
        return out


class default_attention:
    """Within it, a UNet whose cross-attention is being recorded runs diffusers' own processors again (the
    binding figure swaps in its own capture and must not feed the training recorder)."""

    def __init__(self, unet):
        self.unet = unet

    def __enter__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.saved = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(AttnProcessor2_0())
        return self

    def __exit__(self, *exc):
        self.unet.set_attn_processor(self.saved)
        return False


def grounding_losses(recorded: dict[int, list[torch.Tensor]], targets: GroundingTargets, eps: float = 1e-6,
                     layer_mean: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """(L_token summed over supervised layers (`layer_mean`: averaged over them), L_pixel summed over supervised
    resolutions, share per side).

    For layer probabilities P [B, h, Q, K] and a grounded token k with target M [Q]:
    act = Σ_q P·M / Σ_q P per head; L_token = Σ_k w_k (1 − mean_h act)² / Σ_k w_k.
    L_pixel: the map averaged over heads and the layers of a resolution, divided by its maximum over space, against
    M with binary cross-entropy over the grounded tokens' cells."""
    w = targets.weights
    total_w = w.sum().clamp_min(eps)
    l_token = torch.zeros((), device=w.device)
    l_pixel = torch.zeros((), device=w.device)
    shares = {}
    for side, layers in recorded.items():
        if side not in targets.masks:
            continue
        m = targets.masks[side]  # [B, K, Q]
        acts = []
        for p in layers:
            inside = torch.einsum("bhqk,bkq->bhk", p, m)
            act = inside / p.sum(2).clamp_min(eps)
            act = act.mean(1)  # heads
            acts.append(act)
            l_token = l_token + ((1 - act) ** 2 * w).sum() / total_w
        shares[side] = (torch.stack(acts).mean(0) * w).sum().detach() / total_w
        avg = torch.stack([p.mean(1) for p in layers]).mean(0).transpose(1, 2)  # [B, K, Q]
        norm = (avg / avg.amax(2, keepdim=True).clamp_min(eps)).clamp(eps, 1 - eps)
        bce = F.binary_cross_entropy(norm, (m > 0.5).float(), reduction="none").mean(2)
        l_pixel = l_pixel + (bce * (w > 0)).sum() / (w > 0).sum().clamp_min(1)
    if layer_mean:
        l_token = l_token / max(1, sum(len(v) for k, v in recorded.items() if k in targets.masks))
    return l_token, l_pixel, shares


# ----------------------------------------------------------------------------------------------------------------
# the binding figure


def _distinct_categories(n: int, scene_of) -> list[Scene]:
    out, k = [], 0
    while len(out) < n:
        s = scene_of(k)
        k += 1
        cats = [o.category for o in s.objects]
        if len(cats) >= 2 and len(set(cats)) == len(cats):
            out.append(s)
    return out


def binding_scenes(n: int) -> list[Scene]:
    """Held-out test scenes with 2–3 objects of distinct categories (the figure's scenes in toy-eval)."""
    from toyworld.world import held_out_scene

    return _distinct_categories(n, held_out_scene)


def binding_scenes_train(n: int) -> list[Scene]:
    """Training scenes of the same kind, shown whole (what the training run watches; never test scenes)."""
    from toyworld.world import make_scene

    return _distinct_categories(n, lambda k: make_scene(7_500_000 + k, augment=False))


@torch.no_grad()
def binding_share(pipe, scenes: list[Scene], timestep: int, sides: tuple[int, ...] = GROUNDED_SIDES) -> dict:
    """Share of a noun's cross-attention mass, over all object pixels, that lies on its own object, for ICE's vote
    prompt "<category> things background" (one UNet pass on the clean latent at `timestep`, heads and the layers of
    a side averaged), per side; and chance (the object's share of the object area: what a foreground map gets)."""
    from services.common.images import image_to_tensor
    from services.localizer.attention import capture_attention, encode_image, encode_prompt
    from services.localizer.segmentor import word_token_positions

    sums = {s: 0.0 for s in sides}
    chance, n = 0.0, 0
    for scene in scenes:
        latent = encode_image(pipe, image_to_tensor(scene.image))
        everything = _union(scene.objects)
        for o in scene.objects:
            words = [o.category, "things", "background"]
            states, _ = encode_prompt(pipe, " ".join(words))
            maps = capture_attention(pipe, latent, states, timestep)
            positions = word_token_positions(pipe.tokenizer, words)[0]
            for s in sides:
                a = maps.cross_attention[s][:, positions].sum(1)  # [s²]
                own = F.adaptive_avg_pool2d(torch.from_numpy(o.mask.astype(np.float32))[None, None], s).flatten()
                all_ = F.adaptive_avg_pool2d(torch.from_numpy(everything.astype(np.float32))[None, None], s).flatten()
                sums[s] += float((a * own).sum() / (a * all_).sum().clamp_min(1e-12))
            chance += o.area / everything.sum()
            n += 1
    out = {f"{s}x{s}": round(sums[s] / max(n, 1), 4) for s in sides}
    out.update({"chance": round(float(chance) / max(n, 1), 4), "scenes": len(scenes), "objects": n,
                "prompt": "<category> things background", "timestep": timestep})
    return out
