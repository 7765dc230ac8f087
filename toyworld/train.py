"""Train the ToyWorld models and assemble the bundle: `make toy-train` (python -m toyworld.train all).

Stages, each resumable from its own checkpoints (kill it at any time; the next run continues from the last
checkpoint and computes the same steps: every batch and every noise draw is a function of (seed, step)):

    vae        AutoencoderKL on scenes (L1 + MSE + a small KL), then its latent scaling factor
    clip       open_clip CLIP, contrastive on (scene, caption) pairs
    words      the same CLIP continued with a word loss: each image ranks single words (its objects' categories,
               colours, textures) above distractor words, as the retriever embeds words alone
    retriever  the same CLIP continued on category twins and single objects on black, with attribute prompts and
               a term that keeps the words of one axis apart (the localizer's negative filter compares them)
    dino       ViTModel, DINO self-distillation (student/teacher, centring, sharpening), no labels
    objects    the same DINO continued on object-centred views (two views of one object), still no labels
    diffusion  CLIPTextModel + UNet2DConditionModel, v-prediction with min-SNR weighting, EMA weights
    ground     the diffusion model continued with a token-grounding loss beside the v-prediction loss, so that
               a word's cross-attention lies on the object it names (toyworld/grounding.py)
    bundle     writes the diffusers / open_clip / DINO directories and the vocabulary, runs `ice-bundle
               assemble` (float16), calibrates the localizer's merge threshold and verifies the bundle

Everything runs on CUDA when present, else on the CPU. A stage whose output exists is skipped (--force STAGE
re-runs it). `training.json` beside the bundle records the commit, seeds, steps, device, wall time and final
losses of every stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toyworld import models as M
from toyworld.captions import caption, vocabulary_words
from toyworld.world import IMAGE_SIZE, make_scene

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = ROOT / "build" / "toyworld"
DEFAULT_BUNDLE = ROOT / "toyworld" / "bundle"
STAGES = ("vae", "clip", "words", "retriever", "dino", "objects", "diffusion", "ground", "bundle")
ALL = tuple(st for st in STAGES if st != "objects")  # "all": the committed bundle's stages (objects: not in it)


@dataclass(frozen=True)
class Plan:
    """Steps and batch sizes per stage (the committed bundle's values are the defaults)."""

    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 16
    clip_steps: int = 1000
    clip_word_steps: int = 400
    clip_batch: int = 128
    retriever_steps: int = 1500
    retriever_lr: float = 2e-4
    retriever_margin: float = 0.3
    retriever_separation: float = 1.0
    dino_steps: int = 900
    dino_batch: int = 64
    dino_object_steps: int = 1200
    dino_object_lr: float = 3e-4
    dino_colour_swap: float = 0.5
    diffusion_steps: int = 5000
    diffusion_batch: int = 32
    latent_pool: int = 40_000
    ground_steps: int = 5000
    ground_batch: int = 16
    ground_lr: float = 1e-4
    ground_token_weight: float = 1.0
    ground_pixel_weight: float = 0.0
    ground_vote_share: float = 0.5
    ground_probe_every: int = 500
    ground_max_t: int = 1000  # the grounding loss on the samples noised below this timestep only
    ground_token_table: int = 0  # 1: train the text encoder's token table too (sparse), 0: keep it
    ground_attributes: int = 0  # 1: colour and texture words grounded too; 0: category words, things, background
    ground_layer_mean: int = 1  # 1: L_token averaged over the grounded layers; 0: summed
    ground_clip: float = 0.0  # gradient-norm clip (0: none)
    ground_weights: str = "model"  # what the stage writes: "ema" (decay 0.999) or "model" (the trained weights)
    checkpoint_every: int = 100


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fused(dev: str) -> dict:
    """AdamW's fused kernel (CPU and CUDA): a step over ten million parameters is several times faster than the
    per-tensor loop. Used by the stages added after the first bundle; the others keep their recorded optimizer."""
    return {"fused": True}


def say(msg: str) -> None:
    print(f"[toy-train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# data


def scene_batch(seed: int, step: int, batch: int, salt: int) -> tuple[torch.Tensor, list]:
    """A batch of training scenes for (seed, step): images in [-1, 1] [B, 3, 64, 64] and the scenes."""
    base = (seed * 1_000_003 + salt * 7_919 + step * batch) % 9_000_000
    scenes = [make_scene(base + k) for k in range(batch)]
    x = np.stack([np.asarray(s.image, dtype=np.float32) for s in scenes]) / 127.5 - 1.0
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), scenes


def generator(seed: int, step: int, salt: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed * 1_000_003 + salt * 7_919 + step)


# ----------------------------------------------------------------------------------------------------------------
# resumable loop


class Checkpointer:
    """Model (and optional EMA) + optimizer state in safetensors, the rest in JSON (services.learner.checkpoints)."""

    def __init__(self, folder: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                 more_optimizers: dict[str, torch.optim.Optimizer] | None = None):
        self.folder, self.modules, self.optimizer = folder, modules, optimizer
        self.more = dict(more_optimizers or {})

    def save(self, step: int, state: dict) -> None:
        from services.learner import checkpoints

        tensors, meta = checkpoints.optimizer_to_flat(self.optimizer)
        for name, opt in self.more.items():
            more_tensors, state[f"optimizer_{name}"] = checkpoints.optimizer_to_flat(opt, prefix=f"optim_{name}")
            tensors.update(more_tensors)
        for name, module in self.modules.items():
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        checkpoints.save(self.folder, step, tensors, {**state, "optimizer": meta})

    def load(self) -> tuple[int, dict]:
        from services.learner import checkpoints

        found = checkpoints.load_latest(self.folder)
        if found is None:
            return 0, {}
        step, tensors, state = found
        for name, module in self.modules.items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        checkpoints.optimizer_from_flat(self.optimizer, tensors, state["optimizer"])
        for name, opt in self.more.items():
            checkpoints.optimizer_from_flat(opt, tensors, state[f"optimizer_{name}"], prefix=f"optim_{name}")
        return step, state


def run_loop(name: str, steps: int, step_fn: Callable[[int], dict], ckpt: Checkpointer, every: int,
             record: dict) -> dict:
    start, state = ckpt.load()
    if start:
        say(f"{name}: resuming at step {start}/{steps}")
    elapsed = float(state.get("elapsed", 0.0))
    losses: dict[str, float] = dict(state.get("losses") or {})
    smooth: dict[str, float] = dict(state.get("smooth") or {})
    t_last = time.perf_counter()
    for step in range(start, steps):
        out = step_fn(step)
        losses = {k: float(v) for k, v in out.items()}
        smooth = {k: 0.98 * smooth.get(k, v) + 0.02 * v for k, v in losses.items()}
        done = step + 1
        if done % 20 == 0 or done == steps:
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            rate = done - start
            eta = (steps - done) * elapsed / max(done, 1)
            say(f"{name} {done}/{steps} " + " ".join(f"{k}={v:.4f}" for k, v in smooth.items())
                + f" ({elapsed / 60:.1f} min, eta {eta / 60:.1f} min)")
            del rate
        if done % every == 0 or done == steps:
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            ckpt.save(done, {"elapsed": elapsed, "losses": losses, "smooth": smooth})
    record.update({"steps": steps, "wall_seconds": round(elapsed, 1),
                   "final_losses": {k: round(v, 5) for k, v in smooth.items()}})
    return record


# ----------------------------------------------------------------------------------------------------------------
# stage 1: the VAE


def train_vae(work: Path, plan: Plan, dev: str) -> dict:
    torch.manual_seed(plan.seed + 1)
    vae = M.build_vae().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-4, weight_decay=0.0)
    ckpt = Checkpointer(work / "checkpoints" / "vae", {"vae": vae}, opt)

    def step_fn(step: int) -> dict:
        x, _ = scene_batch(plan.seed, step, plan.vae_batch, salt=1)
        x = x.to(dev)
        lr = 5e-4 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / plan.vae_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator(plan.seed, step, 1)).to(dev)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
        return {"l1": l1.item(), "kl": kl.item(), "psnr": psnr}

    record = run_loop("vae", plan.vae_steps, step_fn, ckpt, plan.checkpoint_every, {"batch": plan.vae_batch})
    vae.eval()
    with torch.no_grad():  # latent scale: 1 / std of the encoder's means over fresh scenes (SD's convention)
        x, _ = scene_batch(plan.seed + 99, 0, 256, salt=9)
        means = vae.encode(x.to(dev)).latent_dist.mean
        scale = 1.0 / float(means.std())
        rec = vae.decode(means).sample.clamp(-1, 1)
        psnr = 10 * math.log10(4.0 / float(F.mse_loss(rec, x.to(dev))))
    vae.register_to_config(scaling_factor=round(scale, 5))
    vae.save_pretrained(work / "vae", safe_serialization=True)
    record.update({"scaling_factor": round(scale, 5), "heldout_psnr_db": round(psnr, 2),
                   "parameters": M.n_params(vae)})
    return record


