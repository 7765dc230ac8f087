"""Details of the method that a wrong implementation would still run with, each checked on the tiny bundle against
an independent computation (docs/method.md):

- E(·) pools the text encoder's output at a lone placeholder's own position, and at EOS for an ordinary word;
- which token rows train in each phase, and phase 2 starting every intrinsic token at the learned `<*i>`;
- the learning rate and optimizer of each phase;
- the prompt templates and the token strings they wrap in each phase;
- the segmentor's single UNet pass at t = 150 on the clean (mean, noiseless) latent.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from services.common.images import center_crop_resize, image_to_tensor
from services.learner.tokens import CONCEPT, INSTANCE, INTRINSIC, ConceptTokens
from services.learner.trainer import (
    INTRINSIC_PHASE,
    OBJECT_LEVEL,
    REFINEMENT,
    TEMPLATES,
    Concept,
    LearningSpec,
    Schedule,
    Trainer,
)


@pytest.fixture(scope="module")
def square(photo_png):
    return center_crop_resize(Image.open(io.BytesIO(photo_png)).convert("RGB"), 64)


def _spec(square, schedule: Schedule, n: int = 2) -> LearningSpec:
    masks = [np.zeros((64, 64), bool), np.zeros((64, 64), bool)]
    masks[0][8:40, 8:40] = True
    masks[1][36:60, 30:62] = True
    concepts = [Concept("c0", "cup", masks[0]), Concept("c1", "table", masks[1])][:n]
    return LearningSpec(square, concepts, schedule=schedule, seed=3)


def test_e_pools_at_a_lone_placeholder_and_at_eos_for_a_word(tiny_bundle, square, tmp_path):
    schedule = Schedule(phase1_steps=1, phase2_steps=0, refinement_steps=0, num_class_images=0, checkpoint_every=0)
    tr = Trainer(tiny_bundle, _spec(square, schedule), tmp_path)
    tr.prepare()
    tok, te = tr.tokenizer, tr.text_encoder
    for text, placeholder in (("<&0>", True), ("<*1>", True), ("cup", False)):
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        hidden = te(input_ids=ids)[0][0]  # final-layer-normed states [77, D]
        eos = int((ids[0] == tok.eos_token_id).nonzero()[0, 0])
        position = 1 if placeholder else eos  # BOS, then the placeholder itself
        got = tr.tokens.encode([text], "cpu")[0]
        torch.testing.assert_close(got, F.normalize(hidden[position], dim=-1), atol=1e-5, rtol=0)
        if placeholder:  # not the sentence embedding at EOS: E(placeholder) is the token's own output
            assert float(got @ F.normalize(hidden[eos], dim=-1)) < 0.9999


def test_rows_learning_rates_and_templates_of_each_phase(tiny_bundle, square, tmp_path, monkeypatch):
    schedule = Schedule(phase1_steps=1, phase2_steps=1, refinement_steps=1, num_class_images=0,
                        checkpoint_every=0)
    states: dict = {}
    prompts: list[tuple[str, str]] = []

    def on_phase(phase):
        if phase in (OBJECT_LEVEL, INTRINSIC_PHASE, REFINEMENT):
            states[f"enter {phase}"] = tr.tokens.new.detach().clone()
            groups = tr.optimizer.param_groups
            states[f"optimizer {phase}"] = (tr.optimizer, [g["lr"] for g in groups],
                                            sum(p.numel() for g in groups for p in g["params"]))

    def on_step(info):
        states[f"after {info.step}"] = tr.tokens.new.detach().clone()

    tr = Trainer(tiny_bundle, _spec(square, schedule, n=1), tmp_path, on_step=on_step, on_phase=on_phase)
    input_ids = ConceptTokens.input_ids

    def recording(self, texts, device):
        if len(texts) == 1 and texts[0] != schedule.class_prompt:
            prompts.append((tr.phase, texts[0]))
        return input_ids(self, texts, device)

    monkeypatch.setattr(ConceptTokens, "input_ids", recording)
    tr.run(resume=False)
    initial = states[f"enter {OBJECT_LEVEL}"]  # the rows as initialised, before the first step
    rows = {role: tr.tokens.rows(role) for role in (INSTANCE, CONCEPT, INTRINSIC)}
    changed = lambda a, b, r: bool((a[r] - b[r]).abs().amax(dim=1).gt(0).all())  # noqa: E731
    same = lambda a, b, r: torch.equal(a[r], b[r])  # noqa: E731

    # phase 1 trains <*i> and <&i> only
    p1 = states["after 1"]
    assert changed(p1, initial, rows[INSTANCE] + rows[CONCEPT]) and same(p1, initial, rows[INTRINSIC])
    # phase 2 starts every intrinsic token of concept i at the learned <*i>
    start2 = states[f"enter {INTRINSIC_PHASE}"]
    for i in range(1):
        star = start2[tr.tokens.row[tr.tokens.token(INSTANCE, i)]]
        for spec in tr.tokens.intrinsic_tokens(i):
            assert torch.equal(start2[tr.tokens.row[spec.token]], star)
        assert torch.equal(star, p1[tr.tokens.row[tr.tokens.token(INSTANCE, i)]])
    # ... and trains the intrinsic tokens only
    p2 = states["after 2"]
    assert changed(p2, start2, rows[INTRINSIC]) and same(p2, start2, rows[INSTANCE] + rows[CONCEPT])
    # refinement: the intrinsic rows and the UNet; <*i>, <&i> stay
    end = states["after 3"]
    assert same(end, p2, rows[INSTANCE] + rows[CONCEPT]) and changed(end, p2, rows[INTRINSIC])

    # one AdamW at 5e-4 over the new rows for both phases (its state carries over), a new one at 2e-6 with the UNet
    opt1, opt2, opt3 = (states[f"optimizer {p}"] for p in (OBJECT_LEVEL, INTRINSIC_PHASE, REFINEMENT))
    assert opt1[0] is opt2[0] and opt1[1:] == opt2[1:] and opt1[1] == [5e-4] and opt1[2] == tr.tokens.new.numel()
    unet_size = sum(p.numel() for p in tr.unet.parameters())
    assert opt3[0] is not opt1[0] and opt3[1] == [2e-6] and opt3[2] == tr.tokens.new.numel() + unet_size

    # the prompt of each step: one of the 27 templates around "<*i><&i>" (phase 1) or "<&i><#i><%i><$i>" after
    assert len(TEMPLATES) == 27 and len(set(TEMPLATES)) == 27 and all(t.count("{}") == 1 for t in TEMPLATES)
    assert {"a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a photo of the small {}",
            "a dark photo of the {}", "a close-up photo of a {}", "a photo of a clean {}"} <= set(TEMPLATES)
    assert [phase for phase, _ in prompts] == [OBJECT_LEVEL, INTRINSIC_PHASE, REFINEMENT]
    for phase, text in prompts:
        i = 0
        words = (f"<*{i}><&{i}>" if phase == OBJECT_LEVEL
                 else f"<&{i}>" + "".join(s.token for s in tr.tokens.intrinsic_tokens(i)))
        assert any(t.format(words) == text for t in TEMPLATES), text
    assert "".join(s.token for s in tr.tokens.intrinsic_tokens(0)) == "<#0><%0><$0>"  # texture, material, color


def test_segmentor_makes_one_unet_pass_at_t150_on_the_clean_latent(tiny_bundle, photo_png):
    from services.localizer.pipeline import LocalizeOptions, Localizer

    localizer = Localizer(tiny_bundle)
    pipe = localizer.pipe
    calls = []

    def record(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((sample.detach().clone(), torch.as_tensor(timestep).flatten().tolist()))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        image = Image.open(io.BytesIO(photo_png)).convert("RGB")
        localizer.localize(image, LocalizeOptions(max_rounds=1, merge_threshold=0.005))
    finally:
        handle.remove()
    assert len(calls) == 1  # one pass, no denoising loop
    sample, timestep = calls[0]
    assert timestep == [150]
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((64, 64), Image.Resampling.BICUBIC)
    with torch.no_grad():
        clean = pipe.vae.encode(image_to_tensor(square)).latent_dist.mean * pipe.vae.config.scaling_factor
    torch.testing.assert_close(sample, clean, atol=1e-5, rtol=0)  # the mean latent: no noise, no sampling
