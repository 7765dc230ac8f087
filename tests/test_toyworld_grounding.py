"""ToyWorld v2's training data and losses: grounded captions say which pixels each word names, the grounding loss is
the TokenCompose quantity, and the retriever's and DINO's new batches are what they claim (toyworld/grounding.py,
toyworld/train.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toyworld.grounding import (
    GroundedCaption,
    encode_captions,
    grounded_caption,
    grounding_losses,
)
from toyworld.world import CATEGORIES, COLOURS, HELD_OUT, TEXTURES, category_twins, isolated, make_scene


@pytest.fixture(scope="module")
def tokenizer():
    from services.common.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def _captions(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    scenes = [make_scene(k) for k in range(n)]
    return scenes, [grounded_caption(s, rng) for s in scenes]


def test_grounded_tokens_are_the_tokens_of_the_whole_caption(tokenizer):
    """Token ids built word by word (to know where each word's tokens are) equal the tokenizer's on the whole text."""
    _, caps = _captions(300)
    targets = encode_captions(tokenizer, caps)
    whole = tokenizer([c.text for c in caps], padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids
    assert torch.equal(targets.ids, whole)
    assert (targets.weights > 0).any(1).float().mean() > 0.8  # most captions ground something (10 % are empty)


def test_every_grounded_word_names_exactly_its_pixels():
    """A category, colour or texture word is grounded on objects that have that attribute, and on every object of
    that category in the vote prompt; "things" on objects the caption does not name or, in the vote prompt,
    on the other categories' objects; "background" on no object pixel."""
    scenes, caps = _captions(400, seed=1)
    seen = set()
    for scene, cap in zip(scenes, caps, strict=True):
        objs = scene.objects
        vote = len(cap.words) == 3 and cap.words[1:] == ["things", "background"]
        named = {w for w, m in zip(cap.words, cap.masks, strict=True) if w in CATEGORIES}
        for word, mask in zip(cap.words, cap.masks, strict=True):
            if mask is None:
                continue
            covered = [o for o in objs if (o.mask & mask).any()]
            assert all((o.mask & mask).sum() == o.mask.sum() for o in covered)  # whole objects only
            union = np.zeros_like(mask)
            for o in covered:
                union |= o.mask
            if word == "background":
                assert not covered and mask.any()
                seen.add("background")
            elif word == "things":
                assert covered and mask.sum() == union.sum()
                if vote:
                    assert all(o.category != cap.words[0] for o in covered)
                else:
                    assert all(o.category not in named or sum(p.category == o.category for p in objs) > 1
                               for o in covered)
                seen.add("things")
            else:
                assert word in CATEGORIES or word in COLOURS or word in TEXTURES, word
                assert covered and mask.sum() == union.sum()
                axis = "category" if word in CATEGORIES else "colour" if word in COLOURS else "texture"
                assert all(getattr(o, axis) == word for o in covered)
                if vote and word == cap.words[0]:
                    assert {id(o) for o in covered} == {id(o) for o in objs if o.category == word}
                seen.add(axis)
    assert seen == {"background", "things", "category", "colour", "texture"}


def test_a_blacked_out_scene_always_says_black_and_a_plain_one_never_does():
    """The augmentation that shows ICE's later rounds (black background, blacked-out objects) is always named in
    its caption, so that a plain prompt never asks for it."""
    scenes, caps = _captions(600, seed=2)
    for scene, cap in zip(scenes, caps, strict=True):
        if not cap.words or cap.words[1:] == ["things", "background"]:
            continue  # empty captions, and the vote prompt, which ICE writes the same for every round
        blacked = scene.background == "black" or bool(scene.removed)
        assert ("black" in cap.words) == blacked, (cap.text, scene.background, len(scene.removed))


def test_grounding_losses_are_zero_on_the_mask_and_the_mask_share_when_uniform():
    """L_token = (1 − Σ(A·M)/ΣA)²: attention wholly inside the mask costs nothing; uniform attention over the 16 × 16
    cells has share = the mask's area; gradients reach the attention."""
    mask = np.zeros((64, 64), dtype=bool)
    mask[:32, :32] = True  # a quarter of the picture
    cap = GroundedCaption(words=["ball"], masks=[mask])

    class Tok:
        bos_token_id, eos_token_id = 49406, 49407

        def __call__(self, word, add_special_tokens=False):
            return type("T", (), {"input_ids": [1069]})()

    targets = encode_captions(Tok(), [cap], sides=(16,))
    inside = torch.from_numpy(np.kron(mask[::4, ::4], np.ones((1, 1))).astype(np.float32)).flatten()
    probs = torch.full((1, 2, 256, 77), 1.0 / 77)
    on_mask = probs.clone()
    on_mask[0, :, :, 1] = inside[None] * 0.5  # token 1 ("ball") attends only inside the mask
    l_tok, _, shares = grounding_losses({16: [on_mask]}, targets)
    assert float(l_tok) == pytest.approx(0.0, abs=1e-6) and float(shares[16]) == pytest.approx(1.0)
    uniform = probs.clone().requires_grad_(True)
    l_tok, l_pix, shares = grounding_losses({16: [uniform]}, targets)
    assert float(shares[16]) == pytest.approx(0.25, abs=1e-6)
    assert l_tok.item() == pytest.approx(0.75**2, abs=1e-6)
    (l_tok + l_pix).backward()
    assert uniform.grad[0, :, :, 1].abs().sum() > 0 and uniform.grad[0, :, :, 5].abs().sum() == 0


def test_retriever_batches_hold_category_twins_and_single_objects_on_black():
    from toyworld.train import retriever_batch

    rng = np.random.default_rng(0)
    for seed in range(20):
        a, b = category_twins(seed, rng)
        # the same background, colours and textures; no object keeps its category (later objects may be placed
        # elsewhere: where one fits depends on the shapes already drawn)
        assert a.background == b.background
        assert sorted((o.colour, o.texture) for o in a.objects) == sorted((o.colour, o.texture) for o in b.objects)
        assert not {(o.colour, o.texture, o.category) for o in a.objects} & {(o.colour, o.texture, o.category)
                                                                              for o in b.objects}
        assert not any((o.colour, o.category, o.texture) in HELD_OUT for o in b.objects)
    one = isolated(make_scene(3, augment=False), 0)
    pixels = np.asarray(one.image)
    assert one.background == "black" and len(one.objects) == 1 and not pixels[~one.objects[0].mask].any()
    x, scenes, texts = retriever_batch(0, 0, 32)
    assert x.shape == (32, 3, 64, 64) and len(scenes) == len(texts) == 32
    assert sum(s.background == "black" and len(s.objects) == 1 for s in scenes[24:]) == 8


def test_object_views_show_one_object_whole():
    """DINO's object-centred views: the chosen object is inside the view (not cut off) and fills a good part of it."""
    from toyworld.train import _object_views, generator, object_batch

    x, masks = object_batch(0, 0, 16, salt=10)
    g = generator(0, 0, 10)
    views = _object_views(x, masks, g)
    mask_views = _object_views(masks[:, None].float().expand(-1, 3, -1, -1).contiguous(), masks,
                               generator(0, 0, 10))[:, 0]
    assert views.shape == x.shape
    coverage = mask_views.flatten(1).mean(1)
    assert (coverage > 0.15).all(), coverage  # the object fills at least a sixth of the view
    border = torch.cat([mask_views[:, 0], mask_views[:, -1], mask_views[:, :, 0], mask_views[:, :, -1]], 1)
    assert (border.amax(1) < 0.5).float().mean() > 0.8  # and is rarely cut by the view's edge


def test_the_demo_record_sets_what_was_found_beside_the_truth():
    """bench/results/demo.json's record: each concept matched to the true object its mask overlaps, and its grids
    read by the classifiers (images of the true object read as true; a wrong-colour grid reads as wrong)."""
    from types import SimpleNamespace

    from client.options import mask_png
    from client.types import Concept, GeneratedImage
    from toyworld.demo_record import demo_record, summary_lines
    from toyworld.world import held_out_scene, single_object

    scene = held_out_scene(13)
    concepts = [Concept(f"c{i}", o.category, float(o.mask.mean()), 0, [], mask_png(o.mask))
                for i, o in enumerate(scene.objects)]
    generated = []
    for i, o in enumerate(scene.objects):
        wrong = "blue" if o.colour != "blue" else "red"
        for j in range(2):
            for kind, attribute, colour in (("OBJECT_LEVEL", "", o.colour), ("INTRINSIC", "color", wrong if i else o.colour)):
                image = single_object(colour, o.category, o.texture, seed=j).image
                generated.append(GeneratedImage("p", j, f"c{i}", attribute, j, kind, png_bytes(image)))

    def images_for(cid, kind, attribute=""):
        return [g for g in generated if g.concept_id == cid and g.kind == kind and g.attribute == attribute]

    extraction = SimpleNamespace(localization=SimpleNamespace(concepts=concepts), generated=generated,
                                 images_for=images_for, seconds={"learn": 1.0})
    record = demo_record(extraction, scene, 13)
    assert record["every_object_named"] and record["found"] == [o.category for o in scene.objects]
    first, second = record["concepts"]
    assert first["mask_iou"] == 1.0 and first["matched_object"] == scene.objects[0].phrase()
    assert first["grids"]["category"]["majority_true"] and first["grids"]["colour"]["share_true"] == 1.0
    assert second["grids"]["category"]["majority_true"] and second["grids"]["colour"]["share_true"] == 0.0
    assert len(summary_lines(record)) == 3


def png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
