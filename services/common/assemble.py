"""Assemble a model bundle from real local weights, and the finishing steps shared with the tiny bundle.

`assemble_bundle` copies (hard-links where possible) a diffusers Stable Diffusion directory, an open_clip config and
safetensors weights and a DINO ViT directory into the bundle layout (see `services.common.bundle`), then
`finalize_bundle` exports the CLIP image tower to ONNX, embeds the vocabulary once (the SpLiCE dictionary and the
image mean) and writes bundle.json with the sha256 of every file. Pickled weights (.bin, .ckpt, .pt, ...) are never
read or copied. Nothing is downloaded.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from services.common import bundle as B
from services.common.errors import BundleError

Progress = Callable[[str], None]

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Photographs shipped inside scikit-image (no download): the default source of the CLIP image mean.
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry",
    "moon", "colorwheel", "grass", "gravel", "brick", "clock", "page",
)  # fmt: skip
DIFFUSION_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
ONNX_OPSET = 17


def _noop(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------------------------
# staging: build into a hidden sibling directory, then rename into place


def staging_dir(out: Path, force: bool) -> Path:
    out = Path(out)
    # A bundle is staged beside `out` and renamed into place: neither works when `out` is the root of a mounted
    # volume (the sibling is on another, often read-only, file system; a mount point cannot be renamed).
    target = os.path.realpath(out)
    mounted = os.path.ismount(target)
    try:  # a bind mount of the same file system (a Kubernetes subPath) keeps st_dev: ask the kernel's table
        escaped = target
        for char, code in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
            escaped = escaped.replace(char, code)  # as mountinfo writes them
        with open("/proc/self/mountinfo") as f:
            mounted = mounted or any(line.split(" ")[4] == escaped for line in f)
    except (OSError, IndexError):
        pass
    if mounted:
        raise ValueError(f"{out} is a mount point: write the bundle into a directory inside it "
                         f"(for example --out {out / 'bundle-v1'})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_staging(tmp: Path, out: Path) -> Path:
    out = Path(out)
    for f in tmp.rglob("*"):  # safetensors writes 0600 files; a bundle is read by other users (containers)
        if f.is_file() and not f.is_symlink() and f.stat().st_nlink == 1:  # never touch hard-linked sources
            f.chmod(f.stat().st_mode | 0o044)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLIP: ONNX export, vocabulary dictionary, image mean


class _ImageTower(torch.nn.Module):
    def __init__(self, clip_model):
        super().__init__()
        self.clip = clip_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixel_values, normalize=False)


def _export(tower, x, path: Path, kwargs: dict) -> None:
    try:
        torch.onnx.export(
            tower, (x,), str(path), dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            dynamo=False, do_constant_folding=True, **kwargs,
        )  # fmt: skip
    except Exception:  # noqa: BLE001 - a torch without the legacy exporter: use the dynamo exporter (onnxscript)
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(
            tower, (x,), str(path), dynamic_shapes=({0: batch},), dynamo=True, external_data=False, **kwargs
        )


def export_clip_onnx(clip_model, path: Path, image_size: int, opset: int = ONNX_OPSET) -> None:
    """Export the image tower: pixel_values f32 [N,3,S,S] -> image_embeds f32 [N,D] (not normalised)."""
    tower = _ImageTower(clip_model).eval().float()
    x = torch.zeros(2, 3, image_size, image_size, dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        opset_version=opset,
    )
    with warnings.catch_warnings():  # the tracer's warnings are about shape checks that hold for every batch
        warnings.simplefilter("ignore")
        _export(tower, x, path, kwargs)
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    # Strip exporter doc strings (they may hold source paths) so that the file is reproducible.
    for node in model.graph.node:
        node.doc_string = ""
    model.producer_version = ""
    onnx.save(model, str(path))


def _trimmable(clip_model) -> bool:
    """Whether `encode_text` may run on the tokens up to the longest sequence's end only: a causal mask (a
    position never sees later ones) and pooling at a token inside the sequence (its end, or the first)."""
    return (getattr(clip_model, "attn_mask", None) is not None
            and getattr(clip_model, "text_pool_type", None) in ("argmax", "eos", "first")
            and all(hasattr(clip_model, a) for a in ("token_embedding", "positional_embedding", "transformer",
                                                     "ln_final")))


def encode_text_trimmed(clip_model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `encode_text` over the first n positions only, n = the longest sequence in the batch (a single
    word is 3 tokens of a 77-token context). The padding after a sequence's end cannot change its embedding:
    the mask is causal and the pooled token lies inside the sequence; so the result is encode_text's (to float
    rounding: the matrix products have other shapes) at a fraction of the work. Other text towers: encode_text."""
    if not _trimmable(clip_model):
        return clip_model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    n = max(int((tokens != 0).sum(dim=1).max()), 1)  # the tokenizer pads with id 0
    tokens = tokens[:, :n]
    cast = clip_model.transformer.get_cast_dtype()
    x = clip_model.token_embedding(tokens).to(cast) + clip_model.positional_embedding[:n].to(cast)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask[:n, :n])
    x = text_global_pool(clip_model.ln_final(x), tokens, clip_model.text_pool_type,
                         eos_token_id=getattr(clip_model, "text_eos_id", None))
    projection = clip_model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


