"""UCE concept metrics with the tiny bundle's real encoders: source regions, known answers, and set-level scores
against an independent numpy computation from one-image-at-a-time embeddings."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from services.common.images import decode_image, encode_png
from services.evaluator.encoders import CLIP, DINO, Embedder, load_encoders
from services.evaluator.metrics import (
    ConceptInput,
    ItemInput,
    Protocol,
    SetEvaluation,
    evaluate,
    mask_square_box,
    source_region,
)

NAMES = (CLIP, DINO)


@pytest.fixture(scope="module")
def encoders(tiny_bundle):
    return load_encoders(tiny_bundle, "cpu")


@pytest.fixture(scope="module")
def embedder(encoders):
    return Embedder(encoders, batch_size=5)


def rect(shape, top, left, bottom, right) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top:bottom, left:right] = True
    return m


@pytest.fixture(scope="module")
def scenes():
    """Two real photos, each with three rectangular concept masks."""
    coffee = Image.fromarray(data.coffee())  # 600x400
    astronaut = Image.fromarray(data.astronaut()).resize((256, 256))
    return [
        (coffee, [rect((400, 600), 50, 100, 200, 300), rect((400, 600), 250, 10, 390, 200),
                  rect((400, 600), 100, 350, 300, 590)]),
        (astronaut, [rect((256, 256), 0, 60, 110, 200), rect((256, 256), 120, 0, 256, 100),
                     rect((256, 256), 150, 140, 250, 250)]),
    ]


def png_loader(img: Image.Image):
    """Generated images travel as PNG bytes; decode lazily as the server does."""
    data_ = encode_png(img)
    return lambda: decode_image(data_, field="x")


# ----------------------------------------------------------------------------------------------------------------
# source regions


@pytest.mark.parametrize("fill,colour", [("black", (0, 0, 0)), ("white", (255, 255, 255)), ("gray", (128, 128, 128))])
def test_fixed_fills_replace_only_the_outside(fill, colour):
    img = Image.fromarray(data.coffee())
    mask = rect((400, 600), 10, 20, 60, 90)
    out = np.asarray(source_region(img, mask, Protocol(fill, "none")))
    assert out.shape == (400, 600, 3)
    assert (out[~mask] == colour).all()
    assert (out[mask] == np.asarray(img)[mask]).all()


def test_mean_fill_is_the_mean_colour_inside_the_mask():
    img = Image.fromarray(data.coffee())
    mask = rect((400, 600), 100, 100, 150, 180)
    out = np.asarray(source_region(img, mask, Protocol("mean", "none")))
    want = np.round(np.asarray(img)[mask].astype(float).mean(axis=0))
    assert (out[0, 0] == want).all()


def test_mask_box_is_a_square_around_the_box_padded_with_the_fill():
    img = Image.fromarray(np.full((50, 80, 3), 200, np.uint8))
    mask = rect((50, 80), 5, 60, 45, 78)  # 40 tall, 18 wide, near the right edge
    assert mask_square_box(mask) == (60 - 11, 5, 60 - 11 + 40, 45)
    out = np.asarray(source_region(img, mask, Protocol("white", "mask_box")))
    assert out.shape == (40, 40, 3)
    inside = out == 200
    # the 18-pixel wide object sits in columns 11..28 of the square and is fully kept
    assert inside[:, 11:29].all() and not inside[:, :11].any() and not inside[:, 29:].any()


def test_bad_protocol_values_are_refused():
    with pytest.raises(ValueError):
        Protocol("purple", "none")
    with pytest.raises(ValueError):
        Protocol("black", "tight")


# ----------------------------------------------------------------------------------------------------------------
# encoders


def test_batched_embeddings_equal_one_at_a_time(encoders, scenes):
    img, masks = scenes[0]
    images = [source_region(img, m) for m in masks] + [img, scenes[1][0]]
    for name in NAMES:
        enc = encoders[name]
        batched = enc.embed(images, batch_size=8)
        single = torch.cat([enc.embed([im], batch_size=1) for im in images])
        assert batched.shape == (len(images), enc.dim)
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.norm(dim=1), torch.ones(len(images)))


def test_onnx_and_torch_clip_agree(tiny_bundle, encoders, scenes):
    torch_clip = load_encoders(tiny_bundle, "cpu", clip_backend="torch")[CLIP]
    images = [scenes[0][0], scenes[1][0]]
    torch.testing.assert_close(encoders[CLIP].embed(images), torch_clip.embed(images), atol=1e-4, rtol=0)


def test_each_image_is_decoded_once_for_all_encoders(embedder, scenes):
    calls = []
    img = scenes[0][0]
    loaders = [lambda i=i: calls.append(i) or img for i in range(7)]
    out = embedder.embed(loaders, NAMES)
    assert sorted(calls) == list(range(7))
    assert {n: tuple(t.shape) for n, t in out.items()} == {CLIP: (7, 32), DINO: (7, 48)}


# ----------------------------------------------------------------------------------------------------------------
# known answers


def test_generated_images_identical_to_the_source_regions_score_one(embedder, scenes):
    img, masks = scenes[0]
    protocol = Protocol("gray", "mask_box")
    concepts = [ConceptInput(f"c{k}", m, [png_loader(source_region(img, m, protocol))] * 2) for k, m in enumerate(masks)]
    scores = evaluate(ItemInput("x", img, concepts, [png_loader(img)]), embedder, NAMES, protocol)
    for name in NAMES:
        s = scores[name]
        assert s.sim_i == pytest.approx(1.0, abs=1e-5)
        assert s.sim_c == pytest.approx(1.0, abs=1e-5)
        assert s.acc1 == 1.0 and s.acc3 == 1.0
        assert [c.rank for c in s.concepts] == [1, 1, 1]


def test_wrong_sources_drop_acc1_to_the_fraction_of_own_copies(embedder, scenes):
    img, masks = scenes[0]
    regions = [source_region(img, m) for m in masks]
    # concept k's images are copies of the source regions listed here (an exact copy of region j ranks j first)
    assignment = [[0, 0, 1], [2], [2, 0]]
    concepts = [ConceptInput(f"c{k}", masks[k], [png_loader(regions[j]) for j in js]) for k, js in enumerate(assignment)]
    scores = evaluate(ItemInput("x", img, concepts), embedder, NAMES, Protocol())
    own = [np.mean([j == k for j in js]) for k, js in enumerate(assignment)]
    for name in NAMES:
        assert [c.acc1 for c in scores[name].concepts] == pytest.approx(own)
        assert scores[name].acc1 == pytest.approx(np.mean(own))  # (2/3 + 0 + 1/2) / 3
        assert scores[name].acc3 == 1.0  # only three concepts in scope
        assert scores[name].sim_c is None


def test_set_scores_match_an_independent_computation(encoders, embedder, scenes):
    """Two items, six concepts, mixed right/wrong images: ACC over the union, against numpy on single embeddings."""
    rng = np.random.default_rng(0)
    protocol = Protocol("mean", "mask_box")
    regions = [source_region(img, m, protocol) for img, masks in scenes for m in masks]
    # each concept gets 3 images: copies of random regions of the whole set, plus a composition image per item
    picks = [list(rng.integers(0, len(regions), 3)) for _ in regions]
    evaluation = SetEvaluation(embedder, NAMES, protocol)
    k = 0
    for i, (img, masks) in enumerate(scenes):
        concepts = []
        for m in masks:
            concepts.append(ConceptInput(f"c{k}", m, [png_loader(regions[j]) for j in picks[k]]))
            k += 1
        composition = [png_loader(scenes[1 - i][0])] if i == 0 else []
        evaluation.add(ItemInput(f"item{i}", img, concepts, composition))
    result = evaluation.result()
    assert (evaluation.item_count, evaluation.concept_count) == (2, 6)

    for name in NAMES:
        enc = encoders[name]
        emb = np.stack([enc.embed([r], batch_size=1)[0].numpy() for r in regions]).astype(np.float64)
        acc1, acc3, sim_i, rank = [], [], [], []
        for c, js in enumerate(picks):
            sims = emb[js] @ emb.T  # [3, C]
            r = 1 + np.array([(np.delete(row, c) >= row[c]).sum() for row in sims])
            acc1.append(np.mean(r == 1))
            acc3.append(np.mean(r <= 3))
            sim_i.append(sims[:, c].mean())
            mean = emb[js].mean(0)
            mean_sims = emb @ (mean / np.linalg.norm(mean))
            rank.append(1 + int((np.delete(mean_sims, c) >= mean_sims[c]).sum()))
        overall = result[name].overall
        assert overall.acc1 == pytest.approx(np.mean(acc1))
        assert overall.acc3 == pytest.approx(np.mean(acc3))
        assert overall.sim_i == pytest.approx(np.mean(sim_i), abs=1e-5)
        assert [c.rank for c in overall.concepts] == rank
        whole = [enc.embed([img])[0].numpy() for img, _ in scenes]
        assert overall.sim_c == pytest.approx(float(whole[0] @ whole[1]), abs=1e-5)
        (id0, item0), (id1, item1) = result[name].items
        assert (id0, id1) == ("item0", "item1")
        assert item0.acc1 == pytest.approx(np.mean(acc1[:3])) and item1.acc1 == pytest.approx(np.mean(acc1[3:]))
        assert item1.sim_c is None
    assert np.mean([p == c for c, js in enumerate(picks) for p in js]) < 1  # the draw does include wrong images


def test_png_roundtrip_is_lossless_for_regions(scenes):
    img, masks = scenes[0]
    region = source_region(img, masks[0])
    buf = io.BytesIO(encode_png(region))
    assert (np.asarray(Image.open(buf)) == np.asarray(region)).all()
