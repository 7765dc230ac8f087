"""A bundle's own recommended options, float16 storage, and the training target of v-prediction bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from services.common import assemble as A
from services.common.bundle import Bundle
from services.common.errors import BundleError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def recommended_bundle(tiny_bundle_dir, tmp_path) -> Path:
    root = _copy(tiny_bundle_dir, tmp_path / "bundle")
    A.set_recommended(root, {
        "localize": {"merge_threshold": 0.0123, "timestep": 300},
        "learn": {"anchors": ["color", "texture"]},
        "schedule": {"phase1_steps": 7, "class_prompt": "things"},
        "generate": {"num_inference_steps": 9, "guidance_scale": 3.5},
    })
    return root


def test_recommended_options_are_hashed_and_change_the_digest(tiny_bundle_dir, recommended_bundle):
    b = Bundle.open(recommended_bundle, verify_hashes=True)
    assert "recommended.json" in b.info["files"]
    assert b.digest != Bundle.open(tiny_bundle_dir).digest
    (recommended_bundle / "recommended.json").write_text('{"localize": {"merge_threshold": 9}}')
    with pytest.raises(BundleError, match="recommended.json"):
        Bundle.open(recommended_bundle, verify_hashes=True)


def test_localizer_uses_the_bundle_defaults_and_requests_override_them(recommended_bundle):
    from ice.localizer.v1 import localizer_pb2
    from services.localizer.pipeline import Localizer
    from services.localizer.server import options_from_proto

    loc = Localizer(Bundle.open(recommended_bundle))
    assert (loc.defaults.merge_threshold, loc.defaults.timestep) == (0.0123, 300)
    assert loc.defaults.max_rounds == 11  # what the bundle does not set stays published
    unset = options_from_proto(localizer_pb2.LocalizeOptions(), 0, loc.defaults)
    assert (unset.merge_threshold, unset.timestep) == (0.0123, 300)
    given = options_from_proto(localizer_pb2.LocalizeOptions(merge_threshold=0.5), 0, loc.defaults)
    assert given.merge_threshold == 0.5 and given.timestep == 300


def test_learner_takes_anchors_schedule_and_sampler_from_the_bundle(recommended_bundle, photo_png):
    import numpy as np

    from client.options import mask_png
    from ice.learner.v1 import learner_pb2
    from services.common.settings import LearnerSettings
    from services.learner.generate import generation_defaults
    from services.learner.server import parse_request

    bundle = Bundle.open(recommended_bundle)
    mask = np.zeros((400, 600), bool)
    mask[100:300, 200:400] = True
    request = learner_pb2.CreateLearningJobRequest(
        image=photo_png, concepts=[learner_pb2.ConceptInput(noun="cup", mask=mask_png(mask))])
    spec = parse_request(request, bundle, LearnerSettings())
    assert spec.anchors == ["color", "texture"]
    assert spec.schedule.phase1_steps == 7 and spec.schedule.class_prompt == "things"
    assert spec.schedule.phase2_steps == 400  # unset by the bundle: the published value
    request.intrinsic_anchors[:] = ["material"]
    request.schedule.phase1_steps = 3
    spec = parse_request(request, bundle, LearnerSettings())
    assert spec.anchors == ["material"] and spec.schedule.phase1_steps == 3
    d = generation_defaults(bundle)
    assert (d.num_images, d.num_inference_steps, d.guidance_scale) == (8, 9, 3.5)


def test_a_misspelt_recommended_option_is_an_error_naming_the_file(tiny_bundle_dir, tmp_path):
    from services.localizer.pipeline import Localizer

    root = _copy(tiny_bundle_dir, tmp_path / "bundle")
    A.set_recommended(root, {"localize": {"merge_treshold": 0.01}})
    with pytest.raises(BundleError, match=r"recommended.json.*merge_treshold|merge_treshold.*recommended"):
        Localizer(Bundle.open(root))
    with pytest.raises(BundleError, match="recommended.json"):
        A.set_recommended(root, {"localise": {}})


def _dtypes(path: Path) -> set:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_float16_assembly_halves_the_weights_and_keeps_the_vae_float32(tiny_bundle_dir, tmp_path):
    src = tiny_bundle_dir
    dino = _copy(src / "dino", tmp_path / "dino")
    dino_file = dino / "model.safetensors"
    dino_file.chmod(0o600)  # a private source file: the bundle must still be readable by everyone
    out = A.assemble_bundle(tmp_path / "b16", src / "diffusion", src / "clip/open_clip_config.json",
                            src / "clip/open_clip_model.safetensors", dino, src / "vocab/vocab.tsv",
                            precision="float16")
    unet = out / "diffusion/unet/diffusion_pytorch_model.safetensors"
    assert _dtypes(unet) == {"F16"}
    assert _dtypes(out / "clip/open_clip_model.safetensors") <= {"F16", "I64"}
    assert _dtypes(out / "diffusion/vae/diffusion_pytorch_model.safetensors") == {"F32"}
    ratio = unet.stat().st_size / (src / "diffusion/unet/diffusion_pytorch_model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    assert (out / "dino/model.safetensors").stat().st_mode & 0o044 == 0o044
    assert _dtypes(dino_file) == {"F32"}  # the source was not rewritten through a hard link
    b = Bundle.open(out)
    assert b.precision == "float16"
    b.verify()  # every component loads (in float32 on this CPU) and the ONNX encoder matches the weights
    model, _ = b.load_dino()
    assert next(model.parameters()).dtype == torch.float32


def _v_prediction_bundle(src: Path, dst: Path) -> Path:
    root = _copy(src, dst)
    cfg_path = root / "diffusion/scheduler/scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_path.write_text(json.dumps(cfg))
    info = json.loads((root / "bundle.json").read_text())
    A.write_bundle_json(root, name=info["name"], version=info["version"], kind=info["kind"],
                        precision=info["precision"], components=info["components"])
    return root


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_learner_trains_on_the_schedulers_own_target(prediction, tiny_bundle_dir, photo_png, tmp_path):
    """ε-prediction learns the noise; v-prediction (SD-2.x 768, zero-terminal-SNR bundles) the velocity."""
    import io

    import numpy as np
    from PIL import Image

    from services.common.images import center_crop_resize
    from services.learner.trainer import Concept, LearningSpec, Schedule, Trainer

    root = tiny_bundle_dir if prediction == "epsilon" else _v_prediction_bundle(tiny_bundle_dir, tmp_path / "v")
    bundle = Bundle.open(root)
    img = center_crop_resize(Image.open(io.BytesIO(photo_png)).convert("RGB"), 64)
    mask = np.zeros((64, 64), bool)
    mask[10:50, 10:50] = True
    schedule = Schedule(phase1_steps=1, phase2_steps=0, refinement_steps=0, num_class_images=0, checkpoint_every=0)
    tr = Trainer(bundle, LearningSpec(img, [Concept("c0", "cup", mask)], schedule=schedule, seed=0), tmp_path / "j")
    tr.prepare()
    assert tr.noise_scheduler.config.prediction_type == prediction
    mean, std = tr.instance_latents[0]
    t = torch.tensor([600])
    state = tr.generator.get_state()
    noisy, target = tr._noisy(mean, std, t)
    tr.generator.set_state(state)  # replay the same draws by hand
    latents = (mean + std * torch.randn(mean.shape, generator=tr.generator)) * tr.scaling
    noise = torch.randn(latents.shape, generator=tr.generator)
    noise = noise + schedule.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=tr.generator)
    a = tr.noise_scheduler.alphas_cumprod[600]
    assert torch.allclose(noisy, a.sqrt() * latents + (1 - a).sqrt() * noise, atol=1e-5)
    expected = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    assert torch.allclose(target, expected, atol=1e-5)
    assert not torch.allclose(noise, a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-3)  # they differ
