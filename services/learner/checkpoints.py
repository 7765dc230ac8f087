"""Durable training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory `step-{N:07d}/` holding `tensors.safetensors` and `state.json`; the JSON records
the SHA-256 of the tensor file. It is written to a temporary directory, fsynced and renamed into place, so a
crash leaves either the whole checkpoint or none. `load_latest` walks from the newest checkpoint down and
skips any whose checksum or JSON does not verify.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.common.bundle import sha256_file

log = logging.getLogger("ice.learner.checkpoints")

TENSORS = "tensors.safetensors"
STATE = "state.json"
KEEP = 2  # the newest checkpoints kept; older ones are deleted after a new one is in place


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
    with open(tmp / TENSORS, "rb") as f:
        os.fsync(f.fileno())
    doc = {"step": step, "tensors_sha256": sha256_file(tmp / TENSORS), "state": state}
    with open(tmp / STATE, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(step, tensors, state) of the newest checkpoint that verifies, or None."""
    if not root.is_dir():
        return None
    for path in sorted(root.glob("step-*"), reverse=True):
        try:
            doc = json.loads((path / STATE).read_text(encoding="utf-8"))
            if sha256_file(path / TENSORS) != doc["tensors_sha256"]:
                raise ValueError("checksum mismatch")
            return int(doc["step"]), load_file(str(path / TENSORS)), doc["state"]
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("checkpoint %s is unusable (%s); trying an older one", path, exc)
    return None


# -- flattening optimizer state and RNG states ------------------------------------------------------------------


def optimizer_to_flat(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                        prefix: str = "optim") -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def python_rng_from_json(data: list) -> tuple:
    return (data[0], tuple(data[1]), data[2])
