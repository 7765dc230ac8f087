"""Part of speech of a lone word, offline: the Brill tagger's lexicon as TextBlob ships it.

TextBlob (a PyPI package, MIT) ships ``textblob/en/en-lexicon.txt``: Eric Brill's lexicon (v1.14, trained on the
Brown corpus and the Penn Treebank; MIT licence) with additions from CMU's Twitter part-of-speech data (CC BY
3.0), one ``word TAG`` per line, where TAG is the word's most frequent Penn Treebank tag. Nothing is downloaded;
the file is read once (about 94,000 entries) and TextBlob itself is never imported.

The published retriever tags each candidate word alone with NLTK's tagger (data fetched at run time) and keeps a
word whose tag starts with NN. The lexicon gives the same kind of answer, the word's usual tag, without a model:
NN* -> noun, JJ* -> adjective, VB* -> verb, anything else -> other.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

LEXICON_PACKAGE = "textblob"
LEXICON_FILE = "en/en-lexicon.txt"


def _pos(tag: str) -> str:
    if tag.startswith("NN"):
        return "noun"
    if tag.startswith("JJ"):
        return "adjective"
    if tag.startswith("VB"):
        return "verb"
    return "other"


def lexicon_path() -> Path:
    spec = importlib.util.find_spec(LEXICON_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the part-of-speech lexicon needs the {LEXICON_PACKAGE!r} package (pip install textblob)")
    path = Path(next(iter(spec.submodule_search_locations))) / LEXICON_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed {LEXICON_PACKAGE} package")
    return path


@lru_cache(maxsize=1)
def lexicon() -> dict[str, str]:
    """{word as written in the lexicon: Penn Treebank tag}."""
    table: dict[str, str] = {}
    for line in lexicon_path().read_text(encoding="utf-8").splitlines():
        if not line or line.startswith(";;;"):
            continue
        word, _, tag = line.rpartition(" ")
        if word and tag:
            table.setdefault(word, tag)
    return table


def penn_tag(word: str) -> str | None:
    """The word's usual Penn tag: as written, else lower-cased, else capitalised (a proper noun); None if unknown."""
    table = lexicon()
    for form in (word, word.lower(), word[:1].upper() + word[1:].lower()):
        if form in table:
            return table[form]
    return None


def tag_word(word: str) -> tuple[str, bool]:
    """(noun / adjective / verb / other, whether the lexicon knows the word). An unknown word is a noun, as a
    lone unknown word is for a statistical tagger: in an image-caption vocabulary these are mostly names of
    things (brands, products, new words)."""
    tag = penn_tag(word)
    return (_pos(tag), True) if tag is not None else ("noun", False)
