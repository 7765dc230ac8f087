"""The model bundle: its on-disk format and its (offline, cached) loading.

A bundle is a directory::

    bundle.json                      names, versions, image size, precision, sha256+size of every other file
    diffusion/                       a diffusers StableDiffusionPipeline directory (safetensors), no safety checker
    clip/open_clip_config.json       open_clip model config (embed_dim, vision_cfg, text_cfg, ...) + our keys:
                                     model_name, preprocess_cfg {image_size, mean, std, interpolation, resize_mode}
    clip/open_clip_model.safetensors the open_clip state dict
    clip/image_encoder.onnx          the CLIP image tower: pixel_values f32 [N,3,H,W] (already normalised with the
                                     CLIP mean/std) -> image_embeds f32 [N,D] (not L2-normalised), dynamic N
    dino/                            a transformers ViTModel (config.json, model.safetensors, preprocessor_config.json)
    vocab/vocab.tsv                  header ``word\\tpos\\tfrequency``; pos in {noun, adjective, verb, other};
                                     frequency = corpus count (higher = more common)
    recommended.json                 optional: this bundle's own defaults for options a request leaves unset,
                                     {"localize": {...}, "learn": {...}, "schedule": {...}, "generate": {...}}
                                     (e.g. a DiffSeg merge threshold calibrated for this UNet's attention)
    class_images/                    optional: the first N prior-preservation class images of one class prompt
                                     (`00000.png`, ... image n generated with seed n) and `class_images.json`
                                     {prompt, count, num_inference_steps}; made by `ice-bundle class-images`,
                                     so that no learner generates them (services/learner/class_images.py)
    vocab/embeddings.safetensors     ``text`` [V,D]: the SpLiCE dictionary (CLIP text embedding of each word alone,
                                     L2-normalised, centred on the mean over words, L2-normalised again);
                                     ``text_plain`` [V,D]: the same embeddings only L2-normalised (the space of
                                     the retriever's negative filter; bundles made before it was stored lack it
                                     and get it computed from their CLIP text tower when loaded);
                                     ``image_mean`` [D]: mean of L2-normalised CLIP image embeddings

Every load is local (``local_files_only``, safetensors only, never pickle). Any missing, corrupt or unloadable file
raises :class:`BundleError` naming the file relative to the bundle directory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from services.common.errors import BundleError


def quiet_hub_progress() -> None:
    """transformers/diffusers draw progress bars for every save and load; in service logs and CLI output they
    are noise (our own commands report progress themselves)."""
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


quiet_hub_progress()

# diffusers and transformers build a model on the `meta` device by patching torch.nn.Module process-wide while
# `from_pretrained` runs; a parameter that another thread creates at that moment lands on `meta` (seen as
# "Tensor on device meta" when a learning job starts while a pipeline loads). Every model load, and every
# creation of parameters outside a load (new token rows, LoRA adapters), holds this lock.
MODEL_BUILD_LOCK = threading.RLock()

FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
POS_TAGS = ("noun", "adjective", "verb", "other")
VOCAB_HEADER = ["word", "pos", "frequency"]
_TAB = "\t"

DIFFUSION_DIR = "diffusion"
CLIP_CONFIG = "clip/open_clip_config.json"
CLIP_WEIGHTS = "clip/open_clip_model.safetensors"
CLIP_ONNX = "clip/image_encoder.onnx"
DINO_DIR = "dino"
VOCAB_TSV = "vocab/vocab.tsv"
VOCAB_EMBEDDINGS = "vocab/embeddings.safetensors"
RECOMMENDED_JSON = "recommended.json"  # optional: the bundle's own defaults for request options
CLASS_IMAGES_DIR = "class_images"  # optional: prior-preservation class images the bundle carries
CLASS_IMAGES_INDEX = f"{CLASS_IMAGES_DIR}/class_images.json"
RECOMMENDED_SECTIONS = ("localize", "learn", "schedule", "generate")

# Keys of open_clip_config.json that are ours and not arguments of open_clip's model constructors.
_CLIP_OWN_KEYS = {"model_name", "preprocess_cfg", "custom_text"}
_REQUIRED_INFO = (
    "format_version",
    "name",
    "version",
    "created",
    "kind",
    "image_size",
    "precision",
    "files",
    "digest",
)


# ----------------------------------------------------------------------------------------------------------------
# hashing and the file table


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: str | Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {sha256, size}} for every regular file under root except bundle.json, sorted."""
    root = Path(root)
    table: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise BundleError("symbolic links are not allowed in a bundle", p.relative_to(root).as_posix())
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if rel == BUNDLE_JSON:
            continue
        table[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return dict(sorted(table.items()))


def compute_digest(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over the sorted (path, sha256) list: one line ``path\\tsha256\\n`` per file."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\t{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def _safe_rel(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


# ----------------------------------------------------------------------------------------------------------------
# vocabulary


@dataclass
class Vocabulary:
    words: list[str]
    pos: list[str]
    frequency: np.ndarray
    text: torch.Tensor  # float32 [V, D], centred then L2-normalised (the SpLiCE dictionary)
    image_mean: torch.Tensor  # float32 [D]
    plain: torch.Tensor | None = None  # float32 [V, D], only L2-normalised (the negative filter's space)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self._index:
            self._index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @property
    def dim(self) -> int:
        return int(self.text.shape[1])

    def nouns_mask(self) -> torch.Tensor:
        """Bool tensor [V]: True where the word is a noun (only nouns may become object concepts)."""
        return torch.tensor([p == "noun" for p in self.pos], dtype=torch.bool)

    def index(self, word: str) -> int:
        """Row of `word`; KeyError if it is not in the vocabulary."""
        return self._index[word]

    def __contains__(self, word: str) -> bool:
        return word in self._index


def read_vocab_tsv(path: str | Path, rel: str = VOCAB_TSV) -> tuple[list[str], list[str], np.ndarray]:
    """Parse a vocabulary file; BundleError (naming `rel`, with the line) on any format problem."""
    path = Path(path)
    words: list[str] = []
    pos: list[str] = []
    freq: list[float] = []
    seen: set[str] = set()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header != VOCAB_HEADER:
                raise BundleError(f"header must be {_TAB.join(VOCAB_HEADER)!r}, got {header!r}", rel)
            for lineno, row in enumerate(reader, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != 3:
                    raise BundleError(f"line {lineno}: expected 3 tab-separated fields, got {len(row)}", rel)
                word, tag, fr = row[0].strip(), row[1].strip(), row[2].strip()
                if not word:
                    raise BundleError(f"line {lineno}: empty word", rel)
                if tag not in POS_TAGS:
                    raise BundleError(f"line {lineno}: pos {tag!r} not in {POS_TAGS}", rel)
                if word in seen:
                    raise BundleError(f"line {lineno}: duplicate word {word!r}", rel)
                try:
                    value = float(fr)
                except ValueError:
                    raise BundleError(f"line {lineno}: frequency {fr!r} is not a number", rel) from None
                seen.add(word)
                words.append(word)
                pos.append(tag)
                freq.append(value)
    except FileNotFoundError:
        raise BundleError("file not found", rel) from None
    except UnicodeDecodeError as e:
        raise BundleError(f"not UTF-8 text: {e}", rel) from None
    if not words:
        raise BundleError("vocabulary is empty", rel)
    return words, pos, np.asarray(freq, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# open_clip config helpers (shared with assemble)


def normalise_open_clip_config(raw: dict, model_name: str | None = None) -> dict:
    """Accept our flat format or the Hugging Face hub format ({model_cfg, preprocess_cfg}); return the flat one."""
    if "model_cfg" in raw:
        cfg = dict(raw["model_cfg"])
        pre = dict(raw.get("preprocess_cfg") or {})
        cfg["model_name"] = raw.get("model_name") or model_name or cfg.get("model_name") or "open_clip"
    else:
        cfg = dict(raw)
        pre = dict(cfg.get("preprocess_cfg") or {})
        cfg["model_name"] = cfg.get("model_name") or model_name or "open_clip"
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"open_clip config has no {key!r}")
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name") or cfg["text_cfg"].get("hf_model_name"):
        raise ValueError("timm/Hugging Face towers are not supported (they would need downloads)")
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, list | tuple):
        image_size = int(image_size[0])
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    size = pre.get("image_size", pre.get("size", image_size))
    if isinstance(size, list | tuple):
        size = size[0]
    cfg["preprocess_cfg"] = {
        "image_size": int(size),
        "mean": [float(x) for x in pre.get("mean", OPENAI_DATASET_MEAN)],
        "std": [float(x) for x in pre.get("std", OPENAI_DATASET_STD)],
        "interpolation": pre.get("interpolation", "bicubic"),
        "resize_mode": pre.get("resize_mode", "shortest"),
    }
    return cfg


def build_open_clip_model(cfg: dict):
    """Construct an (untrained) open_clip model from a flat config, without any download."""
    import open_clip.model as ocm

    kwargs = {k: v for k, v in cfg.items() if k not in _CLIP_OWN_KEYS}
    cls = ocm.CustomTextCLIP if cfg.get("custom_text") else ocm.CLIP
    return cls(**kwargs)


def clip_image_transform(pre: dict) -> Callable:
    from open_clip.transform import image_transform

    return image_transform(
        pre["image_size"],
        is_train=False,
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        resize_mode=pre.get("resize_mode", "shortest"),
        interpolation=pre.get("interpolation", "bicubic"),
    )


def dino_transform(pre: dict) -> Callable:
    """Resize the shorter side to the model size (bicubic), centre crop, ImageNet-style normalisation."""
    from torchvision import transforms as T

    size = pre.get("size", 224)
    if isinstance(size, dict):
        size = size.get("shortest_edge") or size.get("height")
    size = int(size)
    mean = pre.get("image_mean", [0.485, 0.456, 0.406])
    std = pre.get("image_std", [0.229, 0.224, 0.225])
    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _read_json(root: Path, rel: str) -> dict:
    try:
        data = json.loads((root / rel).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError("file not found", rel) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"not valid JSON: {e}", rel) from None
    if not isinstance(data, dict):
        raise BundleError("expected a JSON object", rel)
    return data


def _load_safetensors(root: Path, rel: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (root / rel).is_file():
        raise BundleError("file not found", rel)
    try:
        return load_file(str(root / rel))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"cannot read safetensors: {e}", rel) from None


# ----------------------------------------------------------------------------------------------------------------
# the bundle


class Bundle:
    """An opened model bundle. Components are loaded lazily, once per instance (thread-safe)."""

    def __init__(self, root: Path, info: dict):
        self.root = root
        self.info = info
        self.image_size = int(info["image_size"])
        self.digest = str(info["digest"])
        self.name = str(info["name"])
        self._cache: dict[Any, Any] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, name={self.name!r}, digest={self.digest[:12]})"

    @property
    def version(self) -> str:
        return str(self.info.get("version", ""))

    @property
    def precision(self) -> str:
        return str(self.info.get("precision", "float32"))

    @property
    def components(self) -> dict:
        return dict(self.info.get("components") or {})

    # -- opening and checking ------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, verify_hashes: bool = False) -> Bundle:
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle directory {str(root)!r} does not exist", None)
        info = _read_json(root, BUNDLE_JSON)
        missing = [k for k in _REQUIRED_INFO if k not in info]
        if missing:
            raise BundleError(f"missing keys {missing}", BUNDLE_JSON)
        if info["format_version"] != FORMAT_VERSION:
            raise BundleError(
                f"unsupported format_version {info['format_version']!r} (expected 1)", BUNDLE_JSON
            )
        files = info["files"]
        if not isinstance(files, dict) or not files:
            raise BundleError("'files' must be a non-empty object", BUNDLE_JSON)
        for rel, entry in files.items():
            if not _safe_rel(rel) or rel == BUNDLE_JSON:
                raise BundleError(f"bad file path {rel!r}", BUNDLE_JSON)
            if not isinstance(entry, dict) or "sha256" not in entry or "size" not in entry:
                raise BundleError(f"entry for {rel!r} needs sha256 and size", BUNDLE_JSON)
        if compute_digest(files) != info["digest"]:
            raise BundleError("digest does not match the file table (bundle.json was edited?)", BUNDLE_JSON)
        for rel, entry in files.items():
            p = root / rel
            if not p.is_file():
                raise BundleError("file is missing", rel)
            size = p.stat().st_size
            if size != entry["size"]:
                raise BundleError(
                    f"size {size} != {entry['size']} listed in bundle.json (corrupt or truncated)", rel
                )
        bundle = cls(root, info)
        if verify_hashes:
            bundle.verify_hashes()
        return bundle

    def verify_hashes(self) -> None:
        for rel, entry in self.info["files"].items():
            p = self.root / rel
            if not p.is_file():
                raise BundleError("file is missing", rel)
            if sha256_file(p) != entry["sha256"]:
                raise BundleError("sha256 does not match bundle.json (corrupt file)", rel)

    def verify(self) -> list[str]:
        """Full check: every hash, every config parses, every component loads and has consistent shapes."""
        done: list[str] = []
        self.verify_hashes()
        done.append(f"sha256 of {len(self.info['files'])} files")
        for rel in self.info["files"]:
            if rel.endswith(".json"):
                _read_json(self.root, rel)
        done.append("json configs parse")
        tok = self.tokenizer()
        ids = list(tok("a photo of a cat")["input_ids"])
        if ids[1:-1] != [320, 1125, 539, 320, 2368]:
            raise BundleError(f"tokenizer gives unexpected ids {ids}", f"{DIFFUSION_DIR}/tokenizer")
        done.append("tokenizer (CLIP BPE ids)")
        pipe = self.load_diffusion()
        if pipe.unet.config.sample_size * pipe.vae_scale_factor != self.image_size:
            raise BundleError(
                f"unet sample_size {pipe.unet.config.sample_size} x vae factor {pipe.vae_scale_factor} "
                f"!= image_size {self.image_size}",
                f"{DIFFUSION_DIR}/unet/config.json",
            )
        done.append("diffusion pipeline loads")
        model, preprocess, clip_tok = self.load_clip()
        embed_dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else None
        done.append("open_clip model loads")
        session = self.onnx_session()
        pre = self._clip_cfg()["preprocess_cfg"]
        x = np.zeros((1, 3, pre["image_size"], pre["image_size"]), dtype=np.float32)
        try:
            (out,) = session.run(["image_embeds"], {"pixel_values": x})
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BundleError(f"onnx image encoder does not run: {e}", CLIP_ONNX) from None
        with torch.no_grad():
            ref = model.encode_image(torch.from_numpy(x)).numpy()
        if out.shape != ref.shape or float(np.abs(out - ref).max()) > 1e-3 * max(
            1.0, float(np.abs(ref).max())
        ):
            raise BundleError("onnx image encoder disagrees with the open_clip weights", CLIP_ONNX)
        done.append("onnx image encoder runs and matches open_clip")
        self.load_dino()
        done.append("dino model loads")
        vocab = self.load_vocabulary()
        if embed_dim is not None and vocab.dim != embed_dim:
            raise BundleError(f"embedding dim {vocab.dim} != CLIP embed_dim {embed_dim}", VOCAB_EMBEDDINGS)
        done.append(
            f"vocabulary ({len(vocab)} words, {int(vocab.nouns_mask().sum())} nouns, dim {vocab.dim})"
        )
        carried = self.verify_class_images()
        if carried:
            done.append(carried)
        recommended = {s: self.recommended(s) for s in RECOMMENDED_SECTIONS}
        if any(recommended.values()):
            done.append("recommended options: " + "; ".join(
                f"{s} {', '.join(f'{k}={v}' for k, v in values.items())}" for s, values in recommended.items() if values))
        return done

    def verify_class_images(self) -> str:
        """The class images the bundle carries: listed in bundle.json and in their index, PNG images of the
        bundle's image size (their hashes are checked with every file). "" when it carries none."""
        if CLASS_IMAGES_INDEX not in self.info["files"]:
            return ""
        from PIL import Image

        index = _read_json(self.root, CLASS_IMAGES_INDEX)
        try:
            prompt, count, steps = str(index["prompt"]), int(index["count"]), int(index["num_inference_steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"needs prompt, count and num_inference_steps: {e}", CLASS_IMAGES_INDEX) from None
        for n in range(count):
            rel = f"{CLASS_IMAGES_DIR}/{n:05d}.png"
            if rel not in self.info["files"]:
                raise BundleError(f"lists {count} images but {rel} is not in bundle.json", CLASS_IMAGES_INDEX)
            try:
                with Image.open(self.root / rel) as img:
                    size = img.size if img.format == "PNG" else None
            except OSError as e:
                raise BundleError(f"not an image: {e}", rel) from None
            if size != (self.image_size, self.image_size):
                raise BundleError(f"expected a {self.image_size} px PNG, got {size}", rel)
        return f"class images ({count} of {prompt!r}, {steps} denoising steps)"

    # -- recommended options ------------------------------------------------------------------------------------

    def recommended(self, section: str) -> dict[str, Any]:
        """The bundle's recommended values for one section of the request options ("localize", "learn",
        "schedule", "generate"): the defaults where a request leaves a field unset. {} when it has none."""
        if section not in RECOMMENDED_SECTIONS:
            raise ValueError(f"unknown section {section!r}")

        def build():
            if RECOMMENDED_JSON not in self.info["files"]:
                return {}
            data = _read_json(self.root, RECOMMENDED_JSON)
            for key, value in data.items():
                if key not in RECOMMENDED_SECTIONS or not isinstance(value, dict):
                    raise BundleError(f"{key!r} is not one of {RECOMMENDED_SECTIONS} with an object value",
                                      RECOMMENDED_JSON)
            return data

        return dict(self._cached("recommended", build).get(section) or {})

    def recommended_defaults(self, section: str, base):
        """`base` (a dataclass of options) with this bundle's recommended values of `section` applied; a key
        that is not a field of `base` is a BundleError (a typo must not be silently ignored)."""
        import dataclasses

        values = self.recommended(section)
        names = {f.name for f in dataclasses.fields(base)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise BundleError(f"unknown {section} option(s) {unknown}", RECOMMENDED_JSON)
        return dataclasses.replace(base, **values)

    # -- components -----------------------------------------------------------------------------------------------

    def _cached(self, key, build: Callable[[], Any]):
        with self._lock:
            if key not in self._cache:
                with MODEL_BUILD_LOCK:
                    self._cache[key] = build()
            return self._cache[key]

    def tokenizer(self):
        """The diffusion text encoder's CLIPTokenizer (from diffusion/tokenizer)."""

        def build():
            from transformers import CLIPTokenizer

            rel = f"{DIFFUSION_DIR}/tokenizer"
            try:
                return CLIPTokenizer.from_pretrained(str(self.root / rel), local_files_only=True)
            except Exception as e:  # noqa: BLE001 - transformers raises many kinds
                raise BundleError(f"cannot load tokenizer: {e}", rel) from None

        return self._cached("tokenizer", build)

    def load_diffusion(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """The StableDiffusionPipeline (no safety checker), on `device` in `dtype`."""

        def build():
            from diffusers import StableDiffusionPipeline

            try:
                pipe = StableDiffusionPipeline.from_pretrained(
                    str(self.root / DIFFUSION_DIR),
                    safety_checker=None,
                    requires_safety_checker=False,
                    local_files_only=True,
                    use_safetensors=True,
                    dtype=dtype,
                )
            except BundleError:
                raise
            except Exception as e:  # noqa: BLE001
                raise BundleError(f"cannot load the diffusion pipeline: {e}", DIFFUSION_DIR) from None
            pipe.set_progress_bar_config(disable=True)
            for m in (pipe.unet, pipe.vae, pipe.text_encoder):
                m.eval()
            return pipe.to(device)

        return self._cached(("diffusion", str(device), dtype), build)

    def _clip_cfg(self) -> dict:
        def build():
            raw = _read_json(self.root, CLIP_CONFIG)
            try:
                return normalise_open_clip_config(raw)
            except (ValueError, TypeError, KeyError) as e:
                raise BundleError(f"bad open_clip config: {e}", CLIP_CONFIG) from None

        return self._cached("clip_cfg", build)

    def load_clip(self, device: str | torch.device = "cpu"):
        """(open_clip model in eval mode, preprocess PIL -> [3,H,W] tensor, tokenizer list[str] -> LongTensor)."""

        def build():
            from open_clip.tokenizer import SimpleTokenizer

            cfg = self._clip_cfg()
            try:
                model = build_open_clip_model(cfg)
            except Exception as e:  # noqa: BLE001
                raise BundleError(f"cannot build the open_clip model: {e}", CLIP_CONFIG) from None
            state = _load_safetensors(self.root, CLIP_WEIGHTS)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise BundleError(f"weights do not match the config: {e}", CLIP_WEIGHTS) from None
            model.eval().to(device)
            preprocess = clip_image_transform(cfg["preprocess_cfg"])
            tok = SimpleTokenizer(context_length=int(cfg["text_cfg"].get("context_length", 77)))
            return model, preprocess, tok

        return self._cached(("clip", str(device)), build)

    def clip_onnx_path(self) -> Path:
        return self.root / CLIP_ONNX

    def clip_preprocess_cfg(self) -> dict:
        """{image_size, mean, std, interpolation, resize_mode} of the CLIP image encoder."""
        return dict(self._clip_cfg()["preprocess_cfg"])

    def onnx_session(self, providers: list | None = None):
        """An onnxruntime session for the CLIP image encoder (cached per provider list)."""

        def build():
            import onnxruntime as ort

            path = self.clip_onnx_path()
            if not path.is_file():
                raise BundleError("file not found", CLIP_ONNX)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            try:
                return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001
                raise BundleError(f"cannot load the onnx model: {e}", CLIP_ONNX) from None

        return self._cached(("onnx", tuple(providers or ())), build)

    def load_dino(self, device: str | torch.device = "cpu"):
        """(transformers ViTModel in eval mode, preprocess PIL -> [3,H,W] tensor). Use the CLS token."""

        def build():
            from transformers import ViTModel

            pre = _read_json(self.root, f"{DINO_DIR}/preprocessor_config.json")
            try:
                model = ViTModel.from_pretrained(
                    str(self.root / DINO_DIR),
                    local_files_only=True,
                    use_safetensors=True,
                    add_pooling_layer=False,
                    dtype=torch.float32,  # whatever the stored precision (float16 bundles)
                )
            except Exception as e:  # noqa: BLE001
                raise BundleError(f"cannot load the DINO model: {e}", DINO_DIR) from None
            model.eval().to(device)
            return model, dino_transform(pre)

        return self._cached(("dino", str(device)), build)

    def load_vocabulary(self) -> Vocabulary:
        def build():
            words, pos, freq = read_vocab_tsv(self.root / VOCAB_TSV)
            tensors = _load_safetensors(self.root, VOCAB_EMBEDDINGS)
            for key in ("text", "image_mean"):
                if key not in tensors:
                    raise BundleError(f"no tensor {key!r}", VOCAB_EMBEDDINGS)
            text = tensors["text"].float()
            image_mean = tensors["image_mean"].float()
            if text.ndim != 2 or text.shape[0] != len(words):
                raise BundleError(
                    f"text has shape {tuple(text.shape)}, expected [{len(words)}, D]", VOCAB_EMBEDDINGS
                )
            if image_mean.shape != (text.shape[1],):
                raise BundleError(f"image_mean has shape {tuple(image_mean.shape)}", VOCAB_EMBEDDINGS)
            if "text_plain" in tensors:
                plain = tensors["text_plain"].float()
                if plain.shape != text.shape:
                    raise BundleError(f"text_plain has shape {tuple(plain.shape)}, expected {tuple(text.shape)}",
                                      VOCAB_EMBEDDINGS)
            else:  # a bundle made before the plain embeddings were stored: compute them as assemble would
                import logging

                from services.common.assemble import embed_words

                logging.getLogger("ice.bundle").warning(
                    "%s has no text_plain (an older bundle): computing the plain text embeddings of %d words "
                    "from its CLIP text tower", VOCAB_EMBEDDINGS, len(words))
                model, _, tokenize = self.load_clip()
                plain = embed_words(model, tokenize, words)
            return Vocabulary(words=words, pos=pos, frequency=freq, text=text, image_mean=image_mean, plain=plain)

        return self._cached("vocab", build)


def open_bundle(path: str | Path, *, verify_hashes: bool = False) -> Bundle:
    return Bundle.open(path, verify_hashes=verify_hashes)