# ----------------------------------------------------------------------------------------------------------------
# stage 2: CLIP


def clip_contrastive(model, tok, pix: torch.Tensor, texts: list[str]):
    """(normalised image embeddings, logits, symmetric InfoNCE loss) of a batch of (image, caption) pairs.
    Captions can repeat within a batch ("ball"): identical texts are all positives of each other."""
    img = F.normalize(model.encode_image(pix), dim=-1)
    txt = F.normalize(model.encode_text(tok(texts).to(pix.device)), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T
    same = torch.tensor([[a == b for b in texts] for a in texts], device=pix.device, dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target.T * logits.log_softmax(0)).sum(0).mean())
    return img, logits, loss


def train_clip(work: Path, plan: Plan, dev: str) -> dict:
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(plan.seed + 2)
    model = M.build_clip().to(dev)
    tok = SimpleTokenizer(context_length=M.CLIP_CONFIG["text_cfg"]["context_length"])
    mean = torch.tensor(M.CLIP_CONFIG["preprocess_cfg"]["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(M.CLIP_CONFIG["preprocess_cfg"]["std"], device=dev).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    ckpt = Checkpointer(work / "checkpoints" / "clip", {"clip": model}, opt)

    def step_fn(step: int) -> dict:
        x, scenes = scene_batch(plan.seed, step, plan.clip_batch, salt=2)
        rng = np.random.default_rng([plan.seed, step, 2])
        texts = [caption(s, rng) for s in scenes]
        lr = 1e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / plan.clip_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        _, logits, loss = clip_contrastive(model, tok, ((x.to(dev) + 1) / 2 - mean) / std, texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        acc = float((logits.argmax(1) == torch.arange(len(texts), device=dev)).float().mean())
        return {"loss": loss.item(), "acc": acc}

    record = run_loop("clip", plan.clip_steps, step_fn, ckpt, plan.checkpoint_every, {"batch": plan.clip_batch})
    from safetensors.torch import save_file

    (work / "clip").mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(work / "clip" / "open_clip_model.safetensors"), metadata={"format": "pt"})
    (work / "clip" / "open_clip_config.json").write_text(json.dumps(M.CLIP_CONFIG, indent=2) + "\n")
    record["parameters"] = M.n_params(model)
    return record


def train_clip_words(work: Path, plan: Plan, dev: str) -> dict:
    """CLIP continued with a word loss. The retriever embeds every vocabulary word *alone* (SpLiCE), but captions
    rarely are one word, so after contrastive training alone a category word sits barely nearer its objects than
    the other categories do, and untrained distractor words (never in a caption) land anywhere. Here each image
    also ranks single words of one axis (the 6 categories, 7 colours or 3 textures) against 128 distractor words
    drawn from the vocabulary, in the retriever's centred geometry: the words of its visible objects are its
    positives, everything else negatives. The scene-caption contrastive loss continues beside it so that the rest
    of the embedding is kept."""
    from open_clip.tokenizer import SimpleTokenizer
    from safetensors.torch import load_file, save_file

    from toyworld.vocab import vocabulary_rows
    from toyworld.world import CATEGORIES, COLOURS, TEXTURES

    torch.manual_seed(plan.seed + 5)
    model = M.build_clip().to(dev)
    model.load_state_dict(load_file(str(work / "clip" / "open_clip_model.safetensors")))
    tok = SimpleTokenizer(context_length=M.CLIP_CONFIG["text_cfg"]["context_length"])
    mean = torch.tensor(M.CLIP_CONFIG["preprocess_cfg"]["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(M.CLIP_CONFIG["preprocess_cfg"]["std"], device=dev).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.98))
    ckpt = Checkpointer(work / "checkpoints" / "words", {"clip": model}, opt)
    world_words = list(vocabulary_words())
    distractors = [w for w, _, _ in vocabulary_rows() if w not in set(world_words)]
    axes = (("category", list(CATEGORIES)), ("colour", list(COLOURS)), ("texture", list(TEXTURES)))

    def step_fn(step: int) -> dict:
        x, scenes = scene_batch(plan.seed, step, plan.clip_batch, salt=5)
        rng = np.random.default_rng([plan.seed, step, 5])
        texts = [caption(s, rng) for s in scenes]
        lr = 3e-4 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / plan.clip_word_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        img, _, contrastive = clip_contrastive(model, tok, ((x.to(dev) + 1) / 2 - mean) / std, texts)
        scale = model.logit_scale.exp()
        # in the retriever's geometry (SpLiCE): image embeddings minus the image mean, word embeddings minus the
        # mean over the vocabulary, both re-normalised; the batch's images and the step's words stand for both means
        negatives = [distractors[i] for i in rng.choice(len(distractors), 128, replace=False)]
        words = F.normalize(model.encode_text(tok(world_words + negatives).to(dev)), dim=-1)
        words = F.normalize(words - words.mean(0, keepdim=True), dim=-1)
        img_c = F.normalize(img - img.mean(0, keepdim=True), dim=-1)
        word_loss, right = 0.0, []
        for axis, values in axes:
            columns = [world_words.index(v) for v in values] + list(range(len(world_words), len(world_words) + 128))
            wl = scale * img_c @ words[columns].T
            present = torch.zeros_like(wl)
            for i, s in enumerate(scenes):
                for o in s.objects:
                    present[i, values.index(getattr(o, axis))] = 1.0
            has = present.sum(1) > 0  # a scene whose objects are all blacked out has no positive
            t = present[has] / present[has].sum(1, keepdim=True)
            word_loss = word_loss - (t * wl[has].log_softmax(1)).sum(1).mean() / len(axes)
            right.append(float(present[has].gather(1, wl[has].argmax(1, keepdim=True)).mean()))
        loss = contrastive + word_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return {"contrastive": contrastive.item(), "words": word_loss.item(), "category_top1": right[0],
                "colour_top1": right[1], "texture_top1": right[2]}

    record = run_loop("words", plan.clip_word_steps, step_fn, ckpt, plan.checkpoint_every,
                      {"batch": plan.clip_batch, "distractors_per_step": 128})
    (work / "clip-words").mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(work / "clip-words" / "open_clip_model.safetensors"), metadata={"format": "pt"})
    (work / "clip-words" / "open_clip_config.json").write_text(json.dumps(M.CLIP_CONFIG, indent=2) + "\n")
    return record


def retriever_batch(seed: int, step: int, batch: int, salt: int = 7) -> tuple[torch.Tensor, list, list[str]]:
    """(images in [-1, 1], scenes, captions) of one retriever step: half training scenes as the other CLIP stages
    see them, a quarter category twins (pairs that differ only in their objects' categories: colour and texture
    cannot tell them apart) and a quarter single objects on black (ICE's later rounds), captioned as usual."""
    from toyworld.world import category_twins, isolated

    rng = np.random.default_rng([seed, step, salt])
    n_plain, n_pairs = batch // 2, batch // 8
    base = (seed * 1_000_003 + salt * 7_919 + step * batch) % 9_000_000
    scenes = [make_scene(base + k) for k in range(n_plain)]
    for j in range(n_pairs):
        scenes.extend(category_twins(base + n_plain + j, rng))
    while len(scenes) < batch:
        whole = make_scene(base + len(scenes) + 10_000, augment=False)
        scenes.append(isolated(whole, int(rng.integers(len(whole.objects)))))
    texts = []
    for k, sc in enumerate(scenes):
        if n_plain <= k < n_plain + 2 * n_pairs and (k - n_plain) % 2 == 1:
            texts.append(caption(sc, np.random.default_rng([seed, step, salt, k - 1])))  # the twin's draw
        else:
            texts.append(caption(sc, np.random.default_rng([seed, step, salt, k])))
    x = np.stack([np.asarray(sc.image, dtype=np.float32) for sc in scenes]) / 127.5 - 1.0
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), scenes, texts


def train_retriever(work: Path, plan: Plan, dev: str) -> dict:
    """The words stage's CLIP continued so that the retriever can tell categories apart:
    - the scene-caption contrastive loss on batches with category twins and single objects on black
      (`retriever_batch`);
    - the word loss of the words stage (each image ranks single words of one axis against distractors in the
      retriever's centred geometry);
    - an attribute-prompt loss: each single object ranks "a photo of a <category>" (in one of the learner's
      templates), "a <colour> color" and "a <texture> texture" among the values of that axis;
    - a text-side term that keeps the words of one axis apart in the plain text space (each word alone,
      L2-normalised), where the localizer's negative filter compares the previous round's noun with the next
      candidates and drops those at cosine ≥ 0.85: Σ relu(cos − margin)² over the pairs of an axis."""
    from open_clip.tokenizer import SimpleTokenizer
    from safetensors.torch import load_file, save_file

    from services.common.assemble import encode_text_trimmed
    from toyworld.captions import LEARNER_TEMPLATES
    from toyworld.vocab import vocabulary_rows
    from toyworld.world import CATEGORIES, COLOURS, TEXTURES

    torch.manual_seed(plan.seed + 7)
    model = M.build_clip().to(dev)
    model.load_state_dict(load_file(str(work / "clip-words" / "open_clip_model.safetensors")))
    model.float()
    tok = SimpleTokenizer(context_length=M.CLIP_CONFIG["text_cfg"]["context_length"])
    mean = torch.tensor(M.CLIP_CONFIG["preprocess_cfg"]["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(M.CLIP_CONFIG["preprocess_cfg"]["std"], device=dev).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.retriever_lr, weight_decay=0.1, betas=(0.9, 0.98),
                            **fused(dev))
    ckpt = Checkpointer(work / "checkpoints" / "retriever", {"clip": model}, opt)
    world_words = list(vocabulary_words())
    distractors = [w for w, _, _ in vocabulary_rows() if w not in set(world_words)]
    axes = (("category", list(CATEGORIES)), ("colour", list(COLOURS)), ("texture", list(TEXTURES)))
    axis_words = [w for _, values in axes for w in values]

    def step_fn(step: int) -> dict:
        x, scenes, texts = retriever_batch(plan.seed, step, plan.clip_batch)
        rng = np.random.default_rng([plan.seed, step, 8])
        lr = plan.retriever_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / plan.retriever_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        img, _, contrastive = clip_contrastive(model, tok, ((x.to(dev) + 1) / 2 - mean) / std, texts)
        scale = model.logit_scale.exp()
        negatives = [distractors[i] for i in rng.choice(len(distractors), 128, replace=False)]
        words = F.normalize(encode_text_trimmed(model, tok(world_words + negatives).to(dev)), dim=-1)
        centred = F.normalize(words - words.mean(0, keepdim=True), dim=-1)
        img_c = F.normalize(img - img.mean(0, keepdim=True), dim=-1)
        word_loss, prompt_loss, right = 0.0, 0.0, {}
        single = [i for i, sc in enumerate(scenes) if len(sc.objects) == 1]
        template = str(rng.choice(LEARNER_TEMPLATES))
        for axis, values in axes:
            columns = [world_words.index(v) for v in values] + list(range(len(world_words), len(world_words) + 128))
            wl = scale * img_c @ centred[columns].T
            present = torch.zeros_like(wl)
            for i, sc in enumerate(scenes):
                for o in sc.objects:
                    present[i, values.index(getattr(o, axis))] = 1.0
            has = present.sum(1) > 0
            t = present[has] / present[has].sum(1, keepdim=True)
            word_loss = word_loss - (t * wl[has].log_softmax(1)).sum(1).mean() / len(axes)
            right[f"{axis}_words_top1"] = float(present[has].gather(1, wl[has].argmax(1, keepdim=True)).mean())
            form = {"category": template, "colour": "a {} color", "texture": "a {} texture"}[axis]
            prompts = F.normalize(model.encode_text(tok([form.format(v) for v in values]).to(dev)), dim=-1)
            pl = scale * img[single] @ prompts.T
            truth = torch.tensor([values.index(getattr(scenes[i].objects[0], axis)) for i in single], device=dev)
            prompt_loss = prompt_loss + F.cross_entropy(pl, truth) / len(axes)
            right[f"{axis}_prompt_top1"] = float((pl.argmax(1) == truth).float().mean())
        plain = words[[world_words.index(w) for w in axis_words]]
        separation, start, worst = 0.0, 0, 0.0
        for _, values in axes:
            block = plain[start : start + len(values)]
            start += len(values)
            cos = block @ block.T
            off = cos[~torch.eye(len(values), dtype=torch.bool, device=dev)]
            separation = separation + F.relu(off - plan.retriever_margin).pow(2).mean()
            worst = max(worst, off.detach().max().item())
        loss = contrastive + word_loss + prompt_loss + plan.retriever_separation * separation
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return {"contrastive": contrastive.item(), "words": word_loss.item(), "prompts": prompt_loss.item(),
                "separation": float(separation), "max_word_cos": worst, **right}

    record = run_loop("retriever", plan.retriever_steps, step_fn, ckpt, plan.checkpoint_every,
                      {"batch": plan.clip_batch, "lr": plan.retriever_lr, "margin": plan.retriever_margin,
                       "separation_weight": plan.retriever_separation})
    (work / "clip-retriever").mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(work / "clip-retriever" / "open_clip_model.safetensors"), metadata={"format": "pt"})
    (work / "clip-retriever" / "open_clip_config.json").write_text(json.dumps(M.CLIP_CONFIG, indent=2) + "\n")
    return record


# ----------------------------------------------------------------------------------------------------------------
# stage 3: DINO


def _dino_views(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random resized crop (scale 0.35-1, aspect 3/4-4/3) back to 64 px and a random flip per image; no colour
    jitter, so the features keep colour (an intrinsic attribute here)."""
    b = x.shape[0]
    scale = 0.35 + 0.65 * torch.rand(b, generator=g)
    ratio = torch.exp((torch.rand(b, generator=g) - 0.5) * math.log(16 / 9))
    w = torch.sqrt(scale * ratio).clamp(max=1.0)
    h = torch.sqrt(scale / ratio).clamp(max=1.0)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class DinoHead(torch.nn.Module):
    def __init__(self, dim: int, hidden: int = 512, bottleneck: int = 128, out: int = 1024):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.GELU(), torch.nn.Linear(hidden, bottleneck))
        self.last = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(bottleneck, out, bias=False))

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


def _object_views(x: torch.Tensor, masks: torch.Tensor, g: torch.Generator, colour_swap: float = 0.0) -> torch.Tensor:
    """One view per image of one object: the square around its mask's box, enlarged 1.15–1.6× and shifted within
    the room that leaves (the object stays whole), back to 64 px, flipped at random; half of the views have
    everything outside the mask black (how the evaluator shows a concept's source region), the other half keep
    the scene around it."""
    b = x.shape[0]
    ys = masks.any(2).float()
    xs = masks.any(1).float()
    idx = torch.arange(masks.shape[1], dtype=torch.float32)
    y0, y1 = (ys * idx).masked_fill(ys == 0, 1e9).amin(1), (ys * idx).amax(1) + 1
    x0, x1 = (xs * idx).masked_fill(xs == 0, 1e9).amin(1), (xs * idx).amax(1) + 1
    side = torch.maximum(y1 - y0, x1 - x0) * (1.15 + 0.45 * torch.rand(b, generator=g)) + 2
    # shifted by at most the room the object leaves, so that it stays whole inside the view
    cx = (x0 + x1) / 2 + (torch.rand(b, generator=g) - 0.5) * (side - (x1 - x0) - 2).clamp_min(0)
    cy = (y0 + y1) / 2 + (torch.rand(b, generator=g) - 0.5) * (side - (y1 - y0) - 2).clamp_min(0)
    size = masks.shape[1]
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = side / size * flip, cx / size * 2 - 1
    theta[:, 1, 1], theta[:, 1, 2] = side / size, cy / size * 2 - 1
    black = (torch.rand(b, generator=g) < 0.5).view(b, 1, 1, 1)
    src = torch.where(black.to(x.device), x * masks[:, None].to(x.device, x.dtype), x)
    if colour_swap:
        # half of the views get their colour channels permuted: colour alone no longer tells the two views of one
        # object apart from the others, so shape has to (the features keep colour: the other half of the views
        # and the crops' surroundings still carry it)
        perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
        pick = perms[torch.randint(0, 6, (b,), generator=g)]
        swap = (torch.rand(b, generator=g) < colour_swap).view(b, 1, 1, 1).to(x.device)
        src = torch.where(swap, torch.gather(src, 1, pick.to(x.device)[:, :, None, None].expand_as(src)), src)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def object_batch(seed: int, step: int, batch: int, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1] [B, 3, 64, 64], the mask of one object of each [B, 64, 64]) of training scenes."""
    rng = np.random.default_rng([seed, step, salt])
    x, scenes = scene_batch(seed, step, batch, salt=salt)
    masks = []
    for sc in scenes:
        objs = sc.objects or sc.removed
        masks.append(objs[int(rng.integers(len(objs)))].mask if sc.objects else np.ones((IMAGE_SIZE, IMAGE_SIZE), bool))
    return (x + 1) / 2, torch.from_numpy(np.stack(masks))


def train_dino_objects(work: Path, plan: Plan, dev: str) -> dict:
    """The DINO stage's teacher continued on object-centred views (`_object_views`), self-supervised: two views of
    one object (different scale, position, surroundings; half on black, half of them with their colour channels
    permuted) must be each other's nearest among the batch's other objects (InfoNCE through a projection head,
    as SimCLR). On two crops of a whole scene, the colours of its objects already tell one scene from another,
    so the first DINO never needed shapes (1-NN category 0.30 on single objects); continuing its self-distillation
    on object views left that figure unchanged (0.30 and 0.30 after 400 steps, with and without the colour
    permutation: the fresh head's targets stayed uniform), so this stage contrasts the views directly."""
    from transformers import ViTModel

    torch.manual_seed(plan.seed + 10)
    backbone = ViTModel.from_pretrained(work / "dino", add_pooling_layer=False).to(dev)
    width = M.DINO_CONFIG["hidden_size"]
    head = torch.nn.Sequential(torch.nn.Linear(width, 512), torch.nn.GELU(), torch.nn.Linear(512, 128)).to(dev)
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=plan.dino_object_lr, weight_decay=0.05, **fused(dev))
    ckpt = Checkpointer(work / "checkpoints" / "dino-objects", {"backbone": backbone, "head": head}, opt)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)

    def step_fn(step: int) -> dict:
        g = generator(plan.seed, step, 10)
        x, masks = object_batch(plan.seed, step, plan.dino_batch, salt=10)
        views = [(_object_views(x.to(dev), masks, g, plan.dino_colour_swap) - mean) / std for _ in range(2)]
        rate = plan.dino_object_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / plan.dino_object_steps))
        for grp in opt.param_groups:
            grp["lr"] = rate
        z = F.normalize(head(backbone(pixel_values=torch.cat(views)).last_hidden_state[:, 0]), dim=-1)
        b = plan.dino_batch
        logits = z @ z.T / 0.1
        logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=dev), -1e9)
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(dev)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        return {"loss": loss.item(), "top1": float((logits.argmax(1) == target).float().mean())}

    record = run_loop("dino-objects", plan.dino_object_steps, step_fn, ckpt, plan.checkpoint_every,
                      {"batch": plan.dino_batch, "objective": "InfoNCE between two object-centred views (t = 0.1)",
                       "colour_swap": plan.dino_colour_swap})
    from transformers import ViTImageProcessor

    out = work / "dino-objects"
    backbone.save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    record["parameters"] = M.n_params(backbone)
    return record


