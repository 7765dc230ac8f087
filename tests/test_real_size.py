"""Real-size tooling that runs without real-size memory: the random-weight configurations are SD-2.1-base's, ViT-B-32's
and DINO ViT-S/16's (parameter counts, built on `meta`); the GPU script runs end to end on the CPU path and writes
its figures; latency histograms reach the durations real stages take."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_the_random_weights_have_the_real_architectures():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from real_size import DINO_VITS16, SD21_BASE_UNET, SD21_TEXT_ENCODER, SD_VAE
    from transformers import CLIPTextConfig, CLIPTextModel, ViTConfig, ViTModel

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        assert count(UNet2DConditionModel(**SD21_BASE_UNET)) == 865_910_724  # stable-diffusion-2-1-base
        assert count(CLIPTextModel(CLIPTextConfig(**SD21_TEXT_ENCODER))) == 340_387_840  # OpenCLIP ViT-H text
        assert count(AutoencoderKL(**SD_VAE)) == 83_653_863
        assert count(ViTModel(ViTConfig(**DINO_VITS16), add_pooling_layer=False)) == 21_665_664  # ViT-S/16


def test_stage_histograms_reach_real_stage_durations():
    from services.common.interceptors import HANDLING
    from services.learner.jobs import JOB_DURATION
    from services.localizer.server import STAGE_SECONDS

    def finite(histogram) -> list[float]:
        return [b for b in histogram._upper_bounds if b != float("inf")]

    # one attention pass at SD-2.1 size on a busy CPU took over a minute: it must land in a bucket of its own
    assert any(60 < b <= 300 for b in finite(STAGE_SECONDS)) and max(finite(STAGE_SECONDS)) >= 600
    assert max(finite(HANDLING)) >= 86400  # watch streams and long Generate calls last hours
    assert max(finite(JOB_DURATION)) >= 86400  # a published-schedule job on a CPU takes most of a day


def test_the_gpu_script_runs_on_the_cpu_path(tiny_bundle_dir, tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--bundle",
                           str(tiny_bundle_dir), "--quick", "--no-compile", "--out", str(out), "--only", "train,kl,localizer"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    train = report["train"][0]
    for phase in ("object_level", "refinement"):
        assert train[phase]["steps_per_s"] > 0 and train[phase]["seconds_per_step"] > 0
    assert train["estimate_gib"] > 0 and train["estimate_parts_gib"]["optimizer"] > 0
    kl = report["kl"]
    assert kl["torch_eager_ms"] > 0 and kl["triton"].startswith("skipped")
    assert "--no-compile" in kl["torch_compiled_error"]
    assert report["localizer"]["rounds"] >= 1 and report["localizer"]["seconds_per_round"] > 0
    assert report["device"].startswith("cpu")
