"""The quality benchmark's harness (bench/quality.py, bench/baselines.py, bench/quality_tables.py), in seconds:
the baselines' losses and schedules, the resumable per-(row, scene) cache on the tiny bundle, the power rule, and
the tables generated from a results file (and the committed tables matching theirs)."""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import baselines as B  # noqa: E402
import quality as Q  # noqa: E402
import quality_tables as T  # noqa: E402

# -- Break-A-Scene's and Textual Inversion's pieces ------------------------------------------------------------


def _block_mask(size: int = 8) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., : size // 2, : size // 2] = 1  # a quarter of the image
    return m


def test_break_a_scene_attention_loss_is_the_mse_against_the_max_normalised_map():
    mask = _block_mask()  # at 4×4: the top-left 2×2 cells
    grid = torch.zeros(1, 4, 4)
    grid[:, :2, :2] = 1
    # a map that is the mask up to its scale has no loss, whatever the scale
    assert float(B.max_normalised_attention_loss(3.0 * grid, mask)) == pytest.approx(0.0, abs=1e-7)
    # 1 on the background, 3 on the object: normalised by the maximum 3, the background reads 1/3 where the mask
    # is 0 (12 of 16 cells), the object 1 where it is 1, so the mean squared difference is 12/16 · 1/9
    attention = 2.0 * grid + 1.0
    assert float(B.max_normalised_attention_loss(attention, mask)) == pytest.approx(12 / 16 / 9, rel=1e-6)
    assert float(B.max_normalised_attention_loss(7.0 * attention, mask)) == pytest.approx(12 / 16 / 9, rel=1e-6)
    # one term per prompt token, summed (not averaged)
    two = B.max_normalised_attention_loss(torch.cat([attention, 3.0 * grid]), torch.cat([mask, mask]))
    assert float(two) == pytest.approx(12 / 16 / 9, rel=1e-6)
    both = B.max_normalised_attention_loss(torch.cat([attention, attention]), torch.cat([mask, mask]))
    assert float(both) == pytest.approx(2 * 12 / 16 / 9, rel=1e-6)
    a = attention.clone().requires_grad_(True)
    B.max_normalised_attention_loss(a, mask).backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0


def test_union_sampling_picks_random_subsets_and_unions_their_masks():
    rng = random.Random(0)
    draws = [B.union_subset(rng, 3) for _ in range(3000)]
    for d in draws:
        assert 1 <= len(d) <= 3 and len(set(d)) == len(d) and set(d) <= {0, 1, 2}
    sizes = np.bincount([len(d) for d in draws], minlength=4)[1:] / len(draws)
    assert np.allclose(sizes, 1 / 3, atol=0.04)  # k ~ U{1..N}
    assert {frozenset(d) for d in draws} == {frozenset(s) for s in ([0], [1], [2], [0, 1], [0, 2], [1, 2],
                                                                    [0, 1, 2])}
    assert {tuple(d) for d in draws if len(d) == 2} >= {(0, 1), (1, 0)}  # the order the prompt names them varies
    masks = torch.zeros(3, 1, 4, 4)
    masks[0, :, 0], masks[1, :, 1], masks[2, :, 3] = 1, 1, 1
    union = B.union_mask(masks, [2, 0])
    assert union.shape == (1, 1, 4, 4)
    assert torch.equal(union[0, 0].sum(dim=1), torch.tensor([4.0, 0.0, 0.0, 4.0]))
    assert B.union_prompt(["<&0>", "<&1>", "<&2>"], [2, 0]) == "a photo of <&2> and <&0>"


def test_textual_inversion_is_one_phase_of_the_masked_loss_alone():
    from PIL import Image

    from services.learner.trainer import Concept

    spec = B.BaselineSpec(B.TEXTUAL_INVERSION, Image.new("RGB", (8, 8)), [Concept("c0", "ball", np.ones((8, 8), bool))])
    s = spec.schedule
    assert (s.joint_steps, s.lambda_attention, s.num_class_images, s.prior_loss_weight) == (0, 0.0, 0, 0.0)
    bas = B.BaselineSpec(B.BREAK_A_SCENE, Image.new("RGB", (8, 8)), spec.concepts).schedule
    assert (bas.token_steps, bas.joint_steps, bas.lambda_attention) == (400, 400, 1e-2)  # the published values
    with pytest.raises(ValueError):
        B.BaselineSpec("concept_express", Image.new("RGB", (8, 8)), spec.concepts)


