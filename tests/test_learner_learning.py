"""Learning is real on the tiny bundle: phase 1 moves E(<&0>) toward its noun and E(<*0>) away from it, and
the masked reconstruction loss (averaged over fixed timesteps and noise) falls. The artifacts of a short
three-phase run load into the bundle's diffusers pipeline and generate an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from services.learner import artifacts as A
from services.learner import generate as G
from services.learner.tokens import CONCEPT, INSTANCE, ExtendedEmbedding, plan_tokens
from services.learner.trainer import OBJECT_LEVEL, Concept, LearningSpec, Schedule, Trainer


def _image_and_mask(photo_png, size=64):
    import io

    from services.common.images import center_crop_resize

    img = center_crop_resize(Image.open(io.BytesIO(photo_png)).convert("RGB"), size)
    mask = np.zeros((size, size), bool)
    mask[16:48, 12:52] = True
    return img, mask


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


@torch.no_grad()
def _masked_loss(tr: Trainer, prompt: str) -> float:
    """Masked reconstruction of the unflipped image at fixed timesteps and fixed noise."""
    g = torch.Generator().manual_seed(1234)
    mean, _std = tr.instance_latents[0]
    latents = mean * tr.scaling
    ids = tr.tokens.input_ids([prompt], "cpu")
    hidden = tr.text_encoder(input_ids=ids)[0]
    total = 0.0
    for t in (100, 300, 500, 700, 900):
        noise = torch.randn(latents.shape, generator=g)
        tt = torch.tensor([t])
        pred = tr.unet(tr.noise_scheduler.add_noise(latents, noise, tt), tt, encoder_hidden_states=hidden).sample
        total += float(((pred - noise) ** 2 * torch.nn.functional.interpolate(
            tr.masks[0][:1], size=pred.shape[-2:])).mean())
    if tr.store is not None:
        tr.store.clear()
    return total / 5


def test_token_plan_and_extended_embedding():
    specs = plan_tokens([("c0", "cup"), ("c1", "table")], ["texture", "material", "color"])
    assert [s.token for s in specs] == ["<*0>", "<*1>", "<&0>", "<&1>", "<#0>", "<#1>", "<%0>", "<%1>", "<$0>", "<$1>"]
    base = torch.nn.Embedding(5, 3)
    emb = ExtendedEmbedding(base, torch.arange(6.0).reshape(2, 3))
    out = emb(torch.tensor([[0, 6, 4, 5]]))
    assert torch.equal(out[0, 1], torch.tensor([3.0, 4.0, 5.0])) and torch.equal(out[0, 0], base.weight[0])
    out.sum().backward()
    assert base.weight.grad is None and emb.new.grad is not None


def test_phase1_moves_concept_token_to_its_noun_and_instance_token_away(tiny_bundle, photo_png, tmp_path):
    img, mask = _image_and_mask(photo_png, tiny_bundle.image_size)
    # The learning rate is raised from 5e-4 to 2e-2 so that 30 steps on the tiny random model move the tokens
    # measurably; prior preservation is off (it does not touch the tokens in phase 1).
    schedule = Schedule(phase1_steps=30, phase2_steps=0, refinement_steps=0, embedding_learning_rate=2e-2,
                        num_class_images=0, checkpoint_every=0)
    spec = LearningSpec(img, [Concept("c0", "cup", mask)], schedule=schedule, seed=0)
    tr = Trainer(tiny_bundle, spec, tmp_path)
    tr.prepare()
    tr.enter_phase(OBJECT_LEVEL)
    tok = tr.tokens
    noun = tr.word_e["cup"]
    prompt = "a photo of a <*0><&0>"
    with torch.no_grad():
        before = tok.encode(["<&0>", "<*0>"], "cpu")
    loss_before = _masked_loss(tr, prompt)
    # both tokens start at the first BPE token of the noun: identical rows, identical E(·)
    assert torch.equal(tok.new[tok.rows(CONCEPT)], tok.new[tok.rows(INSTANCE)])
    for step in range(schedule.phase1_steps):
        tr.step(step)
    with torch.no_grad():
        after = tok.encode(["<&0>", "<*0>"], "cpu")
    loss_after = _masked_loss(tr, prompt)
    print(f"cos(<&0>, cup) {_cos(before[0], noun):.4f} -> {_cos(after[0], noun):.4f}; "
          f"cos(<*0>, cup) {_cos(before[1], noun):.4f} -> {_cos(after[1], noun):.4f}; "
          f"masked loss {loss_before:.5f} -> {loss_after:.5f}")
    assert _cos(after[0], noun) > _cos(before[0], noun) + 0.01
    assert _cos(after[1], noun) < _cos(before[1], noun) - 0.01
    assert loss_after < loss_before


@pytest.fixture(scope="module")
def trained(tiny_bundle, photo_png, tmp_path_factory):
    img, mask = _image_and_mask(photo_png, tiny_bundle.image_size)
    work = tmp_path_factory.mktemp("learn")
    spec = LearningSpec(img, [Concept("c0", "cup", mask), Concept("c1", "table", ~mask)],
                        schedule=Schedule(6, 6, 4, num_class_images=2, checkpoint_every=0), refinement="lora",
                        lora_rank=2, seed=7)
    result = Trainer(tiny_bundle, spec, work, class_image_steps=2).run()
    files = A.write_artifacts(work / "artifacts", result, spec, tiny_bundle.digest)
    return spec, result, work / "artifacts", files


def test_artifacts_load_into_the_pipeline_and_generate(trained, tiny_bundle):
    spec, result, folder, files = trained
    names = {f.name for f in files}
    assert {A.EMBEDS, A.MANIFEST, A.LORA, "masks/c0.png", "masks/c1.png"} <= names
    manifest = A.read_manifest(folder)
    assert manifest["base_bundle_digest"] == tiny_bundle.digest and manifest["seed"] == 7
    assert len(manifest["tokens"]) == 2 * (2 + 3)
    pipe = G.load_pipeline(tiny_bundle, folder)
    assert pipe.get_active_adapters()
    # the pipeline's text encoder now holds exactly the learned vectors
    emb = pipe.text_encoder.get_input_embeddings().weight
    for token, vector in result.embeddings.items():
        assert torch.equal(emb[pipe.tokenizer.convert_tokens_to_ids(token)], vector)
    prompts = G.object_level_prompts(manifest, ["c0"]) + G.intrinsic_prompts(manifest, ["c1"])
    assert prompts[0].text == "a photo of <&0><#0><%0><$0>"
    assert [p.text for p in prompts[1:]] == ["a <#1> texture", "a <%1> material", "a <$1> color", "a <&1>"]
    (prompt, index, seed, image), = list(G.generate(pipe, prompts[:1], 1, 11, steps=2))
    assert image.size == (tiny_bundle.image_size,) * 2 and seed == 11


def test_refinement_delta_base_is_the_bundles_own_unet(tiny_bundle):
    import pytest

    from services.common.errors import BundleError
    from services.learner.trainer import base_unet_tensors

    state = tiny_bundle.load_diffusion().unet.state_dict()
    names = [n for n in state if n.endswith(".weight")][:20]
    base = base_unet_tensors(tiny_bundle, names)
    assert set(base) == set(names) and all(torch.equal(base[n], state[n]) for n in names)
    with pytest.raises(BundleError, match="diffusion/unet"):
        base_unet_tensors(tiny_bundle, ["no.such.weight"])
