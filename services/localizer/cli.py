"""Run the localizer in-process on an image file and write its masks and an overlay.

    python -m services.localizer.cli IMAGE --bundle DIR --out DIR [--json] [--max-concepts N] [...]

Writes ``mask_<k>_<noun>.png`` per concept (255 inside, at the image's resolution), ``overlay.png`` (the masks
coloured over the image, each labelled with its noun) and ``concepts.json``; `--json` also prints that JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from services.common.bundle import Bundle
from services.common.errors import IceError
from services.common.images import decode_image, encode_mask
from services.common.service import compute_dtype, resolve_device
from services.localizer.pipeline import LocalizeOptions, Localizer, LocalizeResult
from services.localizer.retriever import onnx_providers

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]  # fmt: skip


def overlay(image: Image.Image, result: LocalizeResult, alpha: float = 0.5) -> Image.Image:
    """The image with each concept's mask tinted in its own colour and its noun written at the mask's centre."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    for k, concept in enumerate(result.concepts):
        colour = np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float32)
        base[concept.mask] = (1 - alpha) * base[concept.mask] + alpha * colour
    out = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for k, concept in enumerate(result.concepts):
        ys, xs = np.nonzero(concept.mask)
        x, y = int(xs.mean()), int(ys.mean())
        label = f"{k}: {concept.noun}"
        box = draw.textbbox((x, y), label)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x, y), label, fill=PALETTE[k % len(PALETTE)])
    return out


def write_outputs(image: Image.Image, result: LocalizeResult, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    concepts = []
    for k, c in enumerate(result.concepts):
        name = f"mask_{k}_{re.sub(r'[^A-Za-z0-9_-]+', '_', c.noun)}.png"  # a user vocabulary may hold anything
        (out / name).write_bytes(encode_mask(c.mask))
        concepts.append({"concept_id": f"c{k}", "noun": c.noun, "mask": name, "area_fraction": c.area_fraction,
                         "round": c.round, "retrieval": [{"word": w, "weight": v} for w, v in c.retrieval]})
    overlay(image, result).save(out / "overlay.png")
    summary = {"width": result.width, "height": result.height, "rounds": result.rounds,
               "stop_reason": result.stop_reason, "remaining_fraction": result.remaining_fraction,
               "uncovered_fraction": result.uncovered_fraction,
               "concepts": concepts, "timings": [{"stage": s, "seconds": t} for s, t in result.timings]}
    (out / "concepts.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.localizer.cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", type=Path)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--kl-backend", default="auto", choices=("auto", "triton", "torch"))
    # unset options take the published values, or the bundle's recommended ones (recommended.json)
    ap.add_argument("--max-concepts", type=int, default=None)
    ap.add_argument("--max-rounds", type=int, default=None)
    ap.add_argument("--remaining-fraction-threshold", type=float, default=None)
    ap.add_argument("--l1-penalty", type=float, default=None)
    ap.add_argument("--min-area-fraction", type=float, default=None)
    ap.add_argument("--merge-threshold", type=float, default=None)
    ap.add_argument("--merge-rounds", type=int, default=None)
    ap.add_argument("--timestep", type=int, default=None)
    ap.add_argument("--refinement", default=None, choices=("kmeans", "none"))
    args = ap.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(LocalizeOptions)
             if getattr(args, f.name, None) is not None}
    try:
        image = decode_image(args.image.read_bytes(), field=str(args.image))
        device = resolve_device(args.device)
        localizer = Localizer(Bundle.open(args.bundle), device=device, dtype=compute_dtype(device),
                              onnx_providers=onnx_providers("auto"), kl_backend=args.kl_backend)  # fmt: skip
        result = localizer.localize(image, dataclasses.replace(localizer.defaults, **given))
    except (IceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = write_outputs(image, result, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{len(result.concepts)} concepts in {result.rounds} rounds ({result.stop_reason}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