def _two_object_spec(size: int, method: str, schedule: B.BaselineSchedule) -> B.BaselineSpec:
    from PIL import Image

    from services.learner.trainer import Concept

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
    left = np.zeros((size, size), bool)
    left[:, : size // 2] = True
    return B.BaselineSpec(method, image, [Concept("c0", "ball", left), Concept("c1", "heart", ~left)], schedule)


def test_break_a_scene_trains_the_tokens_first_then_the_unet_and_text_encoder(tiny_bundle):
    torch.manual_seed(0)
    spec = _two_object_spec(tiny_bundle.image_size, B.BREAK_A_SCENE,
                            B.BaselineSchedule(token_steps=2, joint_steps=1, num_class_images=0))
    trainer = B.BaselineTrainer(tiny_bundle, spec)
    trainer.prepare()
    unet0 = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}
    vocab0 = trainer.token_rows.embedding.base.weight.detach().clone()
    rows0 = trainer.token_rows.new.detach().clone()
    for step in range(2):
        losses = trainer.step(step)
        assert losses.attention > 0 and losses.reconstruction > 0 and losses.prior == 0
    assert not torch.equal(trainer.token_rows.new, rows0)  # phase 1 moves the tokens ...
    assert all(torch.equal(p, unet0[n]) for n, p in trainer.unet.named_parameters())  # ... and nothing else
    assert torch.equal(trainer.token_rows.embedding.base.weight, vocab0)
    trainer._enter_joint_phase()
    trainer.step(2)
    assert any(not torch.equal(p, unet0[n]) for n, p in trainer.unet.named_parameters())
    assert not torch.equal(trainer.token_rows.embedding.base.weight, vocab0)  # the whole text encoder trains
    trainer.release()


# -- the resumable cache -------------------------------------------------------------------------------------


@pytest.fixture
def counted_trainers(monkeypatch):
    """How many baseline trainers were built (each one a run that was not taken from the cache); their images take
    two denoising steps (the tiny bundle's default is 50), since only the caching is under test here."""
    from services.learner.generate import GenerationDefaults

    monkeypatch.setattr(B.G, "generation_defaults", lambda bundle: GenerationDefaults(1, 2, 1.0))
    built = []

    class Counted(B.BaselineTrainer):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(B, "BaselineTrainer", Counted)
    return built


def _run(tmp_path: Path, bundle_dir: Path, schedule, fresh: bool = False) -> Q.Run:
    from toyworld.world import held_out_scene

    run = Q.Run(bundle_dir, Q.bundle_digest(bundle_dir), schedule, 1, 0, "truth", Q.Cache(tmp_path / "cache", fresh),
                tmp_path / "class-images", "test", lambda _m: None)
    run.scenes[100] = held_out_scene(100)
    return run


def test_a_unit_is_computed_once_and_a_killed_one_again(tmp_path, tiny_bundle_dir, counted_trainers):
    schedule = Q.Schedule(phase1_steps=1, phase2_steps=1, refinement_steps=0, checkpoint_every=0)
    run = _run(tmp_path, tiny_bundle_dir, schedule)
    name = "textual_inversion"
    first = Q.run_unit(run, None, name, 100)
    objects = len(run.scenes[100].objects)
    assert len(counted_trainers) == 1
    assert first["concepts"] == objects and first["item"] is not None
    folder = Path(first["folder"])
    for _cid, mask, names in first["item"]["concepts"]:
        assert (folder / mask).is_file() and all((folder / n).is_file() for n in names)
    judged = first["counts"]["object_category"][1]
    assert judged == objects  # every true object counted once (one image per prompt)
    # the same arguments again (a run started after the first finished or was killed): taken from the cache
    again = _run(tmp_path, tiny_bundle_dir, schedule)
    assert Q.run_unit(again, None, name, 100) == first and len(counted_trainers) == 1
    # killed after its images but before its record: computed again, into an emptied folder
    Path(first["folder"]).with_suffix(".json").unlink()
    (folder / "c9-0.png").write_bytes(b"left by the killed run")
    assert Q.run_unit(_run(tmp_path, tiny_bundle_dir, schedule), None, name, 100)["counts"] == first["counts"]
    assert len(counted_trainers) == 2 and not (folder / "c9-0.png").exists()
    # anything that determines the result changes the key (and so computes it again) ...
    concepts = Q.concepts_for(run, Q.ROWS[name], 100)
    key = Q.unit_key(run, name, Q.ROWS[name], concepts)
    assert Q.unit_key(replace(run, schedule=replace(schedule, phase1_steps=2)), name, Q.ROWS[name], concepts) != key
    assert Q.unit_key(replace(run, images=2), name, Q.ROWS[name], concepts) != key
    assert Q.unit_key(run, name, Q.ROWS[name], concepts[:1]) != key
    assert Q.unit_key(run, "break_a_scene_true_masks", Q.ROWS["break_a_scene_true_masks"], concepts) != key
    assert Q.Cache(tmp_path / "cache").get(name, 100, "another key") is None
    # ... and --fresh reads nothing written before this run, but what this run wrote
    fresh = Q.Cache(tmp_path / "cache", fresh=True)
    assert Q.Cache(tmp_path / "cache").get(name, 100, key) is not None and fresh.get(name, 100, key) is None
    fresh.folder(name, 100)
    fresh.put(name, 100, key, {"counts": {}})
    assert fresh.get(name, 100, key)["counts"] == {}


