"""An offline CLIP BPE tokenizer, built from the vocabulary file that ships inside open_clip_torch.

OpenAI CLIP, open_clip and Stable Diffusion's text encoders all share one BPE vocabulary of 49408 entries. The
merges live in open_clip's `bpe_simple_vocab_16e6.txt.gz`; the vocabulary is derived from them the same way
OpenAI's `SimpleTokenizer` does it, so token ids match OpenAI CLIP exactly (`<|startoftext|>` = 49406,
`<|endoftext|>` = 49407). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def bpe_path() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> tuple[str, ...]:
    """The 256 printable characters that stand for the 256 byte values (GPT-2 / CLIP byte-level BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(chr(c) for c in cs)


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges as "a b" lines), identical to OpenAI CLIP's."""
    with gzip.open(bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    chars = list(_bytes_to_unicode())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(p) for p in pairs] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP BPE vocabulary has {len(tokens)} entries, expected {VOCAB_SIZE}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return vocab, [" ".join(p) for p in pairs]


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write `vocab.json` and `merges.txt` (the Hugging Face CLIP tokenizer file format) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def build_clip_tokenizer() -> CLIPTokenizer:
    """A transformers CLIPTokenizer with OpenAI CLIP's ids, max length 77, pad = `<|endoftext|>` (SD-1 style)."""
    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=MODEL_MAX_LENGTH,
    )
    check_clip_tokenizer(tok)
    return tok


EXPECTED_IDS = {"a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407]}


def check_clip_tokenizer(tok) -> None:
    """Raise if `tok` does not reproduce OpenAI CLIP ids (guards against silently ignored vocab arguments)."""
    for text, ids in EXPECTED_IDS.items():
        got = list(tok(text)["input_ids"])
        if got != ids:
            raise RuntimeError(f"CLIP tokenizer gives {got} for {text!r}, expected {ids}")