@torch.no_grad()
def embed_words(clip_model, tokenize, words: list[str], batch: int = 256) -> torch.Tensor:
    """The plain text embeddings: each word encoded alone (no prompt template), L2-normalised. [V, D]"""
    chunks = []
    for i in range(0, len(words), batch):
        tokens = tokenize(words[i : i + batch])
        chunks.append(encode_text_trimmed(clip_model, tokens).float())
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).contiguous()


def centre_dictionary(plain: torch.Tensor) -> torch.Tensor:
    """SpLiCE dictionary from plain (normalised) embeddings: subtract the mean over words, L2-normalise."""
    return torch.nn.functional.normalize(plain - plain.mean(dim=0, keepdim=True), dim=-1).contiguous()


def compute_text_dictionary(clip_model, tokenize, words: list[str], batch: int = 256) -> torch.Tensor:
    """SpLiCE dictionary: encode each word alone, L2-normalise, subtract the mean over words, L2-normalise."""
    return centre_dictionary(embed_words(clip_model, tokenize, words, batch))


def _image_files(folder: Path) -> list[Path]:
    """The images of `folder` and its sub-folders (a photo collection such as MSCOCO's train2017), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_mean_images(source: str | Path | None) -> tuple[Iterable, str, int]:
    """(PIL RGB images, read one at a time; description; count). `source` None -> scikit-image's shipped
    photographs; else a folder of images (searched recursively)."""
    from PIL import Image

    if source is None:
        try:
            import skimage.data as skd
        except ImportError:
            raise BundleError("scikit-image is not installed; pass --image-mean-from DIR", None) from None

        def shipped():
            for name in SKIMAGE_PHOTOS:
                arr = np.asarray(getattr(skd, name)())
                if arr.dtype == bool:
                    arr = arr.astype(np.uint8) * 255
                yield Image.fromarray(arr).convert("RGB")

        return shipped(), "skimage.data:" + ",".join(SKIMAGE_PHOTOS), len(SKIMAGE_PHOTOS)
    folder = Path(source)
    files = _image_files(folder) if folder.is_dir() else []
    if not files:
        raise BundleError("no images (png/jpg/webp/bmp/tif) found", str(folder))

    def read():
        for p in files:
            try:
                with Image.open(p) as im:
                    yield im.convert("RGB")
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds
                raise BundleError(f"cannot read image: {e}", str(p)) from None

    return read(), f"dir:{folder.name}:{len(files)} images", len(files)


@torch.no_grad()
def compute_image_mean(clip_model, preprocess, images: Iterable, batch: int = 16,
                       progress: Progress = _noop, total: int | None = None) -> torch.Tensor:
    """Mean of the L2-normalised CLIP image embeddings of `images` (PIL), read and embedded a batch at a time."""
    total_sum, count, chunk = None, 0, []

    def flush():
        nonlocal total_sum, count
        x = torch.stack([preprocess(im) for im in chunk])
        z = torch.nn.functional.normalize(clip_model.encode_image(x).float(), dim=-1)
        total_sum = z.sum(dim=0) if total_sum is None else total_sum + z.sum(dim=0)
        count += len(chunk)
        chunk.clear()
        if total and count % (batch * 64) == 0:
            progress(f"  {count}/{total} images embedded")

    for im in images:
        chunk.append(im)
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    if count == 0:
        raise BundleError("no images to average", None)
    return (total_sum / count).contiguous()


MEAN_FILE_SUFFIXES = (".npy", ".safetensors")


def read_image_mean(path: str | Path, dim: int) -> tuple[torch.Tensor, str, int | None]:
    """A precomputed image mean: ``.npy`` (read without pickle) or ``.safetensors`` (a single tensor, or one
    named ``image_mean``), shape [D] or [1, D], the mean of L2-normalised CLIP image embeddings (SpLiCE's
    ``open_clip_ViT-B-32_image.pt`` holds this; convert it to .npy first, pickles are refused). Returns
    (mean [D] float32, description, image count or None)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BundleError(
            "a pickled tensor is refused (pickles can execute code); convert it once, e.g. python -c \"import "
            "numpy, torch; numpy.save('mean.npy', torch.load('FILE', weights_only=True).float().numpy())\"",
            str(path))
    if path.suffix.lower() not in MEAN_FILE_SUFFIXES:
        raise BundleError(f"an image mean must be a folder of images or a {' or '.join(MEAN_FILE_SUFFIXES)} file",
                          str(path))
    count = None
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                keys = list(f.keys())
                key = "image_mean" if "image_mean" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise BundleError(f"expected one tensor or one named 'image_mean', found {keys}", str(path))
                array = f.get_tensor(key)
                meta = f.metadata() or {}
                count = int(meta["count"]) if str(meta.get("count", "")).isdigit() else None
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy and safetensors raise several kinds
        raise BundleError(f"cannot read the image mean: {e}", str(path)) from None
    array = np.asarray(array)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or array.shape[0] != dim or not np.issubdtype(array.dtype, np.floating):
        raise BundleError(f"expected a float vector of the CLIP embedding size {dim}, got {array.dtype} "
                          f"{tuple(array.shape)}", str(path))
    if not np.isfinite(array).all():
        raise BundleError("the image mean has non-finite values", str(path))
    digest = B.sha256_file(path)[:16]
    return torch.from_numpy(array.astype(np.float32)).contiguous(), f"file:{path.name}:sha256:{digest}", count


