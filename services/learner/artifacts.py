"""A learning job's artifact folder, and putting it onto a diffusers pipeline.

    learned_embeds.safetensors        {token: [D]} for every learned token
    manifest.json                     tokens (role, concept, noun, attribute), anchors, masks, base bundle digest,
                                      schedule, ablation, seed, the refinement delta's file
    masks/{concept_id}.png            each concept's mask on the training square
    unet_delta.safetensors            full refinement: trained − base, per UNet weight       (or)
    pytorch_lora_weights.safetensors  LoRA refinement, in diffusers' format (`pipe.load_lora_weights(folder)`)

diffusers' `load_textual_inversion` reads one token per state dict, so `apply_artifacts` passes the file's
entries as a list: `pipe.load_textual_inversion([{t: v} for t, v in sd.items()], token=list(sd))`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from services.common.bundle import MODEL_BUILD_LOCK, sha256_file
from services.common.images import encode_mask

EMBEDS = "learned_embeds.safetensors"
MANIFEST = "manifest.json"
UNET_DELTA = "unet_delta.safetensors"
LORA = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class ArtifactFile:
    name: str
    size_bytes: int
    sha256: str


def write_artifacts(folder: Path, result, spec, bundle_digest: str) -> list[ArtifactFile]:
    """Write every artifact of a finished job (atomically per file) and return them with their hashes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    names = [EMBEDS, MANIFEST]

    def atomic(name: str, write) -> None:
        tmp = folder / f".{Path(name).name}.tmp"
        write(tmp)
        os.replace(tmp, folder / name)

    atomic(EMBEDS, lambda p: save_file({t: v.contiguous() for t, v in result.embeddings.items()}, str(p),
                                       metadata={"format": "pt"}))
    for c in spec.concepts:
        name = f"masks/{c.concept_id}.png"
        atomic(name, lambda p, c=c: p.write_bytes(encode_mask(np.asarray(c.mask))))
        names.append(name)
    delta_file = None
    if result.unet_delta is not None:
        delta_file = UNET_DELTA
        atomic(UNET_DELTA, lambda p: save_file(result.unet_delta, str(p), metadata={"format": "pt"}))
    elif result.lora is not None:
        delta_file = LORA
        # diffusers' LoRA files name the UNet's keys "unet.…"
        lora = {f"unet.{k}": v for k, v in result.lora.items()}
        atomic(LORA, lambda p: save_file(lora, str(p), metadata={"format": "pt"}))
    if delta_file:
        names.append(delta_file)
    manifest = {
        "tokens": [t.to_json() for t in result.tokens],
        "anchors": list(spec.anchors),
        "concepts": [{"concept_id": c.concept_id, "noun": c.noun, "mask": f"masks/{c.concept_id}.png"}
                     for c in spec.concepts],
        "base_bundle_digest": bundle_digest,
        "schedule": dict(vars(spec.schedule)),
        "ablation": spec.ablation,
        "refinement": spec.refinement if delta_file else "none",
        "lora_rank": spec.lora_rank if delta_file == LORA else None,
        "unet_delta": delta_file,
        "seed": spec.seed,
        "image_size": spec.image.size[0],
    }
    atomic(MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8"))
    return [ArtifactFile(n, (folder / n).stat().st_size, sha256_file(folder / n)) for n in names]


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


@torch.no_grad()
def apply_artifacts(pipe, folder: Path) -> dict:
    """Load a job's tokens (and its UNet delta or LoRA) onto `pipe`, a pipeline of the job's bundle that no
    one else uses. Returns the manifest."""
    manifest = read_manifest(folder)
    embeds = load_file(str(folder / EMBEDS))
    dtype = pipe.text_encoder.get_input_embeddings().weight.dtype
    with MODEL_BUILD_LOCK:  # new embedding rows and LoRA layers are parameters: see services.common.bundle
        pipe.load_textual_inversion([{t: v.to(dtype)} for t, v in embeds.items()], token=list(embeds))
        if manifest.get("unet_delta") == UNET_DELTA:
            add_unet_delta(pipe, folder / UNET_DELTA)
        elif manifest.get("unet_delta") == LORA:
            pipe.load_lora_weights(str(folder), weight_name=LORA)
    return manifest


@torch.no_grad()
def add_unet_delta(pipe, path: Path) -> None:
    """Add a full refinement delta (`unet_delta.safetensors`: trained − base, per weight) to the pipeline's UNet."""
    params = dict(pipe.unet.named_parameters())
    for name, d in load_file(str(path)).items():
        params[name].add_(d.to(params[name].device, params[name].dtype))
