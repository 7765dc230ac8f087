"""Regenerate the default vocabulary, ``services/localizer/data/default_vocab.tsv`` (deterministic).

    python -m services.localizer.build_vocab [--out FILE]

Sources, in this order (a word keeps its first position):
1. Words written for this project (below): common objects, people, animals, food, scenes and "stuff" classes,
   and the words the learner's intrinsic anchors need (color, material, texture and their values).
2. The 91 COCO category names of torchvision's detection weights metadata
   (``FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]``).
3. The 1,000 ImageNet-1k class names of torchvision's classification weights metadata
   (``ResNet50_Weights.IMAGENET1K_V2.meta["categories"]``).
Reading ``.meta`` downloads nothing. Multi-word names keep their head (last) word: "great white shark" -> "shark",
"traffic light" -> "light"; words are lower-cased, hyphens split, duplicates dropped.

There are no corpus counts offline, so the frequency column is a rank score: the n-th word has frequency
``total - n + 1`` (our written words first, roughly most common first, then COCO, then ImageNet). Only the order
matters to the localizer (the lasso uses embeddings, not frequencies).
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


def build() -> list[tuple[str, str]]:
    """[(word, pos)] in rank order."""
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


def write(path: Path = DEFAULT_VOCAB) -> int:
    rows = build()
    total = len(rows)
    lines = ["word\tpos\tfrequency"] + [f"{w}\t{p}\t{total - i}" for i, (w, p) in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_VOCAB)
    args = ap.parse_args(argv)
    n = write(args.out)
    print(f"wrote {n} words to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
