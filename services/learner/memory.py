"""How much memory a learning job needs, estimated before the job is accepted. No gRPC.

    estimate = weights + max(class images, training) + margin

- **weights**: every parameter of the text encoder, UNet and VAE in float32 (the trainer's master weights),
  counted from the bundle's safetensors headers (exact).
- **training**, per phase the job runs: the optimizer state (AdamW: two float32 moments per trained parameter;
  8-bit AdamW: two bytes; LoRA: the adapter's weights and moments) plus the peak of one step's forward and
  backward pass (activations kept for the backward pass, gradients, temporaries). That peak is traced on fake
  tensors (torch's `FakeTensorMode`: shapes and dtypes, no data, no arithmetic) with the job's own
  configuration: which weights train (the new token rows, the whole UNet, or a LoRA), gradient checkpointing,
  batch, device and autocast dtype.
- **class images** (only when the job must generate some: not when the bundle carries them or the cache holds
  them already): the no-grad UNet pass of one generation batch (with classifier-free guidance) and the VAE decode
  of its images, traced the same way.
- **margin**: 10 % + 256 MiB for allocator slack and for what the trace leaves out (the triplet losses' extra
  text-encoder passes, the attention loss, the latents of the source image).

A trace costs one fake forward and backward pass (seconds; SD-2.1's UNet is ~10,000 operations, each a few
hundred microseconds of bookkeeping). Each is cached in memory, in `memory-traces.json` in the job store and,
where it can be written, in `~/.cache/ice/memory-traces.json` (`$XDG_CACHE_HOME`), keyed by what changes it:
the models' configurations (not their weights), the device kind, the library versions and the traced
configuration. The learner traces the default job's configurations in the background when it starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from services.common.bundle import MODEL_BUILD_LOCK
from services.learner.class_images import CLASS_IMAGE_BATCH  # images per class-image generation batch

log = logging.getLogger("ice.learner.memory")

GIB = 1 << 30
MARGIN_FRACTION = 0.10
MARGIN_BYTES = 256 << 20
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TRACE_LORA_RANK = 4
FLOAT32 = 4
TRACE_VERSION = "trace-1"  # part of every cache key: a change to what a trace measures makes a new one


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one job on the learner's device, in bytes, with what makes it up."""

    total: int
    parts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        inner = ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items() if v)
        return f"{gib(self.total)} ({inner})"


# -- counting parameters ------------------------------------------------------------------------------------------


def _safetensors_numel(path: Path) -> int:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in entry["shape"]:
            n *= int(d)
        total += n
    return total


def parameter_counts(bundle) -> dict[str, int]:
    """Number of parameters of each diffusion component, from the safetensors headers."""
    root = bundle.root / "diffusion"
    return {comp: sum(_safetensors_numel(p) for p in sorted((root / comp).glob("*.safetensors")))
            for comp in ("unet", "text_encoder", "vae")}


# -- tracing on fake tensors --------------------------------------------------------------------------------------


class _PeakBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Live bytes of every storage created inside the mode (freed when its storage dies), and their peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    n = storage.nbytes()
                    self._seen[storage] = n
                    self.live += n
                    weakref.finalize(storage, self._free, n)
                    self.peak = max(self.peak, self.live)
        return out


def _to_fake(module: torch.nn.Module, mode, device: str) -> torch.nn.Module:
    """Give every parameter and buffer of a module built on `meta` a fake tensor on `device` (building it on
    `meta` and converting is much faster than building it under the fake mode)."""
    from torch._subclasses.fake_tensor import FakeTensor

    target = torch.device(device)
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(FakeTensor(mode, p.data, target), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = FakeTensor(mode, b, target)
    return module


def _fake_models(root: Path, device: str, with_vae: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    return _fake_from_configs(UNet2DConditionModel.load_config(str(root / "unet")),
                              CLIPTextConfig.from_pretrained(str(root / "text_encoder")),
                              AutoencoderKL.load_config(str(root / "vae")) if with_vae else None, device)


def _fake_from_configs(unet_config, text_config, vae_config, device: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import CLIPTextModel

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with MODEL_BUILD_LOCK, torch.device("meta"):  # see services.common.bundle.MODEL_BUILD_LOCK
        unet = UNet2DConditionModel.from_config(unet_config)
        text = CLIPTextModel(text_config)
        vae = AutoencoderKL.from_config(vae_config) if vae_config is not None else None
    for m in (unet, text, vae):
        if m is not None:
            _to_fake(m, mode, device)
            m.eval()
    return mode, unet, text, vae


def _latent_side(root: Path, unet, image_size: int) -> int:
    """The latent's side for `image_size` px images: the VAE halves the resolution once per block but the last."""
    if image_size <= 0:
        return int(unet.config.sample_size)
    vae = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))
    return image_size // 2 ** (len(vae["block_out_channels"]) - 1)


def _autocast(device: str):
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _lora_io(unet) -> int:
    """Σ (in + out features) over the LoRA target layers: a rank-r adapter has r times this many weights."""
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in LORA_TARGETS):
            total += module.in_features + module.out_features
    return total