def write_image_mean(mean: torch.Tensor, out: str | Path, count: int, source: str) -> Path:
    """Save an image mean as ``.npy`` or ``.safetensors`` (by `out`'s suffix), readable by `read_image_mean`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        np.save(out, mean.float().numpy(), allow_pickle=False)
    elif out.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file({"image_mean": mean.float().contiguous()}, str(out), metadata={"count": str(count), "source": source})
    else:
        raise ValueError(f"{out}: the image mean is written as .npy or .safetensors")
    return out


def image_mean_from_folder(folder: str | Path, clip_model, preprocess, progress: Progress = _noop) -> tuple[torch.Tensor, int]:
    """(mean of the L2-normalised image embeddings of every image under `folder`, number of images)."""
    images, _, count = load_mean_images(folder)
    progress(f"embedding {count} images")
    return compute_image_mean(clip_model, preprocess, images, progress=progress, total=count), count


# ----------------------------------------------------------------------------------------------------------------
# vocabularies: ours (word, pos, frequency) and SpLiCE's (one word a line)

SPLICE_WINDOW = 15_000  # the published retriever keeps the 15,000 most frequent words of SpLiCE's LAION list
VOCAB_FORMATS = ("auto", "tsv", "splice")


def read_splice_vocab(path: str | Path, size: int | None = SPLICE_WINDOW) -> list[tuple[str, float]]:
    """SpLiCE's vocabulary file: one word a line, from least to most frequent, each optionally followed by
    ``", count"``. Returns the last `size` distinct non-empty words (all when None) as (word, frequency), most
    frequent first; frequency = the count when the file has one, else the line number (later = more frequent)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BundleError("file not found", str(path)) from None
    except UnicodeDecodeError as e:
        raise BundleError(f"not UTF-8 text: {e}", str(path)) from None
    entries: list[tuple[str, float]] = []
    for lineno, line in enumerate(lines, start=1):
        word, sep, count = line.partition(", ")
        word = word.strip()
        if not word:  # SpLiCE's older LAION list has one empty entry near its end: it is no word
            continue
        if "\t" in word:
            raise BundleError(f"line {lineno}: a tab in {line!r}; this is not SpLiCE's one-word-a-line format",
                              str(path))
        try:
            frequency = float(count) if sep else float(lineno)
        except ValueError:
            raise BundleError(f"line {lineno}: count {count!r} is not a number", str(path)) from None
        entries.append((word, frequency))
    ordered: dict[str, float] = {}
    for word, frequency in reversed(entries):  # most frequent first; a repeated word keeps its later line
        ordered.setdefault(word, frequency)
    words = list(ordered.items())
    if size is not None:
        words = words[:size]
    if not words:
        raise BundleError("vocabulary is empty", str(path))
    return words


