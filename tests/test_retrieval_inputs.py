"""The retriever's inputs in a bundle: the plain text embeddings beside the centred dictionary (and older bundles
without them), SpLiCE's own vocabulary file, a precomputed image mean, and `ice-bundle image-mean`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from services.common import bundle as B
from services.common.assemble import assemble_bundle, read_splice_vocab, write_bundle_json
from services.common.errors import BundleError

REPO = Path(__file__).resolve().parents[1]


def _assemble(root: Path, out: Path, vocab: Path, **kwargs) -> B.Bundle:
    assemble_bundle(out, root / "diffusion", root / "clip/open_clip_config.json",
                    root / "clip/open_clip_model.safetensors", root / "dino", vocab, precision="float32",
                    **kwargs)  # fmt: skip
    return B.Bundle.open(out)


def test_older_bundle_without_plain_embeddings_still_loads(tiny_bundle_dir, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(tiny_bundle_dir, root)
    stored = load_file(str(root / B.VOCAB_EMBEDDINGS))
    assert set(stored) == {"text", "text_plain", "image_mean"}
    save_file({"text": stored["text"], "image_mean": stored["image_mean"]}, str(root / B.VOCAB_EMBEDDINGS),
              metadata={"format": "pt"})
    info = json.loads((root / B.BUNDLE_JSON).read_text())
    write_bundle_json(root, name=info["name"], version=info["version"], kind=info["kind"],
                      precision=info["precision"], components=info["components"])
    vocab = B.Bundle.open(root, verify_hashes=True).load_vocabulary()
    # derived from the bundle's own CLIP text tower, exactly as assemble stores them
    torch.testing.assert_close(vocab.plain, stored["text_plain"], atol=1e-6, rtol=0)
    torch.testing.assert_close(vocab.text, stored["text"])


def test_splice_vocabulary_file_keeps_the_last_lines_most_frequent_first(tmp_path):
    path = tmp_path / "laion.txt"
    # least to most frequent; SpLiCE's older list carries counts and one empty entry near its end
    path.write_text("zebu, 3\nteacup, 5\ndog, 9\ncup, 9\n, 49793622\nred, 12\nthe, 40\ncup, 41\n")
    assert read_splice_vocab(path, size=4) == [("cup", 41.0), ("the", 40.0), ("red", 12.0), ("dog", 9.0)]
    plain = tmp_path / "plain.txt"
    plain.write_text("zebu\nteacup\ndog\n")  # upstream's current file: no counts
    assert read_splice_vocab(plain, size=None) == [("dog", 3.0), ("teacup", 2.0), ("zebu", 1.0)]
    bad = tmp_path / "bad.txt"
    bad.write_text("dog, many\n")
    with pytest.raises(BundleError, match="line 1"):
        read_splice_vocab(bad)


def test_assemble_takes_splice_vocabulary_and_a_precomputed_mean(tiny_bundle_dir, tmp_path):
    root = Path(tiny_bundle_dir)
    words, _, _ = B.read_vocab_tsv(root / B.VOCAB_TSV)
    # SpLiCE's format: least frequent first, counts after ", "; the window keeps the last 40 words
    lines = [f"{w}, {10 * (k + 1)}" for k, w in enumerate(reversed(words[:60]))]
    (tmp_path / "laion.txt").write_text("\n".join(lines) + "\n")
    mean = np.linspace(-0.2, 0.3, 32, dtype=np.float32)[None]  # [1, D], as SpLiCE's mean file
    np.save(tmp_path / "mean.npy", mean)
    b = _assemble(root, tmp_path / "a", tmp_path / "laion.txt", image_mean_from=tmp_path / "mean.npy",
                  vocab_size=40)
    vocab = b.load_vocabulary()
    assert vocab.words == words[:40]  # the 40 most frequent, most frequent first
    assert list(vocab.frequency) == [10.0 * (60 - k) for k in range(40)]
    tag = dict(zip(vocab.words, vocab.pos, strict=True))
    assert tag["dog"] == "noun" and tag["red"] == "adjective" and tag["the"] == "other"
    torch.testing.assert_close(vocab.image_mean, torch.from_numpy(mean[0]))
    summary = b.info["components"]["vocab"]
    assert summary["source_format"] == "splice" and summary["source_window"] == 40
    assert summary["image_mean_source"].startswith("file:mean.npy")
    # the plain embeddings come with it, and the dictionary is centred on these 40 words
    assert vocab.plain.shape == vocab.text.shape
    torch.testing.assert_close(vocab.text, F.normalize(vocab.plain - vocab.plain.mean(0), dim=-1), atol=1e-5,
                               rtol=0)


def test_a_mean_file_of_the_wrong_kind_is_refused(tiny_bundle_dir, tmp_path):
    root = Path(tiny_bundle_dir)
    np.save(tmp_path / "short.npy", np.zeros(16, dtype=np.float32))
    (tmp_path / "mean.pt").write_bytes(b"\x80\x04pickle")
    for name, message in (("short.npy", "embedding size 32"), ("mean.pt", "pickle")):
        with pytest.raises(BundleError, match=message):
            _assemble(root, tmp_path / "x", root / B.VOCAB_TSV, image_mean_from=tmp_path / name)
    assert not (tmp_path / "x").exists()


def test_cli_image_mean_then_assemble_with_it(tiny_bundle_dir, tmp_path):
    root = Path(tiny_bundle_dir)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 30)]
    for k, colour in enumerate(colours):
        Image.new("RGB", (80 + 10 * k, 60), colour).save(photos / ("sub" if k % 2 else "") / f"{k}.png")
    out = tmp_path / "mean.safetensors"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "services.common.bundle_cli", "image-mean", str(photos),
                           "--bundle", str(root), "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "4 images" in done.stdout
    model, preprocess, _ = B.Bundle.open(root).load_clip()
    images = [Image.open(p).convert("RGB") for p in sorted(photos.rglob("*.png"))]
    with torch.no_grad():
        expected = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1).mean(0)
    stored = load_file(str(out))
    torch.testing.assert_close(stored["image_mean"], expected, atol=1e-5, rtol=0)
    b = _assemble(root, tmp_path / "b", root / B.VOCAB_TSV, image_mean_from=out)
    torch.testing.assert_close(b.load_vocabulary().image_mean, expected, atol=1e-5, rtol=0)
    assert b.info["components"]["vocab"]["image_mean_count"] == 4
    missing = subprocess.run([sys.executable, "-m", "services.common.bundle_cli", "image-mean", str(photos),
                              "--out", str(out)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert missing.returncode == 1 and "--bundle" in missing.stderr and "Traceback" not in missing.stderr
