"""ICE stage 2, structured concept learning (docs/method.md#stage-2-learning), as a resumable training loop.
No gRPC.

Phases, in global step order (docs/method.md#schedule):
1. object level (`phase1_steps`): `<*i>` and `<&i>` train on prompts "template(<*i><&i>)", with the masked
   reconstruction, prior preservation, the phase-1 triplet and the attention loss;
2. intrinsic (`phase2_steps`): the intrinsic tokens start as copies of `<*i>` and train on
   "template(<&i><#i><%i><$i>)" with the intrinsic triplets; `<*i>`/`<&i>` are frozen;
3. refinement (`refinement_steps`): the UNet (every weight, or a LoRA) and the intrinsic tokens train with a new
   AdamW at the UNet learning rate, same prompts and losses as phase 2.

Each step samples one concept, a template, a flip, noise with offset noise and timesteps from
p(t) ∝ 1 − t_dist·cos(πt/T), all from the job's own seeded generators. A checkpoint holds every tensor and
RNG state the next step depends on, so a resumed job computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from services.common.bundle import MODEL_BUILD_LOCK
from services.common.errors import BundleError, InvalidArgument
from services.common.images import image_to_tensor
from services.learner import checkpoints
from services.learner import class_images as C
from services.learner import losses as L
from services.learner.attention import AttentionStore, install_capture
from services.learner.tokens import (
    CONCEPT,
    DEFAULT_ANCHORS,
    GENERIC_WORD,
    INSTANCE,
    INTRINSIC,
    ConceptTokens,
    plan_tokens,
)

log = logging.getLogger("ice.learner.trainer")

PREPARING, OBJECT_LEVEL, INTRINSIC_PHASE, REFINEMENT, FINISHING = (
    "preparing", "object_level", "intrinsic", "refinement", "finishing")
ABLATIONS = ("none", "mask_only", "without_stage_two", "without_text_init")
DELTAS = ("full", "lora")

# Textual-Inversion-style templates the published code draws from uniformly (docs/method.md#prompts).
TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
ADAM = dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class Schedule:
    """Steps and loss weights; the defaults are the published ones (docs/method.md#schedule)."""

    phase1_steps: int = 400
    phase2_steps: int = 400
    refinement_steps: int = 300
    embedding_learning_rate: float = 5e-4
    unet_learning_rate: float = 2e-6
    checkpoint_every: int = 100
    num_class_images: int = 1000
    class_prompt: str = "a photo at the beach"
    prior_loss_weight: float = 1.0
    lambda_attention: float = 1e-5
    noise_offset: float = 0.1
    t_dist: float = 0.5
    reg_weight: float = 1.0
    reg_intrinsic_weight: float = 5e-2
    pos_neg_margin: float = 5e-2

    @property
    def total_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps + self.refinement_steps

    def for_ablation(self, ablation: str) -> Schedule:
        return replace(self, phase2_steps=0, refinement_steps=0) if ablation == "without_stage_two" else self


@dataclass
class Concept:
    concept_id: str
    noun: str
    mask: np.ndarray  # bool [S, S] on the training square


@dataclass
class LearningSpec:
    """One job's inputs, already on the training square (see `services.learner.server` for the decoding)."""

    image: Image.Image  # RGB, S x S
    concepts: list[Concept]
    anchors: list[str] = field(default_factory=lambda: list(DEFAULT_ANCHORS))
    schedule: Schedule = field(default_factory=Schedule)
    ablation: str = "none"
    refinement: str = "full"
    lora_rank: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.ablation not in ABLATIONS:
            raise InvalidArgument(f"unknown ablation {self.ablation!r}", field="ablation")
        if self.refinement not in DELTAS:
            raise InvalidArgument(f"unknown refinement delta {self.refinement!r}", field="refinement_delta")
        if not self.concepts:
            raise InvalidArgument("at least one concept is required", field="concepts")
        self.schedule = self.schedule.for_ablation(self.ablation)
        if self.ablation == "without_stage_two":
            self.anchors = []

    @property
    def init_words(self) -> list[str | None]:
        """Where `<*i>`/`<&i>` start: the noun, a generic word (mask only) or None = a random row."""
        if self.ablation == "mask_only":
            return [GENERIC_WORD] * len(self.concepts)
        if self.ablation == "without_text_init":
            return [None] * len(self.concepts)
        return [c.noun for c in self.concepts]

    @property
    def object_words(self) -> list[str]:
        """The triplet anchor a_i of each concept."""
        return [GENERIC_WORD if self.ablation == "mask_only" else c.noun for c in self.concepts]


@dataclass
class StepInfo:
    phase: str
    step: int  # steps completed, over all phases
    total: int
    losses: dict[str, float]


@dataclass
class TrainResult:
    tokens: list  # TokenSpec
    embeddings: dict[str, torch.Tensor]  # token -> [D] float32
    unet_delta: dict[str, torch.Tensor] | None  # name -> trained − base (full refinement)
    lora: dict[str, torch.Tensor] | None  # diffusers-format LoRA state dict (LoRA refinement)


class Interrupted(Exception):
    """Raised by a step callback to stop now and keep the job resumable (a checkpoint is written)."""


def phase_of(step: int, schedule: Schedule) -> str:
    if step < schedule.phase1_steps:
        return OBJECT_LEVEL
    if step < schedule.phase1_steps + schedule.phase2_steps:
        return INTRINSIC_PHASE
    return REFINEMENT


# ----------------------------------------------------------------------------------------------------------------


def components_pipeline(root: Path, tokenizer, text_encoder, unet, vae):
    """A StableDiffusionPipeline over models that are loaded already, with the bundle's own sampler: what
    `bundle.load_diffusion` would build, without a second copy of the weights."""
    import diffusers

    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    scheduler_class = getattr(diffusers, index["scheduler"][1])
    # a scheduler is configuration only: built from its JSON, no weights are read
    scheduler = scheduler_class.from_config(scheduler_class.load_config(str(root), subfolder="scheduler",
                                                                        local_files_only=True))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_components(bundle, device: str):
    """A private copy of the tokenizer, text encoder, UNet, VAE and training scheduler (fp32 master weights)."""
    root = bundle.root / "diffusion"
    with MODEL_BUILD_LOCK:  # see services.common.bundle.MODEL_BUILD_LOCK
        return _load_components(root, device)


def _load_components(root: Path, device: str):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True,
                                                     use_safetensors=True, dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", local_files_only=True,
                                                    use_safetensors=True, torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(str(root), subfolder="vae", local_files_only=True, use_safetensors=True,
                                            torch_dtype=torch.float32)
        scheduler = DDPMScheduler.from_pretrained(str(root), subfolder="scheduler", local_files_only=True)
    except Exception as e:  # noqa: BLE001 - diffusers/transformers raise many kinds
        raise BundleError(f"cannot load the diffusion components: {e}", "diffusion") from None
    for m in (text_encoder, unet, vae):
        m.requires_grad_(False)
        m.eval()
        m.to(device)
    return tokenizer, text_encoder, unet, vae, scheduler


def encode_instance(vae, spec: LearningSpec, device) -> tuple[list, list[torch.Tensor], float]:
    """The source image's VAE posterior (mean, std) and the concepts' masks [C, 1, H, W], each unflipped and
    flipped (the horizontal-flip augmentation), and the latent scaling factor."""
    image = image_to_tensor(spec.image).to(device)
    masks = torch.from_numpy(np.stack([c.mask for c in spec.concepts])).float().unsqueeze(1).to(device)
    with torch.no_grad():
        dists = [vae.encode(x).latent_dist for x in (image, image.flip(-1))]
    return [(d.mean, d.std) for d in dists], [masks, masks.flip(-1)], float(vae.config.scaling_factor)


class Trainer:
    """One learning job. `run()` trains (resuming from `work_dir/checkpoints` when present) and returns the
    learned tokens; `on_step` is called after every step and may raise `Interrupted` or any error to stop."""

    def __init__(
        self,
        bundle,
        spec: LearningSpec,
        work_dir: Path,
        *,
        device: str = "cpu",
        class_images_dir: Path | None = None,
        class_image_steps: int = 50,
        on_step: Callable[[StepInfo], None] | None = None,
        on_phase: Callable[[str], None] | None = None,
        gradient_checkpointing: bool = True,
        adam_8bit: bool = False,
        should_stop: Callable[[], None] | None = None,
        on_class_images: Callable[[C.ClassImagePlan, float | None], None] | None = None,
    ):
        self.bundle = bundle
        self.spec = spec
        self.schedule = spec.schedule
        self.work_dir = Path(work_dir)
        self.checkpoint_dir = self.work_dir / "checkpoints"
        self.device = device
        self.class_images_dir = Path(class_images_dir) if class_images_dir else self.work_dir / "class-images"
        self.class_image_steps = class_image_steps
        self.on_step = on_step or (lambda info: None)
        self.on_phase = on_phase or (lambda phase: None)
        # called while preparing (between stages, before every class-image batch and after each of its denoising
        # steps); raises to stop there (a cancellation, a shutdown), as `on_step` may after a step
        self.should_stop = should_stop or (lambda: None)
        self.on_class_images = on_class_images or (lambda plan, seconds_per_image: None)
        self.gradient_checkpointing = gradient_checkpointing  # full-UNet refinement recomputes activations
        self.adam_8bit = adam_8bit  # refinement with bitsandbytes' 8-bit AdamW (CUDA only)
        if adam_8bit and not str(device).startswith("cuda"):
            raise ValueError("8-bit AdamW (bitsandbytes) needs a CUDA device")
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda")
                         else nullcontext())
        self.phase: str | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.unet_params: dict[str, torch.nn.Parameter] = {}
        self.last_losses: dict[str, float] = {}

    # -- preparation --------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        spec, s = self.spec, self.schedule
        self.generator = torch.Generator("cpu").manual_seed(spec.seed)
        self.rng = random.Random(spec.seed)
        self.should_stop()
        self.tokenizer, self.text_encoder, self.unet, self.vae, self.noise_scheduler = load_components(
            self.bundle, self.device)
        self.should_stop()
        self.prior = s.num_class_images > 0
        if self.prior:  # generated with the models just loaded, before any learned token or capture exists
            plan = self.class_image_plan()
            self.on_class_images(plan, None)
            self.class_paths = C.generate(
                plan, lambda: components_pipeline(self.bundle.root / "diffusion", self.tokenizer, self.text_encoder,
                                                  self.unet, self.vae),
                autocast=self.autocast, should_stop=self.should_stop,
                on_progress=lambda ready, count, seconds: self.on_class_images(plan, seconds))
            self.class_latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            self.should_stop()
        with MODEL_BUILD_LOCK:  # see services.common.bundle.MODEL_BUILD_LOCK
            concepts = [(c.concept_id, c.noun) for c in spec.concepts]
            self.tokens = ConceptTokens(self.tokenizer, self.text_encoder, plan_tokens(concepts, spec.anchors))
            self.tokens.initialise(spec.init_words, self.rng)
        self.row_mask = torch.zeros(len(self.tokens.specs), dtype=torch.bool, device=self.device)
        self.tokens.new.register_hook(lambda g: g * self.row_mask.unsqueeze(1).to(g.dtype))

        dev = self.device
        self.instance_latents, self.masks, self.scaling = encode_instance(self.vae, spec, dev)

        if self.prior:
            self.class_ids = self.tokens.input_ids([s.class_prompt], dev)

        self.weights = L.timestep_weights(self.noise_scheduler.config.num_train_timesteps, s.t_dist).float()
        self.store: AttentionStore | None = install_capture(self.unet) if s.lambda_attention > 0 else None
        if self.store is not None:
            self.store.keep = slice(1, 2) if self.prior else slice(0, 1)  # the instance sample only

        # E(·) of the fixed words under the initial text encoder, and the phase-2 margins
        words = sorted(set(spec.anchors) | set(spec.object_words))
        with torch.no_grad():
            encoded = self.tokens.encode(words, dev)
        self.word_e = dict(zip(words, encoded, strict=True))
        self.margins = L.intrinsic_margins(self.word_e, spec.anchors)

    def class_image_plan(self) -> C.ClassImagePlan:
        """The class images this job uses (only those: see `class_images.used_count`) and where they come from."""
        s = self.schedule
        return C.plan(self.bundle, s.class_prompt, C.used_count(s.num_class_images, s.total_steps),
                      self.class_images_dir, self.class_image_steps)

    def _class_latent(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self.class_latents:
            img = Image.open(self.class_paths[index]).convert("RGB")
            with torch.no_grad():
                d = self.vae.encode(image_to_tensor(img).to(self.device)).latent_dist
            self.class_latents[index] = (d.mean, d.std)
        return self.class_latents[index]

    # -- phases -------------------------------------------------------------------------------------------------

    def _rows(self, *roles: str) -> torch.Tensor:
        mask = torch.zeros(len(self.tokens.specs), dtype=torch.bool, device=self.device)
        for role in roles:
            mask[self.tokens.rows(role)] = True
        return mask

    def _embedding_optimizer(self, params, lr) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, **ADAM)

    def _refinement_optimizer(self, params, lr) -> torch.optim.Optimizer:
        """AdamW over the UNet and the token rows. On CUDA the fused kernel (no full-size temporaries, unlike the
        default multi-tensor one), or bitsandbytes' 8-bit AdamW (the published setting: two bytes of state per
        weight instead of eight); on a CPU, the plain per-tensor loop."""
        if self.adam_8bit:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, **ADAM)
        if str(self.device).startswith("cuda"):
            return torch.optim.AdamW(params, lr=lr, fused=True, **ADAM)
        return torch.optim.AdamW(params, lr=lr, **ADAM)

    def enter_phase(self, phase: str, resuming: bool = False) -> None:
        s = self.schedule
        if phase == OBJECT_LEVEL:
            self.row_mask = self._rows(INSTANCE, CONCEPT)
        else:
            self.row_mask = self._rows(INTRINSIC)
            if not resuming and (phase == INTRINSIC_PHASE or s.phase2_steps == 0):
                self.tokens.copy_instance_to_intrinsic()
        if phase in (OBJECT_LEVEL, INTRINSIC_PHASE) and self.optimizer is None:
            # one AdamW over the new rows for both phases: its state carries over into phase 2
            self.optimizer = self._embedding_optimizer([self.tokens.new], s.embedding_learning_rate)
        if phase == REFINEMENT:
            self._setup_refinement()
            params = [self.tokens.new, *self.unet_params.values()]
            self.optimizer = None  # the embedding phases' state goes before the UNet's is made
            self.optimizer = self._refinement_optimizer(params, s.unet_learning_rate)
        self.snapshot = self.tokens.new.detach().clone()
        self.phase = phase

    def _setup_refinement(self) -> None:
        if self.spec.refinement == "lora":
            from peft import LoraConfig

            config = LoraConfig(r=self.spec.lora_rank, lora_alpha=self.spec.lora_rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"])
            with torch.random.fork_rng(devices=[]), MODEL_BUILD_LOCK:  # peft draws its init from the global RNG
                torch.manual_seed(self.spec.seed)
                self.unet.add_adapter(config)
            self.unet.to(self.device)
        else:
            self.unet.requires_grad_(True)
            if self.gradient_checkpointing:  # activations recomputed in the backward pass, block by block
                self.unet.enable_gradient_checkpointing()
        self.unet_params = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}

    # -- one step -----------------------------------------------------------------------------------------------

    def _noisy(self, mean, std, t):
        """(noisy latents, the UNet's training target): the noise for an ε-prediction model, the velocity
        α_t·ε − σ_t·x₀ for a v-prediction one (SD-2.x 768 and zero-terminal-SNR models)."""
        latents = (mean + std * torch.randn(mean.shape, generator=self.generator).to(self.device)) * self.scaling
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        if self.schedule.noise_offset:
            noise = noise + self.schedule.noise_offset * torch.randn(
                (*latents.shape[:2], 1, 1), generator=self.generator).to(self.device)
        return self.noise_scheduler.add_noise(latents, noise, t), training_target(
            self.noise_scheduler, latents, noise, t)

    def _timestep(self) -> torch.Tensor:
        return torch.multinomial(self.weights, 1, replacement=True, generator=self.generator).to(self.device)

    def step(self, step: int) -> dict[str, float]:
        s, spec, tokens = self.schedule, self.spec, self.tokens
        i = self.rng.randrange(len(spec.concepts))
        template = self.rng.choice(TEMPLATES)
        flip = int(torch.rand((), generator=self.generator).item() < 0.5)
        if self.phase == OBJECT_LEVEL:
            prompt_tokens = [tokens.token(INSTANCE, i), tokens.token(CONCEPT, i)]
            attend = [tokens.token(CONCEPT, i), tokens.token(INSTANCE, i)]
        else:
            intrinsic = [t.token for t in tokens.intrinsic_tokens(i)]
            prompt_tokens = attend = [tokens.token(CONCEPT, i), *intrinsic]
        ids = tokens.input_ids([template.format("".join(prompt_tokens))], self.device)

        batch_latents, batch_target, batch_t = [], [], []
        if self.prior:
            t = self._timestep()
            x, n = self._noisy(*self._class_latent(step % s.num_class_images), t)
            batch_latents.append(x), batch_target.append(n), batch_t.append(t)
            ids = torch.cat([self.class_ids, ids])
        t = self._timestep()
        x, n = self._noisy(*self.instance_latents[flip], t)
        batch_latents.append(x), batch_target.append(n), batch_t.append(t)
        mask = self.masks[flip][i : i + 1]

        with self.autocast:
            hidden = self.text_encoder(input_ids=ids)[0]
            pred = self.unet(torch.cat(batch_latents), torch.cat(batch_t), encoder_hidden_states=hidden).sample
        pred, target = pred.float(), torch.cat(batch_target)

        terms: dict[str, torch.Tensor] = {"reconstruction": L.masked_reconstruction(pred[-1:], target[-1:], mask)}
        if self.prior:
            terms["prior"] = F.mse_loss(pred[:1], target[:1])
        with self.autocast:
            if self.phase == OBJECT_LEVEL:
                e = tokens.encode([tokens.token(CONCEPT, i), tokens.token(INSTANCE, i)], self.device)
                triplet = L.phase1_triplet(self.word_e[spec.object_words[i]], e[0], e[1], s.pos_neg_margin)
                terms["triplet"] = s.reg_weight * triplet
            else:
                intrinsic_specs = tokens.intrinsic_tokens(i)
                e = tokens.encode([tokens.token(CONCEPT, i), *[t.token for t in intrinsic_specs]], self.device)
                triplet = L.phase2_triplets(
                    {a: self.word_e[a] for a in spec.anchors}, self.word_e[spec.object_words[i]],
                    spec.object_words[i], e[0], {t.attribute: e[k + 1] for k, t in enumerate(intrinsic_specs)},
                    self.margins)
                terms["triplet"] = s.reg_intrinsic_weight * triplet
        if self.store is not None:
            maps = self.store.average()  # [1, side, side, 77]
            positions = tokens.positions(ids[-1], attend)
            attention = maps[..., positions].mean(dim=-1)
            terms["attention"] = s.lambda_attention * L.attention_loss(attention, mask)
            self.store.clear()
        total = terms["reconstruction"] + s.prior_loss_weight * terms.get("prior", 0.0)
        total = total + terms["triplet"] + terms.get("attention", 0.0)

        total.backward()
        if self.store is not None:  # a checkpointed backward pass re-runs the capture: drop what it recorded
            self.store.clear()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # frozen rows back to their phase-start values
            frozen = ~self.row_mask
            self.tokens.new[frozen] = self.snapshot[frozen]
        losses = {k: float(v.detach()) for k, v in terms.items()}
        losses["total"] = float(total.detach())
        return losses

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        opt_tensors, opt_meta = checkpoints.optimizer_to_flat(self.optimizer)
        tensors = {"new": self.tokens.new.detach(), "snapshot": self.snapshot,
                   "rng.torch": self.generator.get_state(), **opt_tensors}
        tensors.update({f"unet.{n}": p.detach() for n, p in self.unet_params.items()})
        state = {"phase": self.phase, "python_rng": checkpoints.python_rng_to_json(self.rng.getstate()),
                 "optimizer": opt_meta, "losses": self.last_losses}
        checkpoints.save(self.checkpoint_dir, step, tensors, state)

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.enter_phase(state["phase"], resuming=True)
        with torch.no_grad():
            self.tokens.new.copy_(tensors["new"].to(self.device))
            self.snapshot = tensors["snapshot"].to(self.device)
            for n, p in self.unet_params.items():
                p.copy_(tensors[f"unet.{n}"].to(self.device))
        checkpoints.optimizer_from_flat(self.optimizer, {k: v.to(self.device) for k, v in tensors.items()},
                                        state["optimizer"])
        self.generator.set_state(tensors["rng.torch"])
        self.rng.setstate(checkpoints.python_rng_from_json(state["python_rng"]))
        self.last_losses = dict(state.get("losses") or {})

    def _checkpoint_due(self, done: int) -> bool:
        s = self.schedule
        boundary = done in (s.phase1_steps, s.phase1_steps + s.phase2_steps) and done < s.total_steps
        return boundary or (s.checkpoint_every > 0 and done % s.checkpoint_every == 0 and done < s.total_steps)

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self, resume: bool = True) -> TrainResult:
        self.on_phase(PREPARING)
        self.prepare()
        start = 0
        found = checkpoints.load_latest(self.checkpoint_dir) if resume else None
        if found is not None:
            start, tensors, state = found
            self._restore(tensors, state)
            del found, tensors  # the parameters and the optimizer hold what they need; the rest is a copy
            log.info("resuming at step %d (%s)", start, self.phase)
            self.on_phase(self.phase)
        total = self.schedule.total_steps
        for step in range(start, total):
            phase = phase_of(step, self.schedule)
            if phase != self.phase:
                self.enter_phase(phase)
                self.on_phase(phase)
            started = time.perf_counter()
            self.last_losses = self.step(step)
            done = step + 1
            info = StepInfo(phase, done, total, dict(self.last_losses))
            info.losses["step_seconds"] = time.perf_counter() - started
            try:
                self.on_step(info)
            except Interrupted:
                if done < total:
                    self.save_checkpoint(done)
                raise
            if self._checkpoint_due(done):
                self.save_checkpoint(done)
        self.on_phase(FINISHING)
        return self.result()

    def result(self) -> TrainResult:
        # training is over: the optimizer state (for a full UNet, twice its size) and the gradients go first
        self.optimizer = None
        for p in self.unet_params.values():
            p.grad = None
        if self.tokens is not None:
            self.tokens.new.grad = None
        gc.collect()
        delta = lora = None
        if self.schedule.refinement_steps > 0 and self.spec.refinement == "full":
            delta = unet_delta(self.bundle, self.unet_params)
        elif self.schedule.refinement_steps > 0:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            lora = {k: v.detach().float().cpu().contiguous() for k, v in
                    convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet)).items()}
        return TrainResult(list(self.tokens.specs), self.tokens.embeddings(), delta, lora)

    def release(self) -> None:
        """Drop every model, tensor and optimizer of the job (the token hook refers back to the trainer, so
        without this only the cyclic garbage collector would free them)."""
        for name in ("optimizer", "tokens", "text_encoder", "unet", "vae", "tokenizer", "noise_scheduler", "store",
                     "instance_latents", "masks", "class_latents", "snapshot", "row_mask", "weights", "word_e"):
            setattr(self, name, None)
        self.unet_params = {}


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, by the scheduler's `prediction_type` (docs/method.md#a-training-step).
    The published code trains ε with SD-2.1-base; a v-prediction checkpoint must be trained on the velocity or
    every step pulls it off its own objective."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise BundleError(f"unsupported prediction_type {kind!r}", "diffusion/scheduler/scheduler_config.json")


