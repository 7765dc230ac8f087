"""The model bundle: tiny build, determinism, verification of corrupt/missing files, tokenizer ids, ONNX encoder,
vocabulary embeddings, assemble round trip, the ice-bundle CLI, and a 2-step diffusion call on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from safetensors.numpy import load_file  # noqa: E402

from services.common.assemble import assemble_bundle  # noqa: E402
from services.common.bundle import Bundle, compute_digest, file_table  # noqa: E402
from services.common.errors import BundleError  # noqa: E402
from services.common.tiny_bundle import build_tiny_bundle  # noqa: E402
from services.common.tokenizer import build_clip_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    t0 = time.perf_counter()
    build_tiny_bundle(out, seed=0)
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def bundle(tiny) -> Bundle:
    return Bundle.open(tiny[0])


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _safetensors_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors"))


def test_tiny_build_time_and_size(tiny):
    root, seconds = tiny
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert seconds < 30, f"tiny build took {seconds:.1f}s"
    assert size < 100e6, f"tiny bundle is {size / 1e6:.1f} MB"
    assert not list(root.parent.glob(".*partial*")), "staging directory left behind"


def test_bundle_json(bundle, tiny):
    info = bundle.info
    assert info["format_version"] == 1 and info["kind"] == "tiny" and info["precision"] == "float32"
    assert bundle.image_size == 64
    assert info["components"]["diffusion"]["latent_size"] == 16
    assert info["components"]["diffusion"]["attention_resolutions"] == [16, 8]
    files = file_table(tiny[0])
    assert files == info["files"] and "bundle.json" not in files
    assert compute_digest(files) == bundle.digest
    for rel in ("clip/image_encoder.onnx", "vocab/embeddings.safetensors", "diffusion/model_index.json"):
        assert rel in files
    assert not any(rel.endswith((".bin", ".ckpt", ".pt")) for rel in files)


def test_determinism(tiny, tmp_path):
    root = tiny[0]
    same = build_tiny_bundle(tmp_path / "same", seed=0)
    other = build_tiny_bundle(tmp_path / "other", seed=1)
    names = _safetensors_files(root)
    assert names == _safetensors_files(same) and len(names) >= 6
    for rel in names:
        a, b, c = load_file(root / rel), load_file(same / rel), load_file(other / rel)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rel}:{k}")
        assert any(not np.array_equal(a[k], c[k]) for k in a), f"{rel} does not depend on the seed"
    assert Bundle.open(same).digest == Bundle.open(root).digest
    assert Bundle.open(other).digest != Bundle.open(root).digest


def test_verify_passes(bundle):
    checks = bundle.verify()
    assert any("onnx" in c for c in checks) and any("vocabulary" in c for c in checks)
    Bundle.open(bundle.root, verify_hashes=True)


def test_corrupted_file_is_named(tiny, tmp_path):
    root = _copy(tiny[0], tmp_path)
    rel = "diffusion/unet/diffusion_pytorch_model.safetensors"
    data = bytearray((root / rel).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(
        b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8]
    )
    (root / rel).write_bytes(bytes(data))
    Bundle.open(root)  # same size: only a hash check can catch it
    with pytest.raises(BundleError) as e:
        Bundle.open(root, verify_hashes=True)
    assert e.value.path == rel and rel in str(e.value)
    with pytest.raises(BundleError) as e:
        Bundle.open(root).verify()
    assert e.value.path == rel


def test_missing_and_truncated_files_are_named(tiny, tmp_path):
    root = _copy(tiny[0], tmp_path)
    (root / "vocab/embeddings.safetensors").unlink()
    with pytest.raises(BundleError) as e:
        Bundle.open(root)
    assert e.value.path == "vocab/embeddings.safetensors"
    shutil.copyfile(tiny[0] / "vocab/embeddings.safetensors", root / "vocab/embeddings.safetensors")
    rel = "clip/image_encoder.onnx"
    (root / rel).write_bytes((root / rel).read_bytes()[:-10])
    with pytest.raises(BundleError) as e:
        Bundle.open(root)
    assert e.value.path == rel
    (root / "bundle.json").unlink()
    with pytest.raises(BundleError) as e:
        Bundle.open(root)
    assert e.value.path == "bundle.json"


def test_edited_bundle_json_is_caught(tiny, tmp_path):
    root = _copy(tiny[0], tmp_path)
    info = json.loads((root / "bundle.json").read_text())
    info["files"]["../escape"] = {"sha256": "0" * 64, "size": 1}
    (root / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError) as e:
        Bundle.open(root)
    assert e.value.path == "bundle.json"


def test_tokenizer_ids(bundle):
    assert list(build_clip_tokenizer()("a photo of a cat")["input_ids"]) == CAT_IDS
    tok = bundle.tokenizer()
    assert list(tok("a photo of a cat")["input_ids"]) == CAT_IDS
    assert tok.model_max_length == 77 and len(tok) == 49408
    _, _, clip_tok = bundle.load_clip()
    assert clip_tok(["a photo of a cat"])[0, :7].tolist() == CAT_IDS


def test_onnx_matches_torch(bundle):
    import onnxruntime as ort

    model, preprocess, _ = bundle.load_clip()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (80 + 7 * i, 96, 3), dtype=np.uint8)) for i in range(3)]
    x = torch.stack([preprocess(im) for im in images])
    assert x.shape == (3, 3, 64, 64)
    with torch.no_grad():
        ref = model.encode_image(x).numpy()
    sess = ort.InferenceSession(str(bundle.clip_onnx_path()), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    (out,) = sess.run(["image_embeds"], {"pixel_values": x.numpy()})
    assert out.shape == (3, 32)
    assert np.abs(out - ref).max() < 1e-4
    (one,) = sess.run(["image_embeds"], {"pixel_values": x[:1].numpy()})  # dynamic batch
    assert np.abs(one - ref[:1]).max() < 1e-4


def test_vocabulary_embeddings(bundle):
    vocab = bundle.load_vocabulary()
    assert len(vocab) >= 150 and int(vocab.nouns_mask().sum()) >= 100
    assert vocab.text.dtype == torch.float32 and vocab.text.shape == (len(vocab), 32)
    assert vocab.image_mean.shape == (32,)
    torch.testing.assert_close(vocab.text.norm(dim=1), torch.ones(len(vocab)), atol=1e-5, rtol=0)
    for w in ("dog", "cat", "cup", "table", "color", "material", "texture", "red", "wooden", "striped"):
        assert w in vocab
    assert vocab.pos[vocab.index("cat")] == "noun" and vocab.pos[vocab.index("wooden")] == "adjective"
    # Recompute the SpLiCE dictionary independently: normalise, centre (mean ~ 0), normalise.
    model, _, tok = bundle.load_clip()
    with torch.no_grad():
        raw = torch.nn.functional.normalize(model.encode_text(tok(vocab.words)).float(), dim=-1)
    centred = raw - raw.mean(0)
    assert centred.mean(0).abs().max() < 1e-6
    torch.testing.assert_close(vocab.text, torch.nn.functional.normalize(centred, dim=-1), atol=1e-5, rtol=0)
    # Stored rows are parallel to the centred vectors.
    cos = (vocab.text * torch.nn.functional.normalize(centred, dim=-1)).sum(1)
    assert cos.min() > 0.9999
    assert bundle.info["components"]["vocab"]["embedding_model_sha256"] == bundle.info["files"][
        "clip/open_clip_model.safetensors"]["sha256"]  # fmt: skip


def test_dino_loads(bundle):
    model, preprocess = bundle.load_dino()
    x = preprocess(Image.new("RGB", (100, 70), (200, 30, 30)))[None]
    with torch.no_grad():
        cls = model(pixel_values=x).last_hidden_state[:, 0]
    assert cls.shape == (1, 48)
    assert bundle.load_dino()[0] is model  # cached


def test_load_diffusion_generates(bundle):
    pipe = bundle.load_diffusion()
    assert bundle.load_diffusion() is pipe
    assert pipe.safety_checker is None
    sched = pipe.scheduler.config
    assert sched.beta_schedule == "scaled_linear" and sched.num_train_timesteps == 1000
    assert abs(sched.beta_start - 0.00085) < 1e-9 and abs(sched.beta_end - 0.012) < 1e-9
    out = pipe(
        "a red cup", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    )
    img = out.images[0]
    assert img.size == (64, 64)


def test_assemble_round_trip(tiny, tmp_path):
    root = tiny[0]
    out = assemble_bundle(
        tmp_path / "assembled",
        root / "diffusion",
        root / "clip/open_clip_config.json",
        root / "clip/open_clip_model.safetensors",
        root / "dino",
        root / "vocab/vocab.tsv",
        precision="float32",
        link=False,
    )
    b = Bundle.open(out)
    assert b.info["kind"] == "assembled"
    assert b.info["files"] == Bundle.open(root).info["files"]  # byte-identical components
    assert b.digest == Bundle.open(root).digest
    assert b.verify()


def test_assemble_refuses_pickles(tiny, tmp_path):
    root = tiny[0]
    sd = tmp_path / "sd"
    shutil.copytree(root / "diffusion", sd)
    st = sd / "unet/diffusion_pytorch_model.safetensors"
    st.rename(sd / "unet/diffusion_pytorch_model.bin")
    with pytest.raises(BundleError, match="pickle"):
        assemble_bundle(tmp_path / "x", sd, root / "clip/open_clip_config.json",
                        root / "clip/open_clip_model.safetensors", root / "dino", root / "vocab/vocab.tsv")  # fmt: skip
    with pytest.raises(BundleError, match="safetensors"):
        assemble_bundle(tmp_path / "y", root / "diffusion", root / "clip/open_clip_config.json",
                        tmp_path / "weights.bin", root / "dino", root / "vocab/vocab.tsv")  # fmt: skip
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial*"))


def test_assemble_image_mean_from_dir(tiny, tmp_path):
    root = tiny[0]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (70, 90), colour).save(imgs / f"{i}.png")
    out = assemble_bundle(tmp_path / "a", root / "diffusion", root / "clip/open_clip_config.json",
                          root / "clip/open_clip_model.safetensors", root / "dino", root / "vocab/vocab.tsv",
                          image_mean_from=imgs, link=True, precision="float32")  # fmt: skip
    b = Bundle.open(out)  # float32 as the tiny bundle: float16 weights would give other text embeddings
    assert b.info["components"]["vocab"]["image_mean_count"] == 3
    v, v0 = b.load_vocabulary(), Bundle.open(root).load_vocabulary()
    torch.testing.assert_close(v.text, v0.text)
    assert not torch.allclose(v.image_mean, v0.image_mean)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "services.common.bundle_cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)  # fmt: skip


def test_cli_verify(tiny, tmp_path):
    ok = _cli("verify", str(tiny[0]))
    assert ok.returncode == 0, ok.stderr
    assert "digest" in ok.stdout and "MB" in ok.stdout
    root = _copy(tiny[0], tmp_path)
    rel = "dino/model.safetensors"
    data = bytearray((root / rel).read_bytes())
    data[-100] ^= 0xFF
    (root / rel).write_bytes(bytes(data))
    bad = _cli("verify", str(root))
    assert bad.returncode == 1
    assert rel in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert _cli("verify").returncode == 2
    assert _cli("nonsense").returncode == 2


def test_vocabulary_words_are_embedded_on_their_own_positions_with_encode_texts_result(tiny_bundle_dir):
    """The assembly embeds each word on the positions up to the longest word's end (a fraction of the 77-token
    context); with a causal mask and pooling at the word's end the result is encode_text's."""
    import torch

    from services.common.assemble import encode_text_trimmed
    from services.common.bundle import Bundle

    model, _, tokenize = Bundle.open(tiny_bundle_dir).load_clip()
    tokens = tokenize(["dog", "a red ball", "photograph", "x", "unbelievably long words here"])
    assert int((tokens != 0).sum(dim=1).max()) < tokens.shape[1]  # there is padding to skip
    with torch.no_grad():
        full, trimmed = model.encode_text(tokens), encode_text_trimmed(model, tokens)
        assert torch.allclose(full, trimmed, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(full[0], full[1], atol=1e-3)  # the words differ, so agreeing means something
        model.text_pool_type = "last"  # pooled at the context's last position: every position counts
        try:
            assert torch.equal(encode_text_trimmed(model, tokens), model.encode_text(tokens))
        finally:
            model.text_pool_type = "argmax"