def test_the_rows_are_learner_options_and_baselines():
    from services.learner.trainer import ABLATIONS, Schedule

    assert Q.ROWS["mask_only"].ablation == "mask_only"  # the paper's "w. mask only" is the learner's ablation
    assert Q.ROWS["without_attention_loss"].schedule == (("lambda_attention", 0.0),)
    for name, row in Q.ROWS.items():
        assert row.ablation is None or row.ablation in ABLATIONS, name
        assert all(hasattr(Schedule(), f) for f, _ in row.schedule), name
        assert (row.method in B.METHODS) == (row.group == "baseline"), name
    assert {r.masks for r in Q.ROWS.values() if r.method == B.BREAK_A_SCENE} == {"truth", "stage1"}


def test_scenes_are_added_until_the_intervals_should_be_narrow_enough():
    assert Q.scenes_for_power(40, [0.20, 0.10], 0.10) == 160  # half-widths shrink as 1/sqrt(n)
    assert Q.scenes_for_power(10, [0.11], 0.10) == 16  # 12.1 -> 13, rounded up to a multiple of 4
    assert Q.scenes_for_power(40, [0.101], 0.10) == 44  # at least one step more
    b = Q.bootstrap([(1, 2), (2, 2), (0, 2), (2, 2)], np.random.default_rng(0))
    assert b["value"] == 0.625 and b["halfwidth"] == pytest.approx((b["ci95"][1] - b["ci95"][0]) / 2, abs=1e-4)


# -- the tables ----------------------------------------------------------------------------------------------


def _results(rng_seed: int = 0) -> dict:
    """A results file from handmade per-scene records: full ICE right on every object category, the ablation
    and the baseline on none, over 12 scenes."""
    scenes = list(range(12))

    def records(category_right: int, colour_token: bool) -> list[dict]:
        out = []
        for k in scenes:
            counts = {"object_category": [category_right, 2], "object_colour": [1, 2], "object_texture": [1, 2]}
            if colour_token:
                counts |= {"colour_token_colour": [2, 2], "texture_token_texture": [1, 2], "swap": [1, 2]}
            out.append({"scene": k, "counts": counts, "seconds": 10.0, "concepts": 2, "commit": "abc"})
        return out

    rows = ["full", "without_text_init", "break_a_scene_true_masks"]
    recs = {"full": records(2, True), "without_text_init": records(0, True),
            "break_a_scene_true_masks": records(0, False)}
    uce = {name: {"clip": {"sim_i": 0.5, "sim_c": 0.4, "acc1": 0.6, "acc3": 0.9, "concepts_in_scope": 24}}
           for name in rows}
    per_scene = {name: {f"{e}_{f}": [(1.0, 2.0) if e == "clip" else (0.0, 0.0)] * 12
                        for e in Q.ENCODERS for f in Q.UCE_FIGURES} for name in rows}
    table, comps = Q.aggregate(rows, recs, uce, per_scene, np.random.default_rng(rng_seed))
    stage1 = [{"scene": k, "categories": ["ball", "heart"], "found": ["ball"], "miou": 0.5, "recall": 0.5,
               "precision": 1.0, "fg_ari": 0.3, "objects": 2, "truth": ["a", "b"]} for k in scenes]
    return {"commit": "abcdef0", "date": "today", "machine": "test box", "scenes": scenes, "objects": 24,
            "schedule": {"phase1_steps": 8, "phase2_steps": 8, "refinement_steps": 4}, "images_per_prompt": 1,
            "stage_two_learns_from": "stage 1's output", "wall_seconds": 3600, "seconds_per_unit": 10.0,
            "quick": False, "bundle": {"sha256": "not-the-toyworld-bundle"},
            "stage_one": Q.stage_one_summary(stage1, np.random.default_rng(0)), "rows": table, "full_vs_row": comps,
            "power": {"target_halfwidth": 0.1, "halfwidths": {"object_category": 0.0}, "reached": True,
                      "scenes": 12, "max_scenes": 36}}


