"""The localizer's parts against independent computations: DiffSeg steps, the vote, the retriever's filters,
the default vocabulary, the in-process loop and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.cluster import KMeans

from services.common.bundle import read_vocab_tsv
from services.localizer import build_vocab
from services.localizer.kl import symmetric_kl
from services.localizer.segmentor import (
    aggregate_self_attention,
    anchor_indices,
    greedy_merge,
    instances,
    kmeans,
    vote,
    word_token_positions,
)


def test_anchor_grid_matches_the_published_coordinates():
    idx = anchor_indices(64, 16)
    rows, cols = idx // 64, idx % 64
    assert sorted(set(rows.tolist())) == list(range(1, 62, 4)) == sorted(set(cols.tolist()))
    assert idx.numel() == 256
    assert anchor_indices(8, 16).numel() == 64  # capped by the resolution


def test_self_attention_aggregation_weights_and_upsampling():
    g = torch.Generator().manual_seed(0)
    a16 = torch.softmax(torch.randn(256, 256, generator=g), -1)
    a8 = torch.softmax(torch.randn(64, 64, generator=g), -1)
    agg = aggregate_self_attention({16: a16, 8: a8})
    assert agg.shape == (256, 256)
    torch.testing.assert_close(agg.sum(-1), torch.ones(256))
    # query pixel (5, 9) at 16x16 is query (2, 4) at 8x8 (nearest repetition of the query grid)
    q16, q8 = 5 * 16 + 9, 2 * 8 + 4
    up = F.interpolate(a8[q8].reshape(1, 1, 8, 8), size=(16, 16), mode="bilinear", align_corners=False).flatten()
    expected = (16 / 24) * a16[q16] + (8 / 24) * up / up.sum()
    torch.testing.assert_close(agg[q16], expected)


def test_greedy_merge_joins_close_proposals_in_list_order():
    g = torch.Generator().manual_seed(1)
    centres = torch.softmax(4 * torch.randn(2, 32, generator=g), -1)
    noisy = [c * (1 + 0.01 * torch.rand(32, generator=g)) for c in (centres[0], centres[1], centres[0])]
    p = torch.stack([x / x.sum() for x in noisy])
    merged = greedy_merge(p, threshold=0.1, backend="torch")
    assert merged.shape == (2, 32)
    torch.testing.assert_close(merged[0], (p[0] + p[2]) / 2)
    torch.testing.assert_close(merged[1], p[1])
    assert float(symmetric_kl(merged[:1], merged[1:])) > 0.1


def test_kmeans_matches_sklearn_from_the_same_initial_centroids():
    g = torch.Generator().manual_seed(2)
    points = torch.cat([torch.randn(40, 6, generator=g) + 4 * k for k in range(3)]).double()
    init = points[[0, 45, 90, 5]]
    ours = kmeans(points, init, max_iter=300)
    ref = KMeans(n_clusters=4, init=init.numpy(), n_init=1, max_iter=300, tol=0).fit(points.numpy())
    np.testing.assert_allclose(ours.numpy(), ref.cluster_centers_, atol=1e-8)


def test_vote_picks_the_word_with_the_highest_mean_over_each_segment():
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[:, 2:] = 1
    maps = torch.zeros(3, 4, 4)
    maps[0, :, :2] = 1.0  # the noun attends to the left half
    maps[2, :, 2:] = 1.0  # "background" to the right half
    maps[1] = 0.4
    assert vote(labels, maps).tolist() == [0, 2]


def test_instances_are_eight_connected_above_the_floor_largest_first():
    mask = np.zeros((20, 20), dtype=bool)
    mask[0:5, 0:5] = True  # 25 px
    mask[5, 5] = True  # touches diagonally: same component (8-connectivity)
    mask[10:18, 10:18] = True  # 64 px
    mask[0, 19] = True  # 1 px, below 2.5% of 400 = 10 px
    found = instances(mask, 0.025)
    assert [int(m.sum()) for m in found] == [64, 26]


def test_word_positions_cover_every_token_of_a_multi_token_noun(tiny_bundle):
    tok = tiny_bundle.tokenizer()
    words = ["hippopotamus", "things", "background"]
    positions = word_token_positions(tok, words)
    ids = tok(" ".join(words)).input_ids
    assert len(positions[0]) > 1
    for word, pos in zip(words, positions, strict=True):
        assert [ids[p] for p in pos] == tok(word, add_special_tokens=False).input_ids
    assert positions[0][0] == 1 and positions[2][-1] == len(ids) - 2  # BOS first, EOS last


def test_default_vocabulary_is_valid_large_and_reproducible(tmp_path):
    import wordfreq

    words, pos, freq = read_vocab_tsv(build_vocab.DEFAULT_VOCAB)
    # as large as the published retriever's window of SpLiCE's LAION vocabulary
    assert len(words) == 15_000 and len(set(words)) == len(words)
    assert sum(p == "noun" for p in pos) >= 8000
    tag = dict(zip(words, pos, strict=True))
    for w in ("red", "blue", "wooden", "metal", "glossy", "striped", "color", "material", "texture", "cup"):
        assert w in words
    assert tag["dog"] == tag["cup"] == tag["mountain"] == tag["goldfinch"] == "noun"  # written, word lists, ImageNet
    assert tag["red"] == tag["wooden"] == "adjective" and tag["eat"] == "verb"  # from the part-of-speech lexicon
    assert not {"the", "of", "and", "very"} & set(words)  # function words and adverbs are left out
    assert all(w == w.lower() and w.isalpha() for w in words)
    assert list(freq) == sorted(freq, reverse=True)
    # frequencies are wordfreq's, per billion words
    assert freq[words.index("people")] == round(wordfreq.word_frequency("people", "en", wordlist="large") * 1e9)
    out = tmp_path / "v.tsv"
    build_vocab.write(out)
    assert out.read_bytes() == build_vocab.DEFAULT_VOCAB.read_bytes()


# --- the retriever and the loop on the tiny bundle --------------------------------------------------------------


@pytest.fixture(scope="module")
def localizer(tiny_bundle):
    from services.localizer.pipeline import Localizer

    return Localizer(tiny_bundle)


@pytest.fixture(scope="module")
def photo(photo_png):
    import io

    return Image.open(io.BytesIO(photo_png)).convert("RGB")


def test_onnx_embedding_matches_open_clip(localizer, tiny_bundle, photo):
    model, preprocess, _ = tiny_bundle.load_clip()
    with torch.no_grad():
        ref = F.normalize(model.encode_image(preprocess(photo).unsqueeze(0)).float(), dim=-1)
    vocab = tiny_bundle.load_vocabulary()
    ref = F.normalize(ref - vocab.image_mean, dim=-1)
    torch.testing.assert_close(localizer.retriever.embed([photo]), ref, atol=1e-4, rtol=1e-4)


def test_retriever_filters_and_noun_choice(localizer, photo):
    r = localizer.retriever
    first = r.retrieve(photo)
    assert first.noun is not None and first.noun in [w for w, _ in first.words]
    weights = [v for _, v in first.words]
    assert weights == sorted(weights, reverse=True) or first.words[-1][0] == first.noun
    again = r.retrieve(photo, used_nouns=frozenset({first.noun}))
    assert again.noun != first.noun
    # the negative filter drops the previous noun and every word within cosine 0.85 of it
    vocab = r.vocab
    w = r.solver.solve(r.embed([photo])[0]).weights
    kept = [vocab.words[i] for i in r.rank(w, previous_noun=first.noun)]
    ref = vocab.text[vocab.index(first.noun)]
    assert first.noun not in kept
    assert all(float(vocab.text[vocab.index(k)] @ ref) < 0.85 for k in kept)


def test_negative_filter_compares_plain_text_embeddings(localizer, tiny_bundle, photo):
    """The previous noun's near duplicates are found among the words' plain L2-normalised CLIP text embeddings
    (as the published filter does), not among rows of the centred dictionary."""
    r, vocab = localizer.retriever, localizer.retriever.vocab
    model, _, tok = tiny_bundle.load_clip()
    with torch.no_grad():
        plain = F.normalize(model.encode_text(tok(vocab.words)).float(), dim=-1)
    torch.testing.assert_close(vocab.plain, plain, atol=1e-5, rtol=0)
    w = r.solver.solve(r.embed([photo])[0]).weights
    candidates = r.rank(w, previous_noun=None)
    plain_cos, centred_cos = plain @ plain.T, vocab.text @ vocab.text.T
    # a previous noun that duplicates a candidate in the plain space but not in the centred one
    pairs = [(i, j) for i in candidates for j in range(len(vocab))
             if j != i and plain_cos[i, j] >= 0.85 and centred_cos[i, j] < 0.85]
    assert pairs
    i, j = pairs[0]
    kept = r.rank(w, previous_noun=vocab.words[j])
    assert i not in kept
    assert kept == [k for k in candidates if float(plain_cos[k, j]) < 0.85]


def test_reranker_hook_reorders(localizer, photo):
    r = localizer.retriever
    try:
        r.reranker = lambda image, words: [float(len(x)) for x in words]  # longest word first
        got = r.retrieve(photo)
    finally:
        r.reranker = None
    lengths = [len(w) for w, _ in got.words[:-1]]
    assert lengths == sorted(lengths, reverse=True)


def test_loop_is_deterministic_and_respects_the_crop(localizer, photo):
    from services.localizer.pipeline import LocalizeOptions

    options = LocalizeOptions(merge_threshold=0.0008, min_area_fraction=0.0, max_rounds=2)
    a = localizer.localize(photo, options)
    b = localizer.localize(photo, options)
    assert a.stop_reason in ("remaining_fraction", "max_rounds", "no_progress", "no_new_noun", "no_concept")
    assert len(a.concepts) == len(b.concepts) > 0
    for x, y in zip(a.concepts, b.concepts, strict=True):
        assert x.noun == y.noun and np.array_equal(x.mask, y.mask)
        assert x.mask.shape == (400, 600) and not x.mask[:, :100].any()
    nouns_by_round = {}
    for c in a.concepts:
        nouns_by_round.setdefault(c.round, set()).add(c.noun)
    assert all(len(v) == 1 for v in nouns_by_round.values())  # one noun per round
    assert len({next(iter(v)) for v in nouns_by_round.values()}) == len(nouns_by_round)  # never the same twice
    # default options (merge threshold 1.1) on the tiny random UNet: one segment, voted background: all removed,
    # nothing found
    plain = localizer.localize(photo)
    assert plain.stop_reason == "no_concept" and plain.removed.all() and not plain.concepts
    assert plain.remaining_fraction == 0.0 and plain.uncovered_fraction == 1.0


def test_cli_writes_masks_overlay_and_json(tiny_bundle_dir, photo, tmp_path, capsys):
    from services.localizer.cli import main

    src = tmp_path / "photo.png"
    photo.save(src)
    out = tmp_path / "out"
    rc = main([str(src), "--bundle", str(tiny_bundle_dir), "--out", str(out), "--json", "--max-rounds", "1",
               "--merge-threshold", "0.0008", "--min-area-fraction", "0.01"])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((out / "concepts.json").read_text())
    assert summary["concepts"]
    for c in summary["concepts"]:
        mask = Image.open(out / c["mask"])
        assert mask.size == (600, 400)
    assert Image.open(out / "overlay.png").size == (600, 400)
    assert main([str(tmp_path / "missing.png"), "--bundle", str(tiny_bundle_dir), "--out", str(out)]) == 2
