"""The quality benchmark's peer baselines: Break-A-Scene and Textual Inversion per mask (docs/quality.md#the-baselines).

Benchmark-only trainers: the production learner has no baseline mode, and these never run behind gRPC. They are
built from the learner's own modules (model loading and the training target from `services.learner.trainer`,
the class images from `class_images`, the masked diffusion loss and the mask-to-grid resize from `losses`, the 16×16
cross-attention capture from `attention`, the token rows from `tokens`, generation from `generate`), so that
what differs between a baseline and ICE in the benchmark is the method, not the plumbing: the same training
square, the same masks, the same class images, the same sampler and seeds.

Break-A-Scene, as its public training script does it:
- one new token per object, starting at the object's word (its first BPE token);
- two phases: `token_steps` training the new token rows only (learning rate 5e-4), then `joint_steps` training
  the tokens, the whole UNet and the whole text encoder (2e-6) with a new AdamW;
- union sampling: each step draws k ~ U{1..N} and then k distinct objects; the prompt names their tokens
  ("a photo of <&2> and <&0>") and the masked diffusion loss uses the union of their masks;
- the cross-attention loss: for each token of the prompt, the mean squared difference between its mask at the
  attention resolution and its attention map divided by the map's maximum, summed over the prompt's tokens,
  weight λ = 1e-2; the maps are the mean over every head of the down- and up-block layers at 16×16;
- prior preservation with class images (weight 1), uniform timesteps, no offset noise, a random flip.
One deliberate difference: the attention is the instance sample's alone (the published script's reshape also
averages the class image's maps into it, which reads as unintended).

Textual Inversion per mask: one token per object from its word, one object per step with a random template of
the learner's (`trainer.TEMPLATES`), the masked diffusion loss alone (no prior, no attention loss, no UNet).
"""

from __future__ import annotations

import gc
import random
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from services.common.bundle import MODEL_BUILD_LOCK
from services.common.images import image_to_tensor
from services.learner import class_images as C
from services.learner import generate as G
from services.learner import losses as L
from services.learner.attention import install_capture
from services.learner.tokens import CONCEPT, ConceptTokens, TokenSpec
from services.learner.trainer import (
    ADAM,
    MAX_GRAD_NORM,
    TEMPLATES,
    Concept,
    components_pipeline,
    encode_instance,
    load_components,
    training_target,
)

BREAK_A_SCENE, TEXTUAL_INVERSION = "break_a_scene", "textual_inversion"
METHODS = (BREAK_A_SCENE, TEXTUAL_INVERSION)


@dataclass(frozen=True)
class BaselineSchedule:
    """Steps and weights; the defaults are Break-A-Scene's published ones (400 + 400 steps, 100 class images)."""

    token_steps: int = 400  # Break-A-Scene's first phase; all of Textual Inversion
    joint_steps: int = 400  # Break-A-Scene's second phase (tokens + UNet + text encoder); Textual Inversion: none
    token_learning_rate: float = 5e-4
    joint_learning_rate: float = 2e-6
    lambda_attention: float = 1e-2
    train_text_encoder: bool = True  # the published second phase trains the whole text encoder too
    num_class_images: int = 100
    class_prompt: str = "a photo at the beach"
    prior_loss_weight: float = 1.0

    @property
    def total_steps(self) -> int:
        return self.token_steps + self.joint_steps

    def for_method(self, method: str) -> BaselineSchedule:
        """Textual Inversion has no second phase, no prior preservation and no attention loss."""
        if method == TEXTUAL_INVERSION:
            return replace(self, joint_steps=0, lambda_attention=0.0, num_class_images=0, prior_loss_weight=0.0)
        return self


@dataclass
class BaselineSpec:
    method: str
    image: Image.Image  # RGB on the training square, as the learner's `LearningSpec.image`
    concepts: list[Concept]  # masks on the training square; the noun is where the token starts
    schedule: BaselineSchedule = field(default_factory=BaselineSchedule)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown baseline {self.method!r}; known: {', '.join(METHODS)}")
        if not self.concepts:
            raise ValueError("at least one concept is required")
        self.schedule = self.schedule.for_method(self.method)


# -- the pieces of Break-A-Scene's step, each testable on its own -----------------------------------------------


def union_subset(rng: random.Random, n: int) -> list[int]:
    """Union sampling: k ~ U{1..n}, then k distinct objects in random order (the order the prompt names them)."""
    k = rng.randrange(1, n + 1)
    return rng.sample(range(n), k)


def union_prompt(tokens: list[str], subset: list[int]) -> str:
    return "a photo of " + " and ".join(tokens[i] for i in subset)