def test_the_tables_say_what_the_results_say():
    results = _results()
    assert results["rows"]["break_a_scene_true_masks"]["colour_token_colour"]["not_applicable"]
    assert results["full_vs_row"]["without_text_init"]["object_category"]["beyond"]
    text = T.render(results, "x.json", full=True)
    ablation = next(line for line in text.splitlines() if line.startswith("| ICE w/o text init |"))
    assert ablation.endswith("| object → category |")  # ahead beyond the interval on that figure only
    assert "on at least one figure (attribute or UCE) of every ablation row (ICE w/o text init)." in text
    attributes = next(line for line in text.splitlines() if line.startswith("| Break-A-Scene, true masks |")
                      and "n/a" in line)
    cells = [c.strip() for c in attributes.strip("|").split("|")]
    assert cells[1:4] == ["n/a", "n/a", "0.00 [0.00, 0.00]"] and cells[6] == "n/a"
    assert "0.325*" in text  # the published figure beside ours
    assert "against Break-A-Scene, true masks it is not shown (level on every figure)" in text  # same UCE per scene
    assert "mIoU ≥ 0.65: 0.50, not reached" in text
    summary = T.render(results, "x.json", full=False)
    assert "[" not in summary.split("**UCE metrics**")[1].split("\\*")[0]  # the README's tables: values only


def test_the_tables_are_written_between_their_markers_only(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nbefore\n<!-- quality-tables begin -->\nold\n<!-- quality-tables end -->\nafter\n")
    results = _results()
    assert T.write(results, "x.json", {doc: "quality-tables"}) == [doc]
    text = doc.read_text()
    assert text.startswith("# Title\n\nbefore\n<!-- quality-tables begin -->\n<!-- generated by")
    assert text.endswith("<!-- quality-tables end -->\nafter\n") and "\nold\n" not in text
    assert T.write(results, "x.json", {doc: "quality-tables"}) == []  # refreshing again changes nothing
    results["rows"]["full"]["object_category"]["value"] = 0.123
    assert T.write(results, "x.json", {doc: "quality-tables"}, check=True) == [doc]
    assert "0.123" not in doc.read_text()  # --check only reports


def test_the_committed_tables_are_generated_from_their_results_file():
    """Every committed table block is what bench/quality_tables.py makes of its results file; a block may be empty
    only while the committed results file is not yet one of this benchmark's (it has no paired comparisons)."""
    committed = json.loads((ROOT / "bench/results/quality.json").read_text(encoding="utf-8"))
    for path, name in T.BLOCKS.items():
        text = path.read_text(encoding="utf-8")
        begin, end = T._markers(name)
        assert begin in text and end in text, f"{path.name} lost its {name} markers"
        source = re.search(re.escape(begin) + r"\n<!-- generated by bench/quality_tables.py from (\S+);", text)
        if source is None:
            assert f"{begin}\n{end}" in text, f"{path.name}: the {name} block is neither empty nor generated"
            assert "full_vs_row" not in committed, f"run python bench/quality_tables.py: {path.name} has no tables"
            continue
        results = json.loads((ROOT / source.group(1)).read_text(encoding="utf-8"))
        assert T.write(results, source.group(1), {path: name}, check=True) == [], (
            f"{path.name}: run python bench/quality_tables.py --results {source.group(1)}")
