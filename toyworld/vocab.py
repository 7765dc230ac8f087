"""The ToyWorld concept vocabulary, in the project's format (word, part of speech, frequency).

World words first: the six categories are the only nouns the world knows; colours, textures and backgrounds are
adjectives; the anchor words ("color", "texture", "material") and the caption glue ("photo", "things",
"background", ...) are `other`, so they can never become an object concept. Then distractors: the most common
words of the shipped default vocabulary that the world never shows, so that retrieval must pick the right words
out of many (their CLIP embeddings were never trained and sit where an unseen token sits).
"""

from __future__ import annotations

from pathlib import Path

from toyworld.captions import vocabulary_words
from toyworld.world import CATEGORIES

DISTRACTORS = 400


def vocabulary_rows(distractors: int = DISTRACTORS) -> list[tuple[str, str, int]]:
    from services.common.bundle import read_vocab_tsv
    from services.common.bundle_cli import DEFAULT_VOCAB

    world = vocabulary_words()
    rows: list[tuple[str, str]] = []
    for word, pos in world.items():
        rows.append((word, pos if word in CATEGORIES or pos == "adjective" else "other"))
    words, pos, _ = read_vocab_tsv(DEFAULT_VOCAB, rel=str(DEFAULT_VOCAB))
    extra = [(w, p) for w, p in zip(words, pos, strict=True) if w not in world][:distractors]
    rows += extra
    total = len(rows)
    return [(w, p, total - i) for i, (w, p) in enumerate(rows)]


def write_vocabulary(path: str | Path, distractors: int = DISTRACTORS) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["word\tpos\tfrequency"] + [f"{w}\t{p}\t{f}" for w, p, f in vocabulary_rows(distractors)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