def trace_training_step(root: Path, device: str, mode: str, batch: int, checkpointing: bool,
                        image_size: int) -> dict[str, int]:
    """Peak bytes allocated by one training step's forward and backward pass, traced on fake tensors.

    `mode`: "embeddings" (UNet frozen; gradients reach the token rows through the text encoder), "full" (every
    UNet weight trains) or "lora" (a rank-4 adapter on the attention projections trains)."""
    fake, unet, text, _ = _fake_models(root, device, with_vae=False)
    extra = {}
    with fake:
        if mode == "full":
            unet.requires_grad_(True)
            if checkpointing:
                unet.enable_gradient_checkpointing()
        elif mode == "lora":
            from unittest import mock

            from peft import LoraConfig

            extra["lora_io"] = _lora_io(unet)

            # the adapter is created on the base layer's device already; peft's moves to it would swap fake
            # parameters, which fake tensors do not allow
            with MODEL_BUILD_LOCK, torch.device(device), mock.patch.object(
                    torch.nn.Module, "to", lambda self, *a, **k: self):
                unet.add_adapter(LoraConfig(r=TRACE_LORA_RANK, lora_alpha=TRACE_LORA_RANK,
                                            init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))
        # the gradient flows back through the text encoder into the new token rows: a trainable position
        # embedding (added to every token's input) gives the text encoder's backward pass its real shape
        dict(text.named_modules())["embeddings.position_embedding"].weight.requires_grad_(True)
        side = _latent_side(root, unet, image_size)
        channels = int(unet.config.in_channels)
        length = int(text.config.max_position_embeddings)
        tracker = _PeakBytes()
        with tracker:
            ids = torch.zeros(batch, length, dtype=torch.long, device=device)
            latents = torch.zeros(batch, channels, side, side, device=device)
            target = torch.zeros(batch, int(unet.config.out_channels), side, side, device=device)
            t = torch.zeros(batch, dtype=torch.long, device=device)
            with _autocast(device):
                hidden = text(input_ids=ids)[0]
                pred = unet(latents, t, encoder_hidden_states=hidden).sample
            loss = F.mse_loss(pred.float(), target)
            loss.backward()
    return {"peak": tracker.peak, **extra}


def trace_class_images(root: Path, device: str, image_size: int, batch: int = CLASS_IMAGE_BATCH) -> int:
    """Peak bytes of class-image generation: a no-grad UNet pass at 2 × batch (guidance), a VAE decode at batch."""
    fake, unet, text, vae = _fake_models(root, device, with_vae=True)
    return _trace_sampling(fake, unet, text, vae, device, _latent_side(root, unet, image_size), batch)


def _trace_sampling(fake, unet, text, vae, device: str, side: int, batch: int) -> int:
    length = int(text.config.max_position_embeddings)
    peaks = []
    with fake, torch.no_grad(), _autocast(device):
        tracker = _PeakBytes()
        with tracker:
            hidden = text(input_ids=torch.zeros(2 * batch, length, dtype=torch.long, device=device))[0]
            latents = torch.zeros(2 * batch, int(unet.config.in_channels), side, side, device=device)
            unet(latents, torch.zeros(2 * batch, dtype=torch.long, device=device), encoder_hidden_states=hidden)
        peaks.append(tracker.peak)
        tracker = _PeakBytes()
        with tracker:
            z = torch.zeros(batch, int(vae.config.latent_channels), side, side, device=device)
            vae.decode(z)
        peaks.append(tracker.peak)
    return max(peaks)


# -- generation batches -------------------------------------------------------------------------------------------

MAX_GENERATION_BATCH = 32  # images per batch at most, memory allowing: beyond this a CPU gains little per image
GENERATION_TRACE_BATCH = CLASS_IMAGE_BATCH  # the batch traced; per image: its peak / the batch (an upper bound)