def union_mask(masks: torch.Tensor, subset: list[int]) -> torch.Tensor:
    """[N, 1, H, W] masks -> [1, 1, H, W]: the pixelwise maximum (union) of the subset's masks."""
    return masks[subset].amax(dim=0, keepdim=True)


def max_normalised_attention_loss(attention: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Σ_j mean((M_j − A_j / max A_j)²), before the λ weight.

    attention: [k, s, s] each prompt token's cross-attention map; masks: [k, 1, H, W] the objects' masks in the
    same order, resized to s×s by the learner's `mask_to_grid` (nearest, as published; max-pooled for a mask
    too thin to survive it).
    """
    grid = L.mask_to_grid(masks, attention.shape[-1]).float()
    peak = attention.flatten(1).amax(dim=1).clamp_min(torch.finfo(attention.dtype).tiny)
    normalised = attention.float() / peak[:, None, None]
    return ((grid - normalised) ** 2).mean(dim=(1, 2)).sum()


# -- the trainer -------------------------------------------------------------------------------------------------


@dataclass
class StepLosses:
    reconstruction: float
    prior: float = 0.0
    attention: float = 0.0


class BaselineTrainer:
    """One baseline run: `run()` trains; `images()` then renders prompts with the trained models."""

    def __init__(self, bundle, spec: BaselineSpec, *, device: str = "cpu", class_images_dir: Path | None = None,
                 class_image_steps: int = 50):
        self.bundle = bundle
        self.spec = spec
        self.schedule = spec.schedule
        self.device = device
        self.class_images_dir = Path(class_images_dir) if class_images_dir else None
        self.class_image_steps = class_image_steps
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda")
                         else nullcontext())
        self.losses: list[StepLosses] = []

    @property
    def tokens(self) -> list[str]:
        """The learned token of each concept, in the spec's order."""
        return [s.token for s in self.token_rows.specs]

    def prepare(self) -> None:
        spec, s, dev = self.spec, self.schedule, self.device
        self.generator = torch.Generator("cpu").manual_seed(spec.seed)
        self.rng = random.Random(spec.seed)
        self.tokenizer, self.text_encoder, self.unet, self.vae, self.noise_scheduler = load_components(
            self.bundle, dev)
        self.prior = s.num_class_images > 0 and s.prior_loss_weight > 0
        if self.prior:
            if self.class_images_dir is None:
                raise ValueError("prior preservation needs a class_images_dir")
            # the learner's class images: the very files a learning job with this prompt and count uses
            plan = C.plan(self.bundle, s.class_prompt, C.used_count(s.num_class_images, s.total_steps),
                          self.class_images_dir, self.class_image_steps)
            self.class_paths = C.generate(
                plan, lambda: components_pipeline(self.bundle.root / "diffusion", self.tokenizer, self.text_encoder,
                                                  self.unet, self.vae), autocast=self.autocast)
            self.class_latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            self.class_ids = None
        with MODEL_BUILD_LOCK:  # see services.common.bundle.MODEL_BUILD_LOCK
            specs = [TokenSpec(f"<&{i}>", CONCEPT, i, c.concept_id, c.noun) for i, c in enumerate(spec.concepts)]
            self.token_rows = ConceptTokens(self.tokenizer, self.text_encoder, specs)
            self.token_rows.initialise([c.noun or None for c in spec.concepts], self.rng)
        self.instance_latents, self.masks, self.scaling = encode_instance(self.vae, spec, dev)
        if self.prior:
            self.class_ids = self.token_rows.input_ids([s.class_prompt], dev)
        self.processors = self.unet.attn_processors  # restored for generation
        self.store = None
        if spec.method == BREAK_A_SCENE and s.lambda_attention > 0:
            self.store = install_capture(self.unet)
            self.store.keep = slice(1, 2) if self.prior else slice(0, 1)  # the instance sample only
        self.params = [self.token_rows.new]
        self.optimizer = torch.optim.AdamW(self.params, lr=s.token_learning_rate, **ADAM)

    def _enter_joint_phase(self) -> None:
        """Break-A-Scene's second phase: the UNet and the text encoder (or only the token rows) join the tokens,
        with a new AdamW at the low learning rate."""
        s = self.schedule
        self.unet.requires_grad_(True)
        if s.train_text_encoder:
            self.text_encoder.requires_grad_(True)
            text = list(self.text_encoder.parameters())  # includes the token rows
        else:
            text = [self.token_rows.new]
        self.params = [*self.unet.parameters(), *text]
        self.optimizer = None
        self.optimizer = torch.optim.AdamW(self.params, lr=s.joint_learning_rate, **ADAM)

    def _class_latent(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self.class_latents:
            img = Image.open(self.class_paths[index]).convert("RGB")
            with torch.no_grad():
                d = self.vae.encode(image_to_tensor(img).to(self.device)).latent_dist
            self.class_latents[index] = (d.mean, d.std)
        return self.class_latents[index]

    def _noisy(self, mean, std):
        """(noisy latents, target, t) with a uniform timestep and plain Gaussian noise, as both baselines train."""
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (1,), generator=self.generator)
        t = t.to(self.device)
        latents = (mean + std * torch.randn(mean.shape, generator=self.generator).to(self.device)) * self.scaling
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        return self.noise_scheduler.add_noise(latents, noise, t), training_target(
            self.noise_scheduler, latents, noise, t), t

    def step(self, step: int) -> StepLosses:
        spec, s = self.spec, self.schedule
        n = len(spec.concepts)
        if spec.method == BREAK_A_SCENE:
            subset = union_subset(self.rng, n)
            prompt = union_prompt(self.tokens, subset)
        else:
            subset = [self.rng.randrange(n)]
            prompt = self.rng.choice(TEMPLATES).format(self.tokens[subset[0]])
        flip = int(self.rng.random() < 0.5)
        ids = self.token_rows.input_ids([prompt], self.device)
        latents, targets, ts = [], [], []
        if self.prior:
            x, y, t = self._noisy(*self._class_latent(step % len(self.class_paths)))
            latents.append(x), targets.append(y), ts.append(t)
            ids = torch.cat([self.class_ids, ids])
        x, y, t = self._noisy(*self.instance_latents[flip])
        latents.append(x), targets.append(y), ts.append(t)
        with self.autocast:
            hidden = self.text_encoder(input_ids=ids)[0]
            pred = self.unet(torch.cat(latents), torch.cat(ts), encoder_hidden_states=hidden).sample
        pred, target = pred.float(), torch.cat(targets)
        masks = self.masks[flip]
        reconstruction = L.masked_reconstruction(pred[-1:], target[-1:], union_mask(masks, subset))
        total = reconstruction
        out = StepLosses(0.0)
        if self.prior:
            prior = F.mse_loss(pred[:1], target[:1])
            total = total + s.prior_loss_weight * prior
            out.prior = float(prior.detach())
        if self.store is not None:
            maps = self.store.average()[0]  # [side, side, 77]
            positions = self.token_rows.positions(ids[-1], [self.tokens[i] for i in subset])
            attention = maps[..., positions].permute(2, 0, 1)  # [k, side, side]
            loss = max_normalised_attention_loss(attention, masks[subset])
            self.store.clear()
            total = total + s.lambda_attention * loss
            out.attention = float(loss.detach())
        total.backward()
        if self.store is not None:
            self.store.clear()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out.reconstruction = float(reconstruction.detach())
        return out

    def run(self) -> BaselineTrainer:
        self.prepare()
        for step in range(self.schedule.total_steps):
            if step == self.schedule.token_steps:
                self._enter_joint_phase()
            self.losses.append(self.step(step))
        self.optimizer = None
        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        for p in self.params:
            p.grad = None
        self.unet.set_attn_processor(self.processors)  # the fused processors back: generation captures nothing
        self.store = None
        return self

    # -- generation with the trained models --------------------------------------------------------------------

    def pipeline(self):
        """The bundle's pipeline over the trained models with the learner's sampler (DPM-Solver multistep)."""
        from diffusers import DPMSolverMultistepScheduler

        pipe = components_pipeline(self.bundle.root / "diffusion", self.tokenizer, self.text_encoder, self.unet,
                                   self.vae)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        return pipe

    def images(self, prompts: list[G.Prompt], num_images: int, seed: int
               ) -> Iterator[tuple[G.Prompt, int, int, Image.Image]]:
        """As the learner's Generate: the bundle's sampler defaults, image n of every prompt with seed + n."""
        d = G.generation_defaults(self.bundle)
        with self.autocast:
            yield from G.generate(self.pipeline(), prompts, num_images, seed, d.num_inference_steps,
                                  d.guidance_scale)

    def object_prompts(self) -> list[G.Prompt]:
        """The object-level prompt with the concept's one token, in ICE's template: "a photo of <&i>"."""
        return [G.Prompt(f"a photo of {t}", c.concept_id) for t, c in zip(self.tokens, self.spec.concepts,
                                                                         strict=True)]

    def composition_prompt(self) -> str:
        return "a photo of " + " and ".join(self.tokens)

    def release(self) -> None:
        for name in ("optimizer", "token_rows", "text_encoder", "unet", "vae", "tokenizer", "noise_scheduler",
                     "store", "instance_latents", "masks", "class_latents", "params", "processors"):
            setattr(self, name, None)
        gc.collect()