def train_dino(work: Path, plan: Plan, dev: str) -> dict:
    import copy

    torch.manual_seed(plan.seed + 3)
    student = M.build_dino().to(dev)
    head = DinoHead(M.DINO_CONFIG["hidden_size"]).to(dev)
    teacher, teacher_head = copy.deepcopy(student), copy.deepcopy(head)
    for p in [*teacher.parameters(), *teacher_head.parameters()]:
        p.requires_grad_(False)
    center = torch.zeros(1, 1024, device=dev)
    params = [*student.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.04)

    class State(torch.nn.Module):  # the centre travels with the checkpoint
        def __init__(self):
            super().__init__()
            self.register_buffer("center", center)

    st = State()
    ckpt = Checkpointer(work / "checkpoints" / "dino",
                        {"student": student, "head": head, "teacher": teacher, "teacher_head": teacher_head,
                         "state": st}, opt)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)

    def step_fn(step: int) -> dict:
        x, _ = scene_batch(plan.seed, step, plan.dino_batch, salt=3)
        x = ((x + 1) / 2).to(dev)
        g = generator(plan.seed, step, 3)
        views = [(_dino_views(x, g) - mean) / std for _ in range(2)]
        progress = step / plan.dino_steps
        lr = 5e-4 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * progress))
        for grp in opt.param_groups:
            grp["lr"] = lr
        t_temp = 0.04 + (0.07 - 0.04) * min(1.0, step / (0.3 * plan.dino_steps))
        with torch.no_grad():
            t_out = [teacher_head(teacher(v).last_hidden_state[:, 0]) for v in views]
            t_prob = [F.softmax((o - st.center) / t_temp, dim=-1) for o in t_out]
        s_out = [head(student(v).last_hidden_state[:, 0]) for v in views]
        loss = 0.5 * sum(-(t_prob[1 - i] * F.log_softmax(s_out[i] / 0.1, dim=-1)).sum(-1).mean() for i in range(2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        with torch.no_grad():
            m = 1 - (1 - 0.996) * (math.cos(math.pi * progress) + 1) / 2
            for pt, ps in zip([*teacher.parameters(), *teacher_head.parameters()], params, strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            st.center.mul_(0.9).add_(torch.cat(t_out).mean(0, keepdim=True), alpha=0.1)
            entropy = float(-(t_prob[0] * t_prob[0].clamp_min(1e-12).log()).sum(-1).mean())
        return {"loss": loss.item(), "teacher_entropy": entropy}

    record = run_loop("dino", plan.dino_steps, step_fn, ckpt, plan.checkpoint_every, {"batch": plan.dino_batch})
    from transformers import ViTImageProcessor

    teacher.save_pretrained(work / "dino", safe_serialization=True)  # the teacher is the published DINO backbone
    ViTImageProcessor(do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(work / "dino")
    record["parameters"] = M.n_params(teacher)
    return record


# ----------------------------------------------------------------------------------------------------------------
# stage 4: the diffusion model


def latent_pool(work: Path, plan: Plan, dev: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(means, stds, scaling factor) of the VAE posterior of training scenes 0..latent_pool-1 (cached)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    vae = AutoencoderKL.from_pretrained(work / "vae").to(dev).eval()
    path = work / f"latents-{plan.latent_pool}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["mean"], t["std"], float(vae.config.scaling_factor)
    say(f"encoding {plan.latent_pool} training scenes with the VAE")
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, plan.latent_pool, 256):
            n = min(256, plan.latent_pool - start)
            scenes = [make_scene(pool_seed(plan, start + k)) for k in range(n)]
            x = np.stack([np.asarray(s.image, dtype=np.float32) for s in scenes]) / 127.5 - 1.0
            d = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2).to(dev)).latent_dist
            means.append(d.mean.cpu())
            stds.append(d.std.cpu())
    mean, std = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
    save_file({"mean": mean, "std": std}, str(path))
    return mean, std, float(vae.config.scaling_factor)


def pool_seed(plan: Plan, index: int) -> int:
    return 5_000_000 + plan.seed * 100_003 + index


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """min(SNR, γ) / (SNR + 1): the min-SNR-γ weighting for a v-prediction loss (SNR 0 at t = T-1 is fine)."""
    a = alphas_cumprod[t]
    snr = a / (1 - a).clamp_min(1e-8)
    return snr.clamp(max=gamma) / (snr + 1)


def train_diffusion(work: Path, plan: Plan, dev: str) -> dict:
    import copy

    from services.common.tokenizer import build_clip_tokenizer

    means, stds, scale = latent_pool(work, plan, dev)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(plan.seed + 4)
    text_encoder = M.build_text_encoder().to(dev)
    unet = M.build_unet().to(dev)
    ema_te, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    for p in [*ema_te.parameters(), *ema_unet.parameters()]:
        p.requires_grad_(False)
    scheduler = M.build_scheduler()
    alphas = scheduler.alphas_cumprod.to(dev)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=6e-4, weight_decay=1e-2)
    ckpt = Checkpointer(work / "checkpoints" / "diffusion",
                        {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_te},
                        opt)
    n_pool = means.shape[0]

    def step_fn(step: int) -> dict:
        rng = np.random.default_rng([plan.seed, step, 4])
        g = generator(plan.seed, step, 4)
        idx = rng.choice(n_pool, plan.diffusion_batch, replace=False)
        texts = [caption(make_scene(pool_seed(plan, int(i))), rng, empty_share=0.1) for i in idx]
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        m, s = means[idx], stds[idx]
        latents = ((m + s * torch.randn(m.shape, generator=g)) * scale).to(dev)
        noise = torch.randn(latents.shape, generator=g).to(dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g).to(dev)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        lr = 6e-4 * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / plan.diffusion_steps)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        hidden = text_encoder(ids.to(dev))[0]
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (per * min_snr_weight(alphas, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip([*ema_unet.parameters(), *ema_te.parameters()], params, strict=True):
                pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
        return {"loss": loss.item(), "mse": per.mean().item()}

    record = run_loop("diffusion", plan.diffusion_steps, step_fn, ckpt, plan.checkpoint_every,
                      {"batch": plan.diffusion_batch, "latent_pool": plan.latent_pool})
    save_pipeline(work, ema_unet, ema_te, tokenizer, scheduler)
    record.update({"unet_parameters": M.n_params(unet), "text_encoder_parameters": M.n_params(text_encoder),
                   "weights": "EMA (decay 0.999)", "objective": "v-prediction, min-SNR-5 weighting",
                   "caption_dropout": 0.1})
    return record


def train_grounding(work: Path, plan: Plan, dev: str) -> dict:
    """The diffusion stage's model (its EMA weights) continued with the token-grounding loss of
    toyworld/grounding.py beside the same v-prediction loss, on fresh scenes whose masks are known. The stage
    writes a new EMA (decay 0.999) of both models, or with `ground_weights` "model" the trained weights (an EMA
    that started at the ungrounded model lags behind the binding a short run reaches); every
    `ground_probe_every` steps the binding figure of both is measured on training scenes (never test scenes)
    and recorded."""
    import copy

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from services.common.tokenizer import build_clip_tokenizer
    from toyworld import grounding as G

    tokenizer = build_clip_tokenizer()
    source = work / "diffusion"
    vae = AutoencoderKL.from_pretrained(work / "vae", torch_dtype=torch.float32).to(dev).eval()
    unet = UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=torch.float32).to(dev)
    text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder", torch_dtype=torch.float32).to(dev)
    ema_unet, ema_te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    for p in [*ema_te.parameters(), *ema_unet.parameters(), *vae.parameters()]:
        p.requires_grad_(False)
    scheduler = M.build_scheduler()
    alphas = scheduler.alphas_cumprod.to(dev)
    recorder = G.CrossAttentionRecorder(unet)
    # The token table (49,408 × 128, most of the text encoder): AdamW over all of it cost ten times the rest of a
    # step on a CPU, though a batch's captions use a few dozen rows. So it is either frozen (as the diffusion stage
    # left it) or trained with sparse gradients and SparseAdam, which touch only the rows a batch uses.
    table = text_encoder.get_input_embeddings()
    dense = [p for p in [*unet.parameters(), *text_encoder.parameters()] if p is not table.weight]
    ema_dense = [p for p, q in zip([*ema_unet.parameters(), *ema_te.parameters()],
                                   [*unet.parameters(), *text_encoder.parameters()], strict=True) if q is not table.weight]
    opt = torch.optim.AdamW(dense, lr=plan.ground_lr, weight_decay=1e-2, **fused(dev))
    more = {}
    if plan.ground_token_table:
        table.sparse = True
        more["table"] = torch.optim.SparseAdam([table.weight], lr=plan.ground_lr)
    else:
        table.weight.requires_grad_(False)
    params = dense + ([table.weight] if plan.ground_token_table else [])
    ema_params = ema_dense + ([ema_te.get_input_embeddings().weight] if plan.ground_token_table else [])
    ckpt = Checkpointer(work / "checkpoints" / "ground",
                        {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_te},
                        opt, more)
    scale = float(vae.config.scaling_factor)
    monitor = G.binding_scenes_train(24)
    history_path = work / "checkpoints" / "ground" / "binding.json"  # survives a resume, like the checkpoints
    history: dict[str, dict] = json.loads(history_path.read_text()) if history_path.is_file() else {}

    def step_fn(step: int) -> dict:
        rng = np.random.default_rng([plan.seed, step, 6])
        g = generator(plan.seed, step, 6)
        x, scenes = scene_batch(plan.seed, step, plan.ground_batch, salt=6)
        caps = [G.grounded_caption(s, rng, vote_share=plan.ground_vote_share) for s in scenes]
        if not plan.ground_attributes:
            caps = [G.nouns_only(c) for c in caps]
        targets = G.encode_captions(tokenizer, caps).to(dev)
        with torch.no_grad():
            post = vae.encode(x.to(dev)).latent_dist
            latents = (post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)) * scale
        noise = torch.randn(latents.shape, generator=g).to(dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(scenes),), generator=g).to(dev)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        # warm-up, constant, then a cosine to a tenth over the last 40 %
        tail = max(0.0, (step - 0.6 * plan.ground_steps) / (0.4 * plan.ground_steps))
        lr = plan.ground_lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * tail)))
        for o in (opt, *more.values()):
            for grp in o.param_groups:
                grp["lr"] = lr
        hidden = text_encoder(targets.ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        v_loss = (per * min_snr_weight(alphas, t)).mean()
        if plan.ground_max_t < scheduler.config.num_train_timesteps:  # ground only where objects show through
            targets.weights = targets.weights * (t < plan.ground_max_t).float()[:, None]
        l_token, l_pixel, shares = G.grounding_losses(recorder.take(), targets,
                                                      layer_mean=bool(plan.ground_layer_mean))
        loss = v_loss + plan.ground_token_weight * l_token + plan.ground_pixel_weight * l_pixel
        for o in (opt, *more.values()):
            o.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(dense, plan.ground_clip if plan.ground_clip > 0 else float("inf"))
        for o in (opt, *more.values()):
            o.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 0.001)
        out = {"v_loss": v_loss.item(), "token": l_token.item(), "pixel": l_pixel.item(), "grad_norm": float(norm),
               **{f"share{s}": float(v) for s, v in shares.items()}}
        if (step + 1) % plan.ground_probe_every == 0:
            unet.eval()
            with G.default_attention(unet):
                history[str(step + 1)] = {
                    name: G.binding_share(_Pipe(vae, te, u, tokenizer), monitor, timestep=50)
                    for name, te, u in (("model", text_encoder, unet), ("ema", ema_te, ema_unet))}
            unet.train()
            history_path.parent.mkdir(parents=True, exist_ok=True)
            history_path.write_text(json.dumps(history, indent=1) + "\n")
            say(f"ground {step + 1}: binding on training scenes {history[str(step + 1)]}")
        return out

    record = run_loop("ground", plan.ground_steps, step_fn, ckpt, plan.checkpoint_every,
                      {"batch": plan.ground_batch, "lr": plan.ground_lr, "token_weight": plan.ground_token_weight,
                       "pixel_weight": plan.ground_pixel_weight, "vote_share": plan.ground_vote_share,
                       "attribute_words": plan.ground_attributes, "layer_mean": plan.ground_layer_mean,
                       "clip": plan.ground_clip, "max_t": plan.ground_max_t})
    out = work / "diffusion-grounded"
    if plan.ground_weights not in ("ema", "model"):
        raise SystemExit(f"--ground-weights {plan.ground_weights}: ema or model")
    keep = (ema_unet, ema_te) if plan.ground_weights == "ema" else (unet, text_encoder)
    save_pipeline(work, *keep, tokenizer, scheduler, out)
    record.update({"from": "the diffusion stage's EMA weights",
                   "weights": "EMA (decay 0.999)" if plan.ground_weights == "ema" else "the trained weights (no EMA)",
                   "objective": "v-prediction (min-SNR-5) + token grounding (toyworld/grounding.py)",
                   "binding_on_training_scenes": history})
    return record


