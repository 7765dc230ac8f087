"""Captions of ToyWorld scenes, in several templates.

They use the attribute words (colours, textures), the anchor words ICE's intrinsic tokens are tied to ("color",
"texture", "material"), the words of the segmentor's prompt ("things", "background") and the Textual-Inversion
templates the learner draws from ("a photo of a {}", "a rendering of a {}", ...), so that every prompt the
pipeline will write is in the training distribution. Single-object scenes are also captioned by one word or one
attribute ("ball", "a red color", "a striped texture"): the retriever embeds words alone, and ICE generates from
"a <token> color"-style prompts.
"""

from __future__ import annotations

import numpy as np

from toyworld.world import Scene, WorldObject

# The learner's prompt templates (services.learner.trainer.TEMPLATES) with "{}" for the object phrase.
LEARNER_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)  # fmt: skip
MATERIAL = "flat"  # every ToyWorld object is flat paint; the word lets "material" mean something


def object_phrase(o: WorldObject, rng: np.random.Generator) -> str:
    """One way of naming an object with some or all of its attributes."""
    texture = "" if o.texture == "plain" else o.texture
    forms = [
        f"{o.colour} {texture} {o.category}",
        f"{o.colour} {o.category}",
        f"{texture} {o.category}",
        f"{o.category}",
        f"{o.category} of {o.colour} color",
        f"{o.colour} {o.category} with {o.texture} texture",
        f"{o.category} with {o.texture} texture",
        f"{o.colour} {texture} {o.category} of {MATERIAL} material",
    ]
    weights = np.array([6, 3, 2, 1, 1, 2, 1, 1], dtype=float)
    return " ".join(forms[int(rng.choice(len(forms), p=weights / weights.sum()))].split())


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return f"a {phrases[0]}"
    return ", ".join(f"a {p}" for p in phrases[:-1]) + f" and a {phrases[-1]}"


def caption(scene: Scene, rng: np.random.Generator, empty_share: float = 0.0) -> str:
    """A caption of `scene`, drawn with `rng`; "" with probability `empty_share` (classifier-free guidance)."""
    if empty_share and rng.random() < empty_share:
        return ""
    objs = list(scene.objects)
    if not objs:
        return f"a {scene.background} background"
    rng.shuffle(objs)
    u = rng.random()
    if len(objs) == 1:
        o = objs[0]
        if u < 0.07:
            return o.category
        if u < 0.12:
            return f"a {o.colour} color"
        if u < 0.17:
            return f"a {o.texture} texture"
        if u < 0.19:
            return o.colour
        if u < 0.50:
            return str(rng.choice(LEARNER_TEMPLATES)).format(object_phrase(o, rng))
    body = _join([object_phrase(o, rng) for o in objs])
    v = rng.random()
    if v < 0.25:
        return f"{body} on a {scene.background} background"
    if v < 0.40:
        return f"{body} and other things on a {scene.background} background"
    if v < 0.50:
        return f"things on a {scene.background} background: {body}"
    if v < 0.65:
        return f"a photo of {body}"
    return body


def vocabulary_words() -> dict[str, str]:
    """Every word the captions can use, with its part of speech (noun, adjective, verb, other)."""
    from toyworld.world import BACKGROUNDS, CATEGORIES, COLOURS, TEXTURES

    words = {c: "noun" for c in CATEGORIES}
    words.update({c: "adjective" for c in COLOURS})
    words.update({b: "adjective" for b in BACKGROUNDS})
    words.update({t: "adjective" for t in TEXTURES})
    words.update({"black": "adjective", MATERIAL: "adjective"})
    for w in ("color", "texture", "material"):
        words[w] = "noun"
    for template in LEARNER_TEMPLATES:
        for w in template.replace("{}", "").split():
            words.setdefault(w, "other")
    for w in ("photo", "rendering", "rendition"):
        words[w] = "noun"
    for w in ("things", "background", "other", "on", "of", "with", "and"):
        words.setdefault(w, "other")
    return words