def vocab_format_of(path: str | Path) -> str:
    """'tsv' (our word/pos/frequency file) or 'splice' (one word a line), from the file's first line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().rstrip("\r\n")
    return "tsv" if first.split("\t") == B.VOCAB_HEADER else "splice"


def splice_to_tsv(src: str | Path, dst: str | Path, size: int | None = SPLICE_WINDOW) -> dict:
    """Convert SpLiCE's vocabulary file to ours, tagging each word with the part-of-speech lexicon
    (`services.common.lexicon`). Returns counts for bundle.json."""
    from services.common.lexicon import tag_word

    words = read_splice_vocab(src, size)
    tags = [tag_word(w) for w, _ in words]
    rows = ["\t".join(B.VOCAB_HEADER)] + [f"{w}\t{tag}\t{f:.15g}" for (w, f), (tag, _) in zip(words, tags, strict=True)]
    Path(dst).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"source_format": "splice", "source_window": size, "pos_from_lexicon": sum(known for _, known in tags),
            "pos_unknown_as_noun": sum(not known for _, known in tags)}


# ----------------------------------------------------------------------------------------------------------------
# summaries and bundle.json


def attention_resolutions(unet_cfg: dict) -> list[int]:
    """Latent resolutions (side, px of the latent) at which the UNet has self- and cross-attention, descending."""
    size = int(
        unet_cfg["sample_size"]
        if not isinstance(unet_cfg["sample_size"], list)
        else unet_cfg["sample_size"][0]
    )
    downs, ups = unet_cfg["down_block_types"], unet_cfg["up_block_types"]
    n = len(downs)
    res = {size // 2**i for i, t in enumerate(downs) if "CrossAttn" in t}
    res |= {size // 2 ** (n - 1 - i) for i, t in enumerate(ups) if "CrossAttn" in t}
    if "CrossAttn" in str(unet_cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        res.add(size // 2 ** (n - 1))
    return sorted(res, reverse=True)


def diffusion_summary(diff_dir: Path) -> dict:
    unet = json.loads((diff_dir / "unet/config.json").read_text())
    vae = json.loads((diff_dir / "vae/config.json").read_text())
    te = json.loads((diff_dir / "text_encoder/config.json").read_text())
    sched = json.loads((diff_dir / "scheduler/scheduler_config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    latent = int(unet["sample_size"] if not isinstance(unet["sample_size"], list) else unet["sample_size"][0])
    return {
        "image_size": latent * factor,
        "latent_size": latent,
        "latent_channels": int(unet["in_channels"]),
        "vae_scale_factor": factor,
        "vae_scaling_factor": vae.get("scaling_factor", 0.18215),
        "attention_resolutions": attention_resolutions(unet),
        "cross_attention_dim": unet["cross_attention_dim"],
        "unet_block_out_channels": unet["block_out_channels"],
        "text_hidden_size": te["hidden_size"],
        "text_eos_token_id": te.get("eos_token_id"),
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "scheduler": sched.get("_class_name"),
        "num_train_timesteps": sched.get("num_train_timesteps"),
    }


def drop_source_paths(root: Path) -> None:
    """diffusers and transformers record where a model was loaded from (`_name_or_path`) in its config: a path
    on the machine that built the bundle, meaningless elsewhere. A bundle names no such path."""
    for config in sorted(Path(root).rglob("config.json")):
        data = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_bundle_json(
    root: Path, *, name: str, version: str, kind: str, precision: str, components: dict
) -> dict:
    drop_source_paths(root)
    files = B.file_table(root)
    info = {
        "format_version": B.FORMAT_VERSION,
        "name": name,
        "version": version,
        "created": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        "kind": kind,
        "image_size": int(components["diffusion"]["image_size"]),
        "precision": precision,
        "components": components,
        "files": files,
        "digest": B.compute_digest(files),
    }
    (root / B.BUNDLE_JSON).write_text(json.dumps(info, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return info


def finalize_bundle(
    root: Path,
    *,
    name: str,
    version: str,
    kind: str,
    precision: str,
    image_mean_from: str | Path | None = None,
    recommended: dict | None = None,
    vocab_info: dict | None = None,
    progress: Progress = _noop,
) -> dict:
    """Given diffusion/, clip/{config,weights}, dino/ and vocab/vocab.tsv in `root`: convert the weights to
    `precision`, export ONNX, embed the vocabulary (plain and centred) and the image mean (`image_mean_from`:
    None = scikit-image's photos, a folder of images, or a precomputed .npy/.safetensors mean), write the
    recommended options and bundle.json (`vocab_info` is added to its vocab summary). Returns the bundle info."""
    from safetensors.torch import save_file

    root = Path(root)
    convert_bundle_weights(root, precision, progress)
    if recommended:
        write_recommended_file(root, recommended)
    cfg = B.normalise_open_clip_config(json.loads((root / B.CLIP_CONFIG).read_text()))
    (root / B.CLIP_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    model = B.build_open_clip_model(cfg)
    try:
        model.load_state_dict(B._load_safetensors(root, B.CLIP_WEIGHTS), strict=True)
    except RuntimeError as e:
        raise BundleError(f"open_clip weights do not match the config: {e}", B.CLIP_WEIGHTS) from None
    model.eval()
    pre = cfg["preprocess_cfg"]

    progress(f"exporting CLIP image encoder to ONNX (opset {ONNX_OPSET})")
    export_clip_onnx(model, root / B.CLIP_ONNX, pre["image_size"])

    words, pos, _ = B.read_vocab_tsv(root / B.VOCAB_TSV)
    progress(f"embedding {len(words)} vocabulary words")
    from open_clip.tokenizer import SimpleTokenizer

    tokenize = SimpleTokenizer(context_length=int(cfg["text_cfg"].get("context_length", 77)))
    plain = embed_words(model, tokenize, words)
    text = centre_dictionary(plain)
    if image_mean_from is not None and Path(image_mean_from).is_file():
        image_mean, mean_source, mean_count = read_image_mean(image_mean_from, int(text.shape[1]))
        progress(f"image mean read from {Path(image_mean_from).name}")
    else:
        images, mean_source, mean_count = load_mean_images(image_mean_from)
        progress(f"computing the CLIP image mean over {mean_count} images")
        image_mean = compute_image_mean(model, B.clip_image_transform(pre), images, progress=progress,
                                        total=mean_count)
    save_file({"text": text, "text_plain": plain, "image_mean": image_mean}, str(root / B.VOCAB_EMBEDDINGS),
              metadata={"format": "pt"})

    dino_cfg = json.loads((root / B.DINO_DIR / "config.json").read_text())
    clip_sha = B.sha256_file(root / B.CLIP_WEIGHTS)
    components = {
        "diffusion": diffusion_summary(root / B.DIFFUSION_DIR),
        "clip": {
            "model_name": cfg["model_name"],
            "embed_dim": int(cfg["embed_dim"]),
            "image_size": pre["image_size"],
            "mean": pre["mean"],
            "std": pre["std"],
            "onnx_opset": ONNX_OPSET,
            "weights_sha256": clip_sha,
        },
        "dino": {
            "hidden_size": dino_cfg.get("hidden_size"),
            "image_size": dino_cfg.get("image_size"),
            "patch_size": dino_cfg.get("patch_size"),
        },
        "vocab": {
            "size": len(words),
            "nouns": sum(p == "noun" for p in pos),
            "dim": int(text.shape[1]),
            "embedding_model": cfg["model_name"],
            "embedding_model_sha256": clip_sha,
            "image_mean_source": mean_source,
            "image_mean_count": mean_count,
            "plain_embeddings": True,
            **(vocab_info or {}),
        },
    }
    progress("hashing files and writing bundle.json")
    return write_bundle_json(
        root, name=name, version=version, kind=kind, precision=precision, components=components
    )


def write_recommended_file(root: Path, recommended: dict) -> None:
    for key, value in recommended.items():
        if key not in B.RECOMMENDED_SECTIONS or not isinstance(value, dict):
            raise BundleError(f"{key!r} is not one of {B.RECOMMENDED_SECTIONS} with an object value",
                              B.RECOMMENDED_JSON)
    (Path(root) / B.RECOMMENDED_JSON).write_text(json.dumps(recommended, indent=2, sort_keys=True) + "\n")


def set_recommended(root: str | Path, recommended: dict) -> dict:
    """Replace a finished bundle's recommended options and re-hash it (its digest changes: it is a new bundle
    version). Returns the new bundle info."""
    write_recommended_file(Path(root), recommended)
    return rehash_bundle(root)


def rehash_bundle(root: str | Path, components: dict | None = None) -> dict:
    """Re-hash a finished bundle after files of it were added or replaced (its digest changes: it is a new bundle
    version), keeping its name, version, kind and precision; `components` entries join its component summary.
    Returns the new bundle info."""
    root = Path(root)
    info = json.loads((root / B.BUNDLE_JSON).read_text())
    return write_bundle_json(root, name=info["name"], version=info["version"], kind=info["kind"],
                             precision=info["precision"], components={**info["components"], **(components or {})})


# ----------------------------------------------------------------------------------------------------------------
# assemble from real weights


def _place(src: Path, dst: Path, link: bool) -> None:
    """Hard-link `src` to `dst` when allowed and the file is already readable by everyone (a bundle is read by
    other users, e.g. a container's non-root user, and a hard link shares its source's mode); else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link and src.stat().st_mode & 0o044 == 0o044:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


