"""The evaluator's image encoders: the bundle's CLIP image tower and its DINO ViT, batched, L2-normalised.

Every encoder maps a list of RGB PIL images to a float32 tensor [N, D] of unit rows, so cosine similarity is a
plain dot product. Both run in fp32 whatever the device: the encoders are small (ViT-B/32, ViT-S/16) and the
metrics should not depend on the card's precision.

CLIP runs by default from the bundle's ONNX export through onnxruntime (docs/method.md#retriever-backbone-and-re-ranker): it is the very graph
the localizer's retriever runs, so both services see the same CLIP embeddings, and the bundle checks it against
the open_clip weights. On a CUDA device whose onnxruntime has no CUDA provider, `clip_backend="auto"` switches to
open_clip in torch on that device rather than leaving the GPU idle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

CLIP = "clip"
DINO = "dino"
CLIP_BACKENDS = ("auto", "onnx", "torch")


class ImageEncoder:
    """Preprocess (PIL -> [3, H, W]) on the CPU, then one batched forward -> unit rows [N, D]."""

    name: str
    dim: int

    def __init__(self, name: str, preprocess: Callable[[Image.Image], torch.Tensor], dim: int):
        self.name = name
        self.preprocess = preprocess
        self.dim = dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] preprocessed pixels -> [N, D] float32 on the CPU, not yet normalised."""
        raise NotImplementedError

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocessed batch [N, 3, H, W] (CPU work, no model)."""
        return torch.stack([self.preprocess(im) for im in images])

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.forward(pixels).float(), dim=-1)

    def embed(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """[N, D] unit embeddings, `batch_size` images per forward pass."""
        out = [self.embed_pixels(self.pixels(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)


class ClipOnnxEncoder(ImageEncoder):
    def __init__(self, session, preprocess, dim: int):
        super().__init__(CLIP, preprocess, dim)
        self.session = session

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(["image_embeds"], {"pixel_values": pixels.numpy().astype(np.float32)})
        return torch.from_numpy(out)


class ClipTorchEncoder(ImageEncoder):
    def __init__(self, model, preprocess, dim: int, device: str):
        super().__init__(CLIP, preprocess, dim)
        self.model = model
        self.device = device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device)).float().cpu()


class DinoEncoder(ImageEncoder):
    """The CLS token of the ViT's last hidden state (DINO's image embedding)."""

    def __init__(self, model, preprocess, device: str):
        super().__init__(DINO, preprocess, int(model.config.hidden_size))
        self.model = model
        self.device = device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state
        return hidden[:, 0].float().cpu()


def onnx_providers(setting: str, device: str) -> list[str]:
    """`auto` -> CUDA first when the device is CUDA and onnxruntime has it, then CPU; else the given list."""
    import onnxruntime as ort

    if setting != "auto":
        return [p.strip() for p in setting.split(",") if p.strip()]
    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def resolve_clip_backend(backend: str, device: str, providers: list[str]) -> str:
    if backend not in CLIP_BACKENDS:
        raise ValueError(f"clip backend {backend!r} not in {CLIP_BACKENDS}")
    if backend != "auto":
        return backend
    on_gpu = device.startswith("cuda")
    return "onnx" if not on_gpu or "CUDAExecutionProvider" in providers else "torch"


def load_encoders(bundle, device: str = "cpu", clip_backend: str = "auto", providers: str = "auto") -> dict[str, ImageEncoder]:
    """The encoders the bundle provides, keyed `clip` / `dino` (a bundle may lack either)."""
    from services.common.bundle import clip_image_transform

    encoders: dict[str, ImageEncoder] = {}
    components = bundle.components
    if CLIP in components or not components:
        plist = onnx_providers(providers, device)
        backend = resolve_clip_backend(clip_backend, device, plist)
        dim = int(components.get(CLIP, {}).get("embed_dim", 0))
        if backend == "onnx":
            session = bundle.onnx_session(plist)
            preprocess = clip_image_transform(bundle.clip_preprocess_cfg())
            dim = dim or int(session.get_outputs()[0].shape[-1])
            encoders[CLIP] = ClipOnnxEncoder(session, preprocess, dim)
        else:
            model, preprocess, _ = bundle.load_clip(device)
            dim = dim or int(model.visual.output_dim)
            encoders[CLIP] = ClipTorchEncoder(model, preprocess, dim, device)
    if DINO in components or not components:
        model, preprocess = bundle.load_dino(device)
        encoders[DINO] = DinoEncoder(model, preprocess, device)
    return encoders


class Embedder:
    """Embeds a stream of lazily decoded images with several encoders, one forward pass at a time per process.

    Images are materialised (decoded, masked, cropped) `batch_size` at a time, just before the forward passes, so a
    request's memory holds its encoded bytes plus one batch of pixels, never every decoded image. Decoding runs
    outside the lock; only the forward passes are serialised.
    """

    def __init__(self, encoders: dict[str, ImageEncoder], batch_size: int = 32):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.encoders = encoders
        self.batch_size = batch_size
        self.lock = threading.Lock()

    def embed(self, sources: Sequence[Callable[[], Image.Image]], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """{encoder name: [len(sources), D] unit embeddings} for each name in `names`."""
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for start in range(0, len(sources), self.batch_size):
            images = [load() for load in sources[start : start + self.batch_size]]
            for name in names:
                encoder = self.encoders[name]
                pixels = encoder.pixels(images)
                with self.lock:
                    out[name].append(encoder.embed_pixels(pixels))
        return {
            n: torch.cat(chunks) if chunks else torch.zeros(0, self.encoders[n].dim) for n, chunks in out.items()
        }
