"""The image-to-text retriever (docs/method.md#retriever): SpLiCE over the bundle's CLIP, run by onnxruntime.

The image is embedded by the bundle's ONNX CLIP image tower (CUDA provider when present, else CPU; one session
per process, cached by the bundle), L2-normalised, centred on the bundle's image mean and renormalised; its
non-negative sparse decomposition over the vocabulary dictionary (λ = 0.2) ranks the words. Stop words and
words too close to the previous round's noun are dropped: cosine ≥ 0.85 between the words' *plain* L2-normalised
CLIP text embeddings, as the published filter compares them (in the centred dictionary different words are nearly
orthogonal, so the same threshold there would drop almost nothing); an optional
re-ranker reorders the survivors; the concept is the first noun (by the vocabulary's part-of-speech column)
that was not used in an earlier round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from services.common.bundle import Bundle, clip_image_transform
from services.localizer.lasso import NonNegLasso

STOP_WORDS = frozenset({"banner", "silhouette", "noir", "han", "teaser", "animation", "warcraft", "shadow"})
NEGATIVE_COSINE = 0.85
TOP_K = 5

# A re-ranker scores candidate words for an image (upstream: a second, larger CLIP); higher is better.
Reranker = Callable[[Image.Image, list[str]], Sequence[float]]


def onnx_providers(setting: str = "auto") -> list[str]:
    """auto -> CUDA then CPU when onnxruntime has CUDA, else CPU; otherwise the comma-separated list."""
    import onnxruntime as ort

    if setting == "auto":
        available = ort.get_available_providers()
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return [p.strip() for p in setting.split(",") if p.strip()]


class ClipReranker:
    """Upstream's re-ranker: softmax(100 · cos) between an open_clip image embedding and each word alone."""

    def __init__(self, model, preprocess, tokenize, device: str = "cpu"):
        self.model, self.preprocess, self.tokenize, self.device = model, preprocess, tokenize, device

    @torch.no_grad()
    def __call__(self, image: Image.Image, words: list[str]) -> list[float]:
        x = self.preprocess(image).unsqueeze(0).to(self.device)
        img = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenize(words).to(self.device)).float(), dim=-1)
        return torch.softmax(100.0 * img @ txt.T, dim=-1)[0].tolist()


@dataclass(frozen=True)
class Retrieval:
    words: list[tuple[str, float]]  # at most TOP_K (word, weight), best first; contains `noun` when found
    noun: str | None  # the first noun of the ranking not used before; None when there is none
    candidates: int  # words with a non-zero weight that survived the filters


class Retriever:
    def __init__(self, bundle: Bundle, providers: list[str] | None = None, reranker: Reranker | None = None):
        self.vocab = bundle.load_vocabulary()
        self.session = bundle.onnx_session(providers or ["CPUExecutionProvider"])
        self.transform = clip_image_transform(bundle.clip_preprocess_cfg())
        self.reranker = reranker
        self.solver = NonNegLasso(self.vocab.text)
        self.is_noun = self.vocab.nouns_mask().numpy()

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[B, D] centred, normalised CLIP image embeddings (onnxruntime)."""
        x = np.stack([self.transform(im).numpy() for im in images]).astype(np.float32)
        (out,) = self.session.run(["image_embeds"], {"pixel_values": x})
        z = torch.nn.functional.normalize(torch.from_numpy(out).float(), dim=-1)
        return torch.nn.functional.normalize(z - self.vocab.image_mean, dim=-1)

    def rank(self, weights: torch.Tensor, previous_noun: str | None) -> list[int]:
        """Word indices by decreasing weight, non-zero only, without stop words and the previous noun's near
        duplicates (cosine ≥ 0.85 between plain normalised text embeddings)."""
        order = torch.argsort(weights, descending=True, stable=True)
        order = order[weights[order] > 0].tolist()
        keep = [i for i in order if self.vocab.words[i] not in STOP_WORDS]
        if previous_noun is not None and previous_noun in self.vocab:
            plain = self.vocab.plain
            ref = plain[self.vocab.index(previous_noun)]
            cos = (plain[keep] @ ref).tolist() if keep else []
            keep = [i for i, c in zip(keep, cos, strict=True) if c < NEGATIVE_COSINE]
        return keep

    def retrieve(
        self,
        image: Image.Image,
        l1_penalty: float = 0.2,
        previous_noun: str | None = None,
        used_nouns: frozenset[str] = frozenset(),
    ) -> Retrieval:
        weights = self.solver.solve(self.embed([image])[0], l1_penalty).weights
        order = self.rank(weights, previous_noun)
        scored = [(self.vocab.words[i], float(weights[i])) for i in order]
        if self.reranker is not None and scored:
            scores = self.reranker(image, [w for w, _ in scored])
            scored = sorted(zip([w for w, _ in scored], map(float, scores), strict=True), key=lambda t: -t[1])
        noun_at = next(
            (k for k, (w, _) in enumerate(scored) if self.is_noun[self.vocab.index(w)] and w not in used_nouns), None
        )
        top = scored[:TOP_K]
        if noun_at is not None and noun_at >= TOP_K:
            # Upstream only looks at the top 5; we look further and report the noun in the list.
            top = scored[: TOP_K - 1] + [scored[noun_at]]
        return Retrieval(words=top, noun=None if noun_at is None else scored[noun_at][0], candidates=len(scored))