def trace_generation(pipe, device: str, batch: int = GENERATION_TRACE_BATCH) -> int:
    """Peak bytes of sampling `batch` images with a generation pipeline at its default size (the UNet at
    2 × batch for classifier-free guidance, then the VAE decode), traced on fake copies of its own models; cached
    like every trace, keyed by the models' configurations."""
    import diffusers

    unet_config, text_config, vae_config = dict(pipe.unet.config), pipe.text_encoder.config, dict(pipe.vae.config)
    h = hashlib.sha256()
    for part in (json.dumps(unet_config, sort_keys=True, default=str), text_config.to_json_string(),
                 json.dumps(vae_config, sort_keys=True, default=str)):
        h.update(part.encode())
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    key = "|".join(map(str, (TRACE_VERSION, "generate", h.hexdigest()[:32], kind, torch.__version__,
                             diffusers.__version__, batch)))
    _load_trace_files([_user_cache_file()])

    def compute() -> int:
        fake, unet, text, vae = _fake_from_configs(unet_config, text_config, vae_config, device)
        return _trace_sampling(fake, unet, text, vae, device, int(unet.config.sample_size), batch)

    return _cached_trace(key, compute, [_user_cache_file()])


def free_memory(device: str) -> int:
    """Bytes that more work on `device` may take now: a CUDA device's free memory (with what torch's cache holds
    unused), or the host's (container's) memory less what this process holds."""
    if str(device).startswith("cuda"):
        index = torch.device(device).index or 0
        free, _ = torch.cuda.mem_get_info(index)
        return free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    return host_memory() - process_rss()