def unet_delta(bundle, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """trained − base for every weight in `params`, on the CPU in float32, one tensor at a time: each base weight
    is read from the bundle's safetensors only when its difference is taken (peak: the deltas + one weight)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in sorted((bundle.root / "diffusion" / "unet").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in set(params).intersection(f.keys()):
                p = params[key].detach()
                base = f.get_tensor(key).to(p.device, torch.float32)
                out[key] = (p.float() - base).cpu().contiguous()
                del base
    missing = set(params) - set(out)
    if missing:
        raise BundleError(f"{len(missing)} UNet weights not found, e.g. {sorted(missing)[0]}", "diffusion/unet")
    return out


def base_unet_tensors(bundle, names) -> dict[str, torch.Tensor]:
    """The bundle's own UNet weights for `names`, read straight from its safetensors (one file or shards): the
    refinement delta is taken against them, and building a second model for that would only cost time."""
    from safetensors import safe_open

    wanted, out = set(names), {}
    for path in sorted((bundle.root / "diffusion" / "unet").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in wanted.intersection(f.keys()):
                out[key] = f.get_tensor(key)
    missing = wanted - set(out)
    if missing:
        raise BundleError(f"{len(missing)} UNet weights not found, e.g. {sorted(missing)[0]}", "diffusion/unet")
    return out


def spec_to_json(spec: LearningSpec) -> dict:
    """Everything of a spec except the pixels (stored beside it as PNG files)."""
    return {"concepts": [{"concept_id": c.concept_id, "noun": c.noun} for c in spec.concepts],
            "anchors": spec.anchors, "schedule": asdict(spec.schedule), "ablation": spec.ablation,
            "refinement": spec.refinement, "lora_rank": spec.lora_rank, "seed": spec.seed}
