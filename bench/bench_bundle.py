"""Bundle assembly hot path, against the reference formulation on the same inputs in the same run:

- the vocabulary's plain text embeddings (every word encoded alone; 15,000 words for the default vocabulary) with
  the text tower run on the positions up to the longest word's end (`encode_text_trimmed`) against open_clip's
  `encode_text` over the whole 77-token context, on ViT-B-32's text tower (random weights: the work is the same).
"""

from __future__ import annotations

import torch
from harness import BenchResult, timeit


def bench_vocabulary_embedding(quick: bool) -> list[BenchResult]:
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from services.common.assemble import encode_text_trimmed
    from services.common.bundle import read_vocab_tsv
    from services.localizer.build_vocab import DEFAULT_VOCAB

    model = open_clip.create_model("ViT-B-32").eval()
    words = read_vocab_tsv(DEFAULT_VOCAB)[0][: 64 if quick else 256]
    tokens = SimpleTokenizer()(words)
    with torch.no_grad():
        full = model.encode_text(tokens)
        trimmed = encode_text_trimmed(model, tokens)
        cos = torch.nn.functional.cosine_similarity(full, trimmed, dim=-1)
        ours = timeit(lambda: encode_text_trimmed(model, tokens), repeat=3 if quick else 5)
        reference = timeit(lambda: model.encode_text(tokens), repeat=1 if quick else 3)
    longest = int((tokens != 0).sum(dim=1).max())
    return [BenchResult(
        "vocabulary_embedding_vitb32_text", ours / len(words), reference / len(words),
        "open_clip encode_text over the full 77-token context (same weights, same words)", unit="word",
        notes=f"{len(words)} words of the default vocabulary, batch {len(words)}, longest {longest} tokens; "
              f"min cosine to the reference {float(cos.min()):.8f}",
        extra={"max_abs_difference": float((full - trimmed).abs().max()), "min_cosine": float(cos.min()),
               "tokens_run": longest, "context": int(tokens.shape[1])})]


def run(quick: bool) -> list[BenchResult]:
    return bench_vocabulary_embedding(quick)