def generation_batch(pipe, images: int, device: str, available: int | None = None) -> int:
    """How many of `images` images to sample together: the most that fit in `available` bytes (default:
    `free_memory`) less the margin at the traced peak per image, at least 1 and at most `MAX_GENERATION_BATCH`."""
    if images <= 1:
        return 1
    available = free_memory(device) if available is None else available
    per_image = max(trace_generation(pipe, device) // GENERATION_TRACE_BATCH, 1)
    fits = int(((available - MARGIN_BYTES) / (1 + MARGIN_FRACTION)) // per_image)
    return max(1, min(images, MAX_GENERATION_BATCH, fits))


# -- the trace cache ----------------------------------------------------------------------------------------------


def _user_cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ice" / "memory-traces.json"


_LOADED_FILES: set[Path] = set()


def _load_trace_files(paths: list[Path]) -> None:
    for path in paths:
        if path in _LOADED_FILES:
            continue
        _LOADED_FILES.add(path)
        try:
            known = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(known, dict):
            with _TRACES_LOCK:
                _TRACES.update(known)


def _cached_trace(key: str, compute, cache_files: list[Path]):
    known = _TRACES.get(key)  # a known trace never waits for another one being made
    if known is not None:
        return known
    with _TRACES_LOCK:  # one trace at a time: each one takes the CPU for a while
        if key not in _TRACES:
            _TRACES[key] = compute()
            for path in cache_files:  # a cache that cannot be written only costs time
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                    tmp.write_text(json.dumps(_TRACES, indent=1), encoding="utf-8")
                    os.replace(tmp, path)
                except OSError as exc:
                    log.debug("cannot write the memory-trace cache %s: %s", path, exc)
        return _TRACES[key]


# -- the estimator ------------------------------------------------------------------------------------------------

_TRACES: dict[str, object] = {}  # every trace this process knows, shared by all estimators
_TRACES_LOCK = threading.RLock()


class MemoryEstimator:
    """Estimates per job (see the module docstring); traces are cached in `cache_file` when given."""

    def __init__(self, bundle, device: str, *, gradient_checkpointing: bool = True, adam_8bit: bool = False,
                 cache_file: Path | None = None):
        self.bundle = bundle
        self.device = str(device)
        self.gradient_checkpointing = gradient_checkpointing
        self.adam_8bit = adam_8bit
        self.cache_files = [Path(cache_file)] if cache_file else []
        self.cache_files.append(_user_cache_file())
        self._counts: dict[str, int] | None = None
        self._architecture: str | None = None
        _LOADED_FILES.difference_update(self.cache_files)  # an estimator reads its files afresh
        _load_trace_files(self.cache_files)

    @property
    def counts(self) -> dict[str, int]:
        if self._counts is None:
            self._counts = parameter_counts(self.bundle)
        return self._counts

    def _key(self, *parts) -> str:
        """What a trace depends on: the models' configurations (not their weights), the device kind and the
        library versions, and the traced configuration itself."""
        import diffusers

        if self._architecture is None:
            h = hashlib.sha256()
            for comp in ("unet", "text_encoder", "vae"):
                h.update((self.bundle.root / "diffusion" / comp / "config.json").read_bytes())
            self._architecture = h.hexdigest()[:32]
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        return "|".join(map(str, (TRACE_VERSION, self._architecture, kind, torch.__version__, diffusers.__version__,
                                  *parts)))

    def _cached(self, key: str, compute):
        return _cached_trace(key, compute, self.cache_files)

    def training_trace(self, mode: str, batch: int) -> dict[str, int]:
        checkpointing = self.gradient_checkpointing and mode == "full"
        key = self._key("train", mode, batch, checkpointing, self.bundle.image_size)
        return self._cached(key, lambda: trace_training_step(self.bundle.root / "diffusion", self.device, mode,
                                                             batch, checkpointing, self.bundle.image_size))

    def class_image_trace(self) -> int:
        key = self._key("class-images", CLASS_IMAGE_BATCH, self.bundle.image_size)
        return self._cached(key, lambda: trace_class_images(self.bundle.root / "diffusion", self.device,
                                                            self.bundle.image_size))

    def warm(self) -> None:
        """Trace the default job's configurations now (e.g. in a background thread at start-up)."""
        self.estimate(phases=("object_level", "refinement"), refinement="full", lora_rank=TRACE_LORA_RANK,
                      prior=True, tokens=6)

    def estimate(self, *, phases: tuple[str, ...], refinement: str, lora_rank: int, prior: bool,
                 tokens: int, generates_class_images: bool | None = None) -> MemoryEstimate:
        """`phases`: the training phases the job runs ("object_level", "intrinsic", "refinement"). `prior`:
        prior preservation is on (a batch of 2); `generates_class_images`: the job must generate class images
        (default: whenever `prior`)."""
        generates = prior if generates_class_images is None else (prior and generates_class_images)
        counts = self.counts
        weights = FLOAT32 * sum(counts.values())
        batch = 2 if prior else 1
        text_dim = 0
        try:
            text_dim = int(json.loads((self.bundle.root / "diffusion/text_encoder/config.json")
                                      .read_text(encoding="utf-8"))["hidden_size"])
        except (OSError, ValueError, KeyError):
            pass
        rows = tokens * text_dim * 4 * FLOAT32  # the token rows, their gradient and their two moments
        candidates: dict[str, dict[str, int]] = {}
        if {"object_level", "intrinsic"} & set(phases):
            trace = self.training_trace("embeddings", batch)
            candidates["embeddings"] = {"optimizer": rows, "activations and gradients": trace["peak"]}
        if "refinement" in phases and refinement == "full":
            trace = self.training_trace("full", batch)
            moments = (2 if self.adam_8bit else 2 * FLOAT32) * counts["unet"]
            candidates["full"] = {"optimizer": moments + rows, "activations and gradients": trace["peak"]}
        elif "refinement" in phases:
            trace = self.training_trace("lora", batch)
            adapter = lora_rank * trace["lora_io"] * 3 * FLOAT32  # weights + two moments (gradients are traced)
            extra_grads = max(lora_rank - TRACE_LORA_RANK, 0) * trace["lora_io"] * FLOAT32
            candidates["lora"] = {"optimizer": adapter + rows, "activations and gradients": trace["peak"] + extra_grads}
        worst = max(candidates.values(), key=lambda c: sum(c.values())) if candidates else {}
        dynamic = sum(worst.values())
        class_images = self.class_image_trace() if generates else 0
        parts = {"weights": weights}
        if class_images > dynamic:
            parts["class-image generation"] = class_images
        else:
            parts.update(worst)
        subtotal = sum(parts.values())
        parts["margin"] = int(MARGIN_FRACTION * subtotal) + MARGIN_BYTES
        return MemoryEstimate(sum(parts.values()), parts)

    def estimate_spec(self, spec, generates_class_images: bool | None = None) -> MemoryEstimate:
        s = spec.schedule
        phases = tuple(name for name, steps in (("object_level", s.phase1_steps), ("intrinsic", s.phase2_steps),
                                                ("refinement", s.refinement_steps)) if steps > 0)
        tokens = len(spec.concepts) * (2 + len(spec.anchors))
        return self.estimate(phases=phases, refinement=spec.refinement, lora_rank=spec.lora_rank,
                             prior=s.num_class_images > 0, tokens=tokens, generates_class_images=generates_class_images)


# -- what the device has ------------------------------------------------------------------------------------------


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
    return None


def host_memory() -> int:
    """The memory this process may use: the container's limit when one is set, else the machine's RAM."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def process_rss() -> int:
    """Resident memory of this process, in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


CUDA_RESERVE = 1 << 30  # the CUDA context and the caching allocator's slack


def memory_for_jobs(device: str) -> tuple[int, str]:
    """(bytes a job may use on `device`, how that was found): a CUDA device's memory less 1 GiB, or on a CPU
    the host's (or container's) memory less what this process holds now (call it once the bundle is loaded)."""
    if str(device).startswith("cuda"):
        index = torch.device(device).index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        return total - CUDA_RESERVE, f"{gib(total)} on {device} less {gib(CUDA_RESERVE)} for the CUDA context"
    total, held = host_memory(), process_rss()
    return total - held, f"{gib(total)} of host memory less {gib(held)} the idle learner holds"


def release_host_memory() -> None:
    """Hand freed memory back: the CUDA cache, and glibc's free lists (large frees are returned already)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
