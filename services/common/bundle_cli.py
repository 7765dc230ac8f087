"""`ice-bundle`: make, assemble and verify model bundles.

    ice-bundle tiny --out DIR [--seed N] [--force]
    ice-bundle assemble --out DIR --diffusion DIR --open-clip-config FILE --open-clip-weights FILE --dino DIR \\
        [--vocab FILE [--vocab-size N]] [--image-mean-from DIR|FILE] [--name NAME] [--precision float16] [--force]
    ice-bundle image-mean PHOTOS_DIR --out mean.npy (--bundle DIR | --open-clip-config FILE --open-clip-weights FILE)
    ice-bundle class-images DIR [--prompt P] [--count N] [--steps S] [--device D] [--force]
    ice-bundle verify DIR

Exit codes: 0 ok, 1 a bundle problem (one line naming the file on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from services.common.errors import BundleError

# The shipped default concept vocabulary (package data of the localizer, which owns the retriever).
DEFAULT_VOCAB = Path(__file__).resolve().parents[1] / "localizer" / "data" / "default_vocab.tsv"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _summary(root: Path, t0: float) -> None:
    from services.common.bundle import Bundle

    b = Bundle.open(root)
    _say(
        f"bundle {b.name} ({b.info['kind']}) at {root}: {len(b.info['files'])} files, "
        f"{_size(root) / 1e6:.1f} MB, image_size {b.image_size}, precision {b.precision}, "
        f"digest {b.digest}, {time.perf_counter() - t0:.1f}s"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ice-bundle", description="Make, assemble and verify ICE model bundles.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny", help="generate the tiny deterministic random bundle (tests, offline demo)")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="replace --out if it exists")

    a = sub.add_parser("assemble", help="assemble a bundle from real local weights")
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--diffusion", required=True, type=Path, help="diffusers Stable Diffusion directory")
    a.add_argument("--open-clip-config", required=True, type=Path, help="open_clip model config JSON")
    a.add_argument("--open-clip-weights", required=True, type=Path, help="open_clip weights (.safetensors)")
    a.add_argument("--dino", required=True, type=Path, help="transformers ViT (DINO) directory")
    a.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB,
                   help="vocabulary: our TSV (word, pos, frequency) or SpLiCE's file as distributed (one word a "
                        "line, least to most frequent, optional ', count'; e.g. laion.txt), told apart by the first "
                        "line (default: the shipped 15,000-word vocabulary, "
                        "services/localizer/data/default_vocab.tsv)")
    a.add_argument("--vocab-format", choices=["auto", "tsv", "splice"], default="auto",
                   help="format of --vocab (default: auto)")
    a.add_argument("--vocab-size", type=int, default=None,
                   help="keep the N most frequent words (SpLiCE's file: default 15000, its last 15,000 lines, as "
                        "the published retriever; our TSV: default all)")
    a.add_argument(
        "--image-mean-from", type=Path, default=None,
        help="the CLIP image mean: a folder of photos (searched recursively), or a precomputed mean (.npy or "
             ".safetensors, e.g. from `ice-bundle image-mean`); default: scikit-image's 15 sample photos",
    )
    a.add_argument("--name", default=None)
    a.add_argument("--version", default="1")
    a.add_argument("--precision", default="float16", choices=["float32", "float16", "bfloat16"])
    a.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    a.add_argument("--recommended", type=Path, default=None,
                   help="JSON of this bundle's own defaults for request options "
                        '({"localize": {"merge_threshold": 0.005}, "schedule": {...}, "generate": {...}})')
    a.add_argument("--kind", default="assembled", help=argparse.SUPPRESS)
    a.add_argument("--force", action="store_true", help="replace --out if it exists")

    m = sub.add_parser("image-mean", help="compute the retriever's CLIP image mean from a folder of photos")
    m.add_argument("photos", type=Path, help="folder of photos (searched recursively), e.g. MSCOCO train2017")
    m.add_argument("--out", required=True, type=Path, help="mean.npy or mean.safetensors")
    m.add_argument("--bundle", type=Path, default=None, help="use this bundle's CLIP")
    m.add_argument("--open-clip-config", type=Path, default=None, help="or an open_clip model config JSON ...")
    m.add_argument("--open-clip-weights", type=Path, default=None, help="... and its weights (.safetensors)")

    c = sub.add_parser("class-images", help="generate the bundle's prior-preservation class images once and make "
                                            "them part of it (learners then take them instead of generating)")
    c.add_argument("dir", type=Path)
    c.add_argument("--prompt", default=None, help="class prompt (default: the one of the bundle's recommended "
                                                  "schedule, else the published 'a photo at the beach')")
    c.add_argument("--count", type=int, default=None,
                   help="images (default: as many as a job of the bundle's recommended schedule uses: "
                        "min(num_class_images, its total steps))")
    c.add_argument("--steps", type=int, default=50, help="denoising steps per image (the learner's "
                                                         "--class-image-steps; default 50)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda[:N]")
    c.add_argument("--force", action="store_true", help="make them again when the bundle carries some")

    v = sub.add_parser("verify", help="check hashes and load every component")
    v.add_argument("dir", type=Path)
    return p


def _clip_for_mean(args):
    """(open_clip model, preprocess) from --bundle or --open-clip-config/--open-clip-weights."""
    import json

    from services.common import bundle as B

    if args.bundle is not None:
        if args.open_clip_config or args.open_clip_weights:
            raise ValueError("give --bundle or --open-clip-config/--open-clip-weights, not both")
        model, preprocess, _ = B.Bundle.open(args.bundle).load_clip()
        return model, preprocess
    if args.open_clip_config is None or args.open_clip_weights is None:
        raise ValueError("image-mean needs --bundle DIR, or --open-clip-config FILE and --open-clip-weights FILE")
    if args.open_clip_weights.suffix != ".safetensors":
        raise BundleError("open_clip weights must be a .safetensors file (pickles are refused)",
                          str(args.open_clip_weights))
    try:
        cfg = B.normalise_open_clip_config(json.loads(args.open_clip_config.read_text(encoding="utf-8")),
                                           model_name=args.open_clip_config.stem)
    except FileNotFoundError:
        raise BundleError("file not found", str(args.open_clip_config)) from None
    except (ValueError, TypeError, KeyError) as e:
        raise BundleError(f"bad open_clip config: {e}", str(args.open_clip_config)) from None
    model = B.build_open_clip_model(cfg)
    from safetensors.torch import load_file

    if not args.open_clip_weights.is_file():
        raise BundleError("file not found", str(args.open_clip_weights))
    try:
        model.load_state_dict({k: v.float() for k, v in load_file(str(args.open_clip_weights)).items()}, strict=True)
    except RuntimeError as e:
        raise BundleError(f"weights do not match the config: {e}", str(args.open_clip_weights)) from None
    return model.eval(), B.clip_image_transform(cfg["preprocess_cfg"])


def _read_recommended(path: Path | None) -> dict | None:
    import json

    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read the recommended options: {e}", str(path)) from None
    if not isinstance(data, dict):
        raise BundleError("expected a JSON object", str(path))
    return data


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t0 = time.perf_counter()
    try:
        if args.command == "tiny":
            from services.common.tiny_bundle import build_tiny_bundle

            build_tiny_bundle(args.out, seed=args.seed, force=args.force, progress=_say)
            _summary(args.out, t0)
        elif args.command == "assemble":
            from services.common.assemble import assemble_bundle

            assemble_bundle(
                args.out,
                args.diffusion,
                args.open_clip_config,
                args.open_clip_weights,
                args.dino,
                args.vocab,
                image_mean_from=args.image_mean_from,
                vocab_format=args.vocab_format,
                vocab_size=args.vocab_size,
                name=args.name,
                version=args.version,
                precision=args.precision,
                force=args.force,
                link=not args.copy,
                recommended=_read_recommended(args.recommended),
                kind=args.kind,
                progress=_say,
            )
            _summary(args.out, t0)
        elif args.command == "class-images":
            from services.common.service import resolve_device
            from services.learner.class_images import add_to_bundle

            add_to_bundle(args.dir, prompt=args.prompt, count=args.count, steps=args.steps,
                          device=resolve_device(args.device), force=args.force, progress=_say)
            _summary(args.dir, t0)
        elif args.command == "image-mean":
            from services.common.assemble import image_mean_from_folder, write_image_mean

            if args.out.suffix.lower() not in (".npy", ".safetensors"):
                raise ValueError(f"--out {args.out}: write the mean as .npy or .safetensors")
            model, preprocess = _clip_for_mean(args)
            mean, count = image_mean_from_folder(args.photos, model, preprocess, progress=_say)
            write_image_mean(mean, args.out, count, source=args.photos.name)
            _say(f"image mean of {count} images (dim {mean.shape[0]}) written to {args.out}; use it with "
                 f"`ice-bundle assemble --image-mean-from {args.out}`")
        else:
            from services.common.bundle import Bundle

            _say(f"verifying {args.dir}")
            bundle = Bundle.open(args.dir)
            for check in bundle.verify():
                _say(f"  ok: {check}")
            _summary(args.dir, t0)
    except BundleError as e:
        print(f"ice-bundle: bundle error: {e}", file=sys.stderr)
        return 1
    except (FileExistsError, ValueError) as e:
        print(f"ice-bundle: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