class _Pipe:
    """What `grounding.binding_share` reads of a pipeline."""

    def __init__(self, vae, text_encoder, unet, tokenizer):
        self.vae, self.text_encoder, self.unet, self.tokenizer = vae, text_encoder, unet, tokenizer


def save_pipeline(work: Path, unet, text_encoder, tokenizer, scheduler, out: Path | None = None) -> Path:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(work / "vae")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = out or work / "diffusion"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# stage 5: the bundle


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mean_image_scenes() -> list:
    """The scenes the retriever's image mean is computed from: 512 training scenes, as MSCOCO is for real photos."""
    return [make_scene(8_000_000 + k) for k in range(512)]


def build_bundle(work: Path, out: Path, plan: Plan, record: dict) -> dict:
    from toyworld import calibrate, vocab

    vocab_tsv = vocab.write_vocabulary(work / "vocab.tsv")
    mean_dir = work / "mean-images"
    if not mean_dir.is_dir():
        mean_dir.mkdir(parents=True)
        for k, scene in enumerate(mean_image_scenes()):
            scene.image.save(mean_dir / f"{k:04d}.png")
    clip = "clip-retriever" if (work / "clip-retriever").is_dir() else "clip-words"
    cmd = [sys.executable, "-m", "services.common.bundle_cli", "assemble", "--out", str(out),
           "--diffusion", str(work / ("diffusion-grounded" if (work / "diffusion-grounded").is_dir() else "diffusion")),
           "--open-clip-config", str(work / clip / "open_clip_config.json"),
           "--open-clip-weights", str(work / clip / "open_clip_model.safetensors"),
           "--dino", str(work / ("dino-objects" if (work / "dino-objects").is_dir() else "dino")),
           "--vocab", str(vocab_tsv), "--image-mean-from", str(mean_dir),
           "--name", "toyworld", "--version", "2", "--kind", "toyworld", "--precision", "float16", "--copy",
           "--force"]
    say("assembling: " + " ".join(cmd[1:]))
    subprocess.run(cmd, cwd=ROOT, check=True)
    recommended = calibrate.calibrate_localizer(out, say)
    record["calibration"] = recommended.pop("_evidence", {})
    calibrate.write_recommended(out, recommended)
    # the prior-preservation class images of its recommended schedule travel with the bundle, so that no learner
    # generates them again (made as a learner would, hashed into the bundle)
    subprocess.run([sys.executable, "-m", "services.common.bundle_cli", "class-images", str(out), "--force"],
                   cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "services.common.bundle_cli", "verify", str(out)], cwd=ROOT, check=True)
    return record


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toyworld.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", nargs="*", default=["all"], help=f"any of {', '.join(STAGES)}, or all")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints and stage outputs")
    p.add_argument("--out", type=Path, default=DEFAULT_BUNDLE, help="where the bundle is written")
    p.add_argument("--force", action="append", default=[], choices=STAGES, help="re-run a finished stage")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    for field_name, value in Plan.__dataclass_fields__.items():
        p.add_argument("--" + field_name.replace("_", "-"), type=type(value.default), default=value.default)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    plan = Plan(**{f: getattr(a, f) for f in Plan.__dataclass_fields__})
    stages = ALL if "all" in a.stages else tuple(a.stages)
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}")
    work: Path = a.work
    work.mkdir(parents=True, exist_ok=True)
    dev = device()
    record_path = work / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update({"commit": git_commit(), "device": dev if dev == "cpu" else torch.cuda.get_device_name(0),
                   "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                   "plan": plan.__dict__})
    outputs = {"vae": work / "vae", "clip": work / "clip" / "open_clip_model.safetensors",
               "words": work / "clip-words" / "open_clip_model.safetensors",
               "retriever": work / "clip-retriever" / "open_clip_model.safetensors", "dino": work / "dino",
               "objects": work / "dino-objects",
               "diffusion": work / "diffusion", "ground": work / "diffusion-grounded",
               "bundle": a.out / "bundle.json"}
    trainers = {"vae": train_vae, "clip": train_clip, "words": train_clip_words, "retriever": train_retriever,
                "objects": train_dino_objects, "dino": train_dino, "diffusion": train_diffusion,
                "ground": train_grounding}
    for stage in stages:
        if outputs[stage].exists() and stage not in a.force:
            say(f"{stage}: done already ({outputs[stage]}); --force {stage} re-runs it")
            continue
        say(f"{stage}: starting on {dev}")
        t0 = time.perf_counter()
        if stage == "bundle":
            record["bundle"] = build_bundle(work, a.out, plan, {})
        else:
            record[stage] = trainers[stage](work, plan, dev)
        record.setdefault(stage, {})["stage_seconds"] = round(time.perf_counter() - t0, 1)
        # stages may run in separate processes at once (e.g. the diffusion model beside CLIP and DINO): merge
        current = json.loads(record_path.read_text()) if record_path.is_file() else {}
        record = {**current, **{k: v for k, v in record.items() if k not in STAGES}, stage: record[stage]}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        say(f"{stage}: finished in {(time.perf_counter() - t0) / 60:.1f} min")
    if "bundle" in stages and (a.out / "bundle.json").is_file():
        (a.out.parent / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
