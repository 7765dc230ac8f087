"""Regenerate the default vocabulary, ``services/localizer/data/default_vocab.tsv`` (deterministic, offline).

    python -m services.localizer.build_vocab [--out FILE] [--size 15000]

15,000 words, most frequent first, from data that installable packages ship (nothing is downloaded):

1. Curated words, always kept: words written for this project (below: common objects, people, animals, food,
   scenes and "stuff" classes, and the words the learner's intrinsic anchors need: color, material, texture and
   their values), the 91 COCO category names of torchvision's detection weights metadata
   (``FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]``) and the 1,000 ImageNet-1k class names of its
   classification weights metadata (``ResNet50_Weights.IMAGENET1K_V2.meta["categories"]``); multi-word names keep
   their head (last) word ("great white shark" -> "shark").
2. Then the most frequent English words of **wordfreq** 3.1.1 (``top_n_list("en", ..., wordlist="large")``;
   Apache-2.0 code, CC BY-SA 4.0 data combining Wikipedia, subtitles, news, books, web text, Twitter and Reddit)
   that are lower-case letters only, at least 2 long, and known to the part-of-speech lexicon as a noun,
   adjective or verb (function words, adverbs and words known only as proper names are left out), until the
   vocabulary holds `--size` words.

Part of speech: the curated object words are nouns and the written attribute words adjectives; every other word
takes its usual tag from the Brill lexicon that **TextBlob** ships (``services.common.lexicon``). Frequency: the
word's wordfreq frequency in occurrences per billion words (0 for a curated word wordfreq does not know). Rows are
sorted by frequency, ties in wordfreq's own order, then alphabetically.

The published retriever uses SpLiCE's LAION vocabulary instead (the 15,000 most frequent words of LAION-400m
captions); `ice-bundle assemble --vocab laion.txt` reads that file as it is distributed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DEFAULT_VOCAB = Path(__file__).parent / "data" / "default_vocab.tsv"

NOUNS = """
person people man woman child boy girl baby face hand hair eye head body arm leg foot
dog cat bird horse cow sheep pig goat chicken duck fish rabbit mouse bear deer lion tiger elephant monkey
car truck bus bicycle motorcycle train boat ship airplane road street sidewalk bridge
house building tower church castle window door roof wall floor ceiling stairs fence gate
room kitchen bedroom bathroom office shop restaurant garden park yard
table chair sofa couch bed desk shelf cabinet drawer lamp light clock mirror picture frame painting poster
cup mug glass bottle jar plate bowl dish spoon fork knife pot pan kettle teapot tray basket box bag
food bread cake cookie pizza sandwich burger salad soup rice pasta noodle egg cheese meat
fruit apple banana orange lemon grape strawberry cherry peach pear pineapple watermelon tomato
vegetable carrot potato onion pepper broccoli corn mushroom bean
coffee tea milk juice wine beer water ice chocolate candy sugar
tree flower leaf plant grass bush branch trunk root forest field meadow lawn
sky cloud sun moon star rain snow fog sunset
mountain hill rock stone sand beach sea ocean wave river lake pond waterfall island desert valley cliff cave
ground dirt mud soil gravel path
shirt dress skirt pants jeans jacket coat sweater hat cap shoe boot sock glove scarf tie belt
toy doll ball kite balloon book paper pen pencil card letter sign flag
phone computer laptop keyboard screen television camera radio speaker headphones
guitar piano violin drum
umbrella vase candle pillow blanket curtain carpet rug towel
bench statue fountain pole wire rope chain wheel tire engine
color colour material texture pattern surface shape object thing background
wood metal plastic fabric cloth cotton wool silk leather paper cardboard rubber concrete marble granite
brick steel iron copper brass bronze aluminum gold silver crystal porcelain ceramic clay bamboo wicker
fur feather velvet denim linen lace canvas foam wax
""".split()

ADJECTIVES = """
red orange yellow green blue purple pink brown black white gray grey beige golden cyan magenta turquoise
teal navy maroon violet ivory cream tan khaki olive lavender crimson scarlet
wooden metallic plastic glass ceramic woolen leathery
smooth rough glossy matte shiny fuzzy furry striped dotted spotted checkered plaid woven knitted wrinkled
grainy bumpy soft hard transparent translucent polished rusty cracked scaly feathery velvety silky
glittery patterned floral textured marbled
""".split()

# Head words of multi-word class names that are not object nouns on their own ("Band Aid", "Saint Bernard").
_NOT_HEADS = {"a", "aid", "bernard", "n/a", "__background__", "s", "an", "the", "of"}


def _head(name: str) -> str | None:
    parts = [p for p in re.split(r"[\s\-/,']+", name.lower()) if p]
    if not parts:
        return None
    word = parts[-1]
    if word in _NOT_HEADS or len(word) < 3 or not word.isalpha():
        return None
    return word


def class_names() -> tuple[list[str], list[str]]:
    """(COCO category names, ImageNet-1k class names) from torchvision's weight metadata (no download)."""
    import torchvision.models as tvm

    coco = list(tvm.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])
    imagenet = list(tvm.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    return coco, imagenet


DEFAULT_SIZE = 15_000
WORDFREQ_VERSION = "3.1.1"
_WORD = re.compile(r"[a-z]{2,}")


def curated() -> list[tuple[str, str]]:
    """[(word, pos)]: the written nouns and adjectives, then the COCO and ImageNet head words (nouns)."""
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(word: str | None, pos: str) -> None:
        if word and word not in seen:
            seen.add(word)
            rows.append((word, pos))

    for w in NOUNS:
        add(w, "noun")
    for w in ADJECTIVES:
        add(w, "adjective")
    coco, imagenet = class_names()
    for name in coco + imagenet:
        add(_head(name), "noun")
    return rows


def build(size: int = DEFAULT_SIZE) -> list[tuple[str, str, int]]:
    """[(word, pos, frequency per billion words)], most frequent first."""
    from importlib.metadata import version

    import wordfreq

    from services.common.lexicon import lexicon, tag_word

    if version("wordfreq") != WORDFREQ_VERSION:
        raise RuntimeError(f"wordfreq {version('wordfreq')} is installed; the shipped vocabulary was built with "
                           f"{WORDFREQ_VERSION} (pip install wordfreq=={WORDFREQ_VERSION})")
    rows = curated()
    if len(rows) > size:
        raise ValueError(f"--size {size} is below the {len(rows)} curated words")
    chosen = dict(rows)
    table = lexicon()
    ranked = wordfreq.top_n_list("en", 200_000, wordlist="large")
    for word in ranked:
        if len(chosen) >= size:
            break
        if word in chosen or not _WORD.fullmatch(word) or word not in table:
            continue
        pos, _ = tag_word(word)
        if pos != "other":
            chosen[word] = pos
    order = {w: i for i, w in enumerate(ranked)}

    def frequency(word: str) -> int:
        return round(wordfreq.word_frequency(word, "en", wordlist="large") * 1e9)

    out = [(w, p, frequency(w)) for w, p in chosen.items()]
    out.sort(key=lambda r: (-r[2], order.get(r[0], len(order)), r[0]))
    return out


def write(path: Path = DEFAULT_VOCAB, size: int = DEFAULT_SIZE) -> int:
    rows = build(size)
    lines = ["word\tpos\tfrequency"] + [f"{w}\t{p}\t{f}" for w, p, f in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_VOCAB)
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help="number of words (default 15000)")
    args = ap.parse_args(argv)
    n = write(args.out, args.size)
    print(f"wrote {n} words to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