# Weights kept in float32 whatever the bundle's precision: the VAE (its decoder overflows in float16 on large
# activations, which is why diffusers' own fp16 pipelines upcast it), and everything that is not a model
# (vocabulary embeddings, the ONNX encoder is exported in float32 anyway).
KEEP_FLOAT32 = ("vae",)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def convert_weights(path: Path, precision: str) -> int:
    """Rewrite a safetensors file with its floating-point tensors in `precision` (in place, atomically).
    Returns the number of bytes saved. Integer tensors (position ids, ...) are kept as they are."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = _DTYPES[precision]
    before = path.stat().st_size
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return before - path.stat().st_size


def convert_bundle_weights(root: Path, precision: str, progress: Progress = _noop) -> None:
    """Store the bundle's model weights in `precision` (float16/bfloat16), except `KEEP_FLOAT32`. The services
    load them into their compute dtype (float32 on a CPU, bfloat16 on a GPU) whatever is stored."""
    if precision == "float32":
        return
    files = [p for p in sorted((root / B.DIFFUSION_DIR).rglob("*.safetensors"))
             if p.relative_to(root / B.DIFFUSION_DIR).parts[0] not in KEEP_FLOAT32]
    files += [root / B.CLIP_WEIGHTS, *sorted((root / B.DINO_DIR).rglob("*.safetensors"))]
    saved = 0
    for p in files:
        if p.stat().st_nlink > 1:  # never rewrite a hard-linked source in place
            data = p.read_bytes()
            p.unlink()
            p.write_bytes(data)
        saved += convert_weights(p, precision)
    progress(f"stored {len(files)} weight files in {precision} ({saved / 1e6:.1f} MB saved; the VAE stays float32)")


def _is_variant(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[-2] in {"fp16", "bf16", "fp32", "non_ema", "ema"}


def _copy_component(
    src: Path, dst: Path, label: str, link: bool, progress: Progress, weights_required: bool = True
):
    """Copy json/txt/safetensors of one model folder; refuse a folder whose weights are only pickles."""
    if not src.is_dir():
        raise BundleError(f"{label}: directory not found", str(src))
    files = [p for p in sorted(src.rglob("*")) if p.is_file()]
    pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    safes = [p for p in files if p.suffix == ".safetensors" and not _is_variant(p.name)]
    if weights_required and not safes:
        if pickles:
            raise BundleError(
                f"{label}: only pickled weights ({pickles[0].name}); convert them to .safetensors first "
                "(pickles can execute code and are refused)",
                str(pickles[0]),
            )
        if not [p for p in files if p.suffix == ".safetensors"]:
            raise BundleError(f"{label}: no .safetensors weights found", str(src))
        raise BundleError(
            f"{label}: only variant (e.g. fp16) safetensors found; a plain one is required", str(src)
        )
    if pickles:
        progress(f"  {label}: ignoring {len(pickles)} pickled file(s), using safetensors")
    for p in files:
        if p.suffix in (".json", ".txt") or (p.suffix == ".safetensors" and not _is_variant(p.name)):
            _place(p, dst / p.relative_to(src), link)


def assemble_bundle(
    out: str | Path,
    sd_dir: str | Path,
    open_clip_config: str | Path,
    open_clip_weights: str | Path,
    dino_dir: str | Path,
    vocab_tsv: str | Path,
    image_mean_from: str | Path | None = None,
    *,
    vocab_format: str = "auto",
    vocab_size: int | None = None,
    name: str | None = None,
    version: str = "1",
    precision: str = "float16",
    force: bool = False,
    link: bool = True,
    recommended: dict | None = None,
    kind: str = "assembled",
    progress: Progress = _noop,
) -> Path:
    """Build a bundle at `out` from local weights (see the module docstring). Returns `out`.

    `vocab_tsv` is our vocabulary file (word, pos, frequency) or SpLiCE's (one word a line, least to most
    frequent, optional ", count"); `vocab_format` "auto" tells them apart by the first line. `vocab_size` keeps
    that many of the most frequent words: for SpLiCE's file the default is its last 15,000 lines, as the
    published retriever takes; for ours, every word."""
    out, sd_dir, dino_dir = Path(out), Path(sd_dir), Path(dino_dir)
    open_clip_config, open_clip_weights, vocab_tsv = (
        Path(open_clip_config),
        Path(open_clip_weights),
        Path(vocab_tsv),
    )
    if precision not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"precision must be float32, float16 or bfloat16, not {precision!r}")
    if vocab_format not in VOCAB_FORMATS:
        raise ValueError(f"vocab_format must be one of {VOCAB_FORMATS}, not {vocab_format!r}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, not {vocab_size}")
    if image_mean_from is not None and not Path(image_mean_from).exists():
        raise BundleError("image mean source not found (a folder of images, or a .npy/.safetensors mean)",
                          str(image_mean_from))
    if open_clip_weights.suffix != ".safetensors":
        raise BundleError(
            "open_clip weights must be a .safetensors file (pickles are refused)", str(open_clip_weights)
        )
    for p in (open_clip_config, open_clip_weights, vocab_tsv):
        if not p.is_file():
            raise BundleError("file not found", str(p))
    if not (sd_dir / "model_index.json").is_file():
        raise BundleError("not a diffusers pipeline directory (no model_index.json)", str(sd_dir))
    if vocab_format == "auto":
        vocab_format = vocab_format_of(vocab_tsv)
    if vocab_format == "tsv":
        B.read_vocab_tsv(vocab_tsv, rel=str(vocab_tsv))
    else:
        read_splice_vocab(vocab_tsv, vocab_size or SPLICE_WINDOW)
    try:
        raw_cfg = json.loads(open_clip_config.read_text(encoding="utf-8"))
        clip_cfg = B.normalise_open_clip_config(raw_cfg, model_name=open_clip_config.stem)
    except (ValueError, TypeError, KeyError) as e:
        raise BundleError(f"bad open_clip config: {e}", str(open_clip_config)) from None

    t0 = time.perf_counter()
    tmp = staging_dir(out, force)
    try:
        progress(f"copying the diffusion pipeline from {sd_dir}")
        diff = tmp / B.DIFFUSION_DIR
        for comp in DIFFUSION_COMPONENTS:
            _copy_component(sd_dir / comp, diff / comp, comp, link, progress,
                            weights_required=comp in ("unet", "vae", "text_encoder"))  # fmt: skip
        index = json.loads((sd_dir / "model_index.json").read_text())
        for key in ("safety_checker", "feature_extractor", "image_encoder"):
            if key in index:
                index[key] = [None, None]
        index["requires_safety_checker"] = False
        (diff / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

        progress("copying open_clip config and weights")
        (tmp / "clip").mkdir()
        (tmp / B.CLIP_CONFIG).write_text(json.dumps(clip_cfg, indent=2) + "\n")
        _place(open_clip_weights, tmp / B.CLIP_WEIGHTS, link)

        progress(f"copying the DINO model from {dino_dir}")
        _copy_component(dino_dir, tmp / B.DINO_DIR, "dino", link, progress)
        if not (tmp / B.DINO_DIR / "preprocessor_config.json").is_file():
            from transformers import ViTImageProcessor

            dcfg = json.loads((tmp / B.DINO_DIR / "config.json").read_text())
            size = int(dcfg.get("image_size", 224))
            ViTImageProcessor(size={"height": size, "width": size}, resample=3).save_pretrained(
                tmp / B.DINO_DIR
            )
        (tmp / "vocab").mkdir()
        vocab_info = {"source_file": vocab_tsv.name}
        if vocab_format == "splice":
            progress(f"converting SpLiCE's vocabulary {vocab_tsv.name} (the {vocab_size or SPLICE_WINDOW} most "
                     "frequent words, parts of speech from the lexicon)")
            vocab_info |= splice_to_tsv(vocab_tsv, tmp / B.VOCAB_TSV, vocab_size or SPLICE_WINDOW)
        elif vocab_size is not None:
            words, pos, freq = B.read_vocab_tsv(vocab_tsv, rel=str(vocab_tsv))
            keep = np.argsort(-freq, kind="stable")[:vocab_size]
            rows = ["\t".join(B.VOCAB_HEADER)] + [f"{words[i]}\t{pos[i]}\t{freq[i]:.15g}" for i in sorted(keep)]
            (tmp / B.VOCAB_TSV).write_text("\n".join(rows) + "\n", encoding="utf-8")
            vocab_info["source_window"] = vocab_size
        else:
            shutil.copyfile(vocab_tsv, tmp / B.VOCAB_TSV)

        info = finalize_bundle(
            tmp,
            name=name or out.name,
            version=version,
            kind=kind,
            precision=precision,
            image_mean_from=image_mean_from,
            recommended=recommended,
            vocab_info=vocab_info,
            progress=progress,
        )
        commit_staging(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"assembled {info['name']} in {time.perf_counter() - t0:.1f}s")
    return out
