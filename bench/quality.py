"""`make quality`: ICE's claims measured against ToyWorld's ground truth, through the three services and the SDK.

    python bench/quality.py [--quick] [--scenes N] [--rows full,without_refinement,...]

For each held-out ToyWorld scene (the same scenes and seeds for every row):
- stage 1 (once per scene, shared by every row): Localize; noun recall/precision against the true categories;
  mask mIoU / recall / precision from the evaluator's ScoreMasks; foreground ARI;
- stage 2, one learning job per scene and row (the rows are the paper's ablations), then per extracted concept
  matched to a true object (best mask IoU ≥ 0.3):
  * intrinsic accuracy: images generated from "a <colour token> color" and "a <texture token> texture" (the
    published intrinsic prompts) judged by the world's procedural classifiers against the object's true colour
    and texture; images from the object-level prompt "a photo of <&i><#i><$i>" judged on category, colour and
    texture;
  * the swap test: for two concepts A and B of different colours in one scene, "a photo of <&B><#B><$A>" must
    show B's category in A's colour;
  * UCE metrics SIM^I, SIM^C, ACC^1, ACC^3 (CLIP and DINO of the bundle) over the whole set with EvaluateSet,
    so that accuracy ranks every concept among all the concepts of the set, as the paper does.
Every figure has a bootstrap 95 % interval over scenes; every ablation is compared with full ICE by a paired
bootstrap of the difference (same scenes), and "beyond" means its interval excludes 0.

Writes bench/results/quality.json (machine, commit, wall time, schedule, every figure) and prints the table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.options import GenerateOptions, Schedule  # noqa: E402

DEFAULT_BUNDLE = ROOT / "toyworld" / "bundle"
DEFAULT_OUT = ROOT / "bench" / "results" / "quality.json"

# The stage-2 schedule scaled to this world (64 px, one to three flat objects, 128-wide token embeddings): the
# published learning rates and losses and equal object-level and intrinsic phases, with refinement half a phase
# (published: three quarters) and 80/80/40 steps instead of 400/400/300 so that six rows of six scenes fit in an hour on two CPU cores; 64
# class images of "a photo of things on a gray background" (the bundle's own recommendation).
SCHEDULE = Schedule(phase1_steps=80, phase2_steps=80, refinement_steps=40, checkpoint_every=0)
QUICK_SCHEDULE = Schedule(phase1_steps=30, phase2_steps=30, refinement_steps=10, checkpoint_every=0,
                          num_class_images=8)
IMAGES = 4  # per prompt

# The ablation rows of the paper's table, each a learner option (ablation enum or schedule field).
ROWS: dict[str, dict] = {
    "full": {},
    "without_intrinsic_phase": {"ablation": "without_stage_two"},
    "without_text_init": {"ablation": "without_text_init"},
    "mask_only_no_attention_loss": {"schedule": {"lambda_attention": 0.0}},
    "without_triplet_losses": {"schedule": {"reg_weight": 0.0, "reg_intrinsic_weight": 0.0}},
    "without_refinement": {"schedule": {"refinement_steps": 0}},
}
METRICS = ("colour_token_colour", "texture_token_texture", "object_category", "object_colour", "object_texture",
           "swap")


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SceneResult:
    """Counts per metric for one scene and row: {metric: [right, total]}."""

    counts: dict[str, list[int]] = field(default_factory=dict)

    def add(self, metric: str, right: bool) -> None:
        c = self.counts.setdefault(metric, [0, 0])
        c[0] += int(right)
        c[1] += 1


def bootstrap(per_scene: list[tuple[float, float]], rng: np.random.Generator, n: int = 1000) -> dict:
    """Ratio of sums (right / total) over scenes with a percentile bootstrap 95 % interval."""
    arr = np.array([x for x in per_scene if x[1] > 0], dtype=float)
    if len(arr) == 0:
        return {"value": None, "ci95": None, "n": 0}
    value = arr[:, 0].sum() / arr[:, 1].sum()
    idx = rng.integers(0, len(arr), (n, len(arr)))
    sums = arr[idx].sum(axis=1)
    ratios = sums[:, 0] / np.maximum(sums[:, 1], 1e-9)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"value": round(float(value), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "n": int(arr[:, 1].sum())}


def paired_difference(a: list[tuple[float, float]], b: list[tuple[float, float]], rng: np.random.Generator,
                      n: int = 1000) -> dict:
    """(ratio of a) − (ratio of b) over the same scenes, with a paired bootstrap 95 % interval."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x[1] > 0 and y[1] > 0]
    if not pairs:
        return {"difference": None, "ci95": None, "beyond": False}
    A = np.array([p[0] for p in pairs], dtype=float)
    B = np.array([p[1] for p in pairs], dtype=float)
    diff = A[:, 0].sum() / A[:, 1].sum() - B[:, 0].sum() / B[:, 1].sum()
    idx = rng.integers(0, len(pairs), (n, len(pairs)))
    sa, sb = A[idx].sum(axis=1), B[idx].sum(axis=1)
    d = sa[:, 0] / sa[:, 1] - sb[:, 0] / sb[:, 1]
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {"difference": round(float(diff), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "beyond": bool(lo > 0)}


def match_concepts(concepts, scene) -> dict[str, int]:
    """concept_id -> index of the true object it covers best (IoU ≥ 0.3), one concept per object."""
    pairs = []
    for c in concepts:
        m = c.mask()
        for k, o in enumerate(scene.objects):
            union = (m | o.mask).sum()
            iou = (m & o.mask).sum() / union if union else 0.0
            if iou >= 0.3:
                pairs.append((iou, c.concept_id, k))
    out, used = {}, set()
    for _iou, cid, k in sorted(pairs, reverse=True):
        if cid not in out and k not in used:
            out[cid] = k
            used.add(k)
    return out


def stage_one(ice, scenes) -> tuple[list, dict]:
    from toyworld.evaluate import fg_ari

    localizations, rows = [], []
    tp = n_true = n_pred = 0
    mask_scores = []
    for k, scene in scenes:
        loc = ice.localize(png(scene.image))
        localizations.append(loc)
        truth = {o.category for o in scene.objects}
        found = {c.noun for c in loc.concepts}
        tp, n_true, n_pred = tp + len(truth & found), n_true + len(truth), n_pred + len(found)
        scores = ice.score_masks([c.mask_png for c in loc.concepts], [png_mask(o.mask) for o in scene.objects])
        mask_scores.append((scores.miou, scores.recall, scores.precision, len(scene.objects)))
        labels = np.zeros((64, 64), dtype=np.int64)
        for i, c in enumerate(loc.concepts, start=1):
            labels[c.mask() & (labels == 0)] = i
        rows.append({"scene": k, "truth": [o.phrase() for o in scene.objects],
                     "found": [c.noun for c in loc.concepts], "miou": round(scores.miou, 4),
                     "fg_ari": round(fg_ari(scene.label_map(), labels), 4)})
    weights = np.array([m[3] for m in mask_scores], dtype=float)  # per-object pooling: each object counts once
    summary = {
        "noun_recall": round(tp / max(n_true, 1), 4), "noun_precision": round(tp / max(n_pred, 1), 4),
        "mask_miou": round(float(np.average([m[0] for m in mask_scores], weights=weights)), 4),
        "mask_recall": round(float(np.average([m[1] for m in mask_scores], weights=weights)), 4),
        "mask_precision": round(float(np.average([m[2] for m in mask_scores], weights=weights)), 4),
        "fg_ari": round(float(np.nanmean([r["fg_ari"] for r in rows])), 4),
        "per_scene": rows,
    }
    return localizations, summary


def multi_object_scenes(first: int, count: int) -> list:
    """(number, scene) of the first `count` held-out scenes from `first` on with two or three objects (one
    object leaves nothing to separate, and the swap test needs two)."""
    from toyworld.world import held_out_scene

    out, k = [], first
    while len(out) < count:
        scene = held_out_scene(k)
        if len(scene.objects) >= 2:
            out.append((k, scene))
        k += 1
    return out


@dataclass
class _Given:
    concepts: list


def true_concepts(scene) -> _Given:
    """The scene's true masks and categories in the shape of a localization, for stage 2 alone."""
    from client.types import Concept

    return _Given([Concept(f"c{i}", o.category, float(o.mask.mean()), 0, [], png_mask(o.mask))
                   for i, o in enumerate(scene.objects)])


def png_mask(mask) -> bytes:
    from PIL import Image

    return png(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255))


def _token(learning, cid: str, role: str, attribute: str = "") -> str | None:
    for t in learning.tokens:
        if t.concept_id == cid and t.role == role and (role != "INTRINSIC" or t.attribute == attribute):
            return t.token
    return None


def run_row(ice, name: str, spec: dict, scenes, localizations, schedule: Schedule, seed: int, images: int,
            log) -> dict:
    from PIL import Image

    from toyworld.classify import read_object

    sched = replace(schedule, **spec.get("schedule", {}))
    per_scene, eval_items, seconds = [], [], []
    gen = GenerateOptions(num_images=images, seed=seed)
    for (k, scene), loc in zip(scenes, localizations, strict=True):
        result = SceneResult()
        per_scene.append(result)
        concepts = list(loc.concepts)
        if not concepts:
            continue
        t0 = time.perf_counter()
        job = ice.create_job(png(scene.image), concepts, schedule=sched, ablation=spec.get("ablation"),
                             seed=seed + k)
        learning = ice.wait(job)
        matched = match_concepts(concepts, scene)
        generated = ice.generate(job, "object_level", options=gen)
        intrinsic = ice.generate(job, "intrinsic", options=gen)
        by_concept: dict[str, list[bytes]] = {}
        for g in generated:
            by_concept.setdefault(g.concept_id, []).append(g.image_png)
            truth = scene.objects[matched[g.concept_id]] if g.concept_id in matched else None
            if truth is not None:
                r = read_object(Image.open(io.BytesIO(g.image_png)))
                result.add("object_category", r.category == truth.category)
                result.add("object_colour", r.colour == truth.colour)
                result.add("object_texture", r.texture == truth.texture)
        for g in intrinsic:
            truth = scene.objects[matched[g.concept_id]] if g.concept_id in matched else None
            if truth is None or g.attribute not in ("color", "texture"):
                continue
            r = read_object(Image.open(io.BytesIO(g.image_png)))
            if g.attribute == "color":
                result.add("colour_token_colour", r.colour == truth.colour)
            else:
                result.add("texture_token_texture", r.texture == truth.texture)
        # the swap test: B's concept and texture tokens with A's colour token
        swaps = []
        for a, ka in matched.items():
            for b, kb in matched.items():
                oa, ob = scene.objects[ka], scene.objects[kb]
                colour_a = _token(learning, a, "INTRINSIC", "color")
                if a == b or oa.colour == ob.colour or colour_a is None:
                    continue
                texture_b = _token(learning, b, "INTRINSIC", "texture") or ""
                swaps.append((f"a photo of {_token(learning, b, 'CONCEPT')}{texture_b}{colour_a}", ob.category,
                              oa.colour))
        if swaps:
            out = ice.generate(job, "free", prompts=[s[0] for s in swaps], options=gen)
            for g in out:
                _, category, colour = next(s for s in swaps if s[0] == g.prompt)
                r = read_object(Image.open(io.BytesIO(g.image_png)))
                result.add("swap", r.category == category and r.colour == colour)
        composition = []
        concept_tokens = [t.token for t in learning.tokens if t.role == "CONCEPT"]
        if len(concept_tokens) > 1:
            composition = [g.image_png for g in ice.generate(
                job, "free", prompts=["a photo of " + " and ".join(concept_tokens)], options=gen)]
        eval_items.append((f"scene-{k}", png(scene.image),
                           [(c.concept_id, c.mask_png, by_concept.get(c.concept_id, [])) for c in concepts
                            if by_concept.get(c.concept_id)], composition))
        seconds.append(time.perf_counter() - t0)
        ice.delete(job)
        log(f"{name}: scene {k} done in {seconds[-1]:.0f}s " + " ".join(
            f"{m}={c[0]}/{c[1]}" for m, c in sorted(result.counts.items())))
    uce = ice.evaluate_set(eval_items) if eval_items else None
    return {"per_scene": per_scene, "uce": uce, "seconds": seconds, "schedule": sched.set_fields(),
            "ablation": spec.get("ablation") or "none"}


def uce_dict(uce) -> dict:
    if uce is None:
        return {}
    return {s.encoder.lower(): {"sim_i": round(s.sim_i, 4), "sim_c": None if s.sim_c is None else round(s.sim_c, 4),
                                "acc1": round(s.acc1, 4), "acc3": round(s.acc3, 4)} for s in uce.scores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/quality.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default bench/results/quality.json, or quality-true-masks.json)")
    p.add_argument("--scenes", type=int, default=6, help="held-out scenes with two or three objects")
    p.add_argument("--first-scene", type=int, default=100, help="the scenes are the first ones from here on")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated ablation rows")
    p.add_argument("--images", type=int, default=IMAGES, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 scenes, a short schedule, full ICE only (minutes)")
    p.add_argument("--concepts", choices=("stage1", "truth"), default="stage1",
                   help="what stage 2 learns from: stage 1's masks and nouns (the whole method, default) or the "
                        "true masks and categories (stage 2 alone, every object counted)")
    p.add_argument("--parallel", type=int, default=2,
                   help="sets of services running rows side by side, one CPU thread each (default 2: two cores)")
    a = p.parse_args(argv)
    schedule = SCHEDULE
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    if a.quick:
        a.scenes, schedule, a.images = 2, QUICK_SCHEDULE, 2
        rows = ["full"] if a.rows == ",".join(ROWS) else rows
    if a.out is None:
        a.out = DEFAULT_OUT if a.concepts == "stage1" else DEFAULT_OUT.with_name("quality-true-masks.json")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")

    from client.devservers import DevServices
    from client.sdk import IceClient
    from toyworld.train import git_commit

    t_start = time.perf_counter()
    commit = git_commit()  # the code that runs, not what the tree holds when it ends

    def log(msg: str) -> None:
        print(f"[quality {time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    scenes = multi_object_scenes(a.first_scene, a.scenes)
    work = ROOT / "build" / ("quality" if a.concepts == "stage1" else "quality-true-masks")
    workers = max(1, min(a.parallel, len(rows)))
    if workers > 1:  # services side by side: one intra-op thread each, or they fight over the same cores
        os.environ["OMP_NUM_THREADS"] = "1"
    sets = [DevServices(a.bundle, log_dir=work / f"set{i}" / "logs", job_store=work / f"set{i}" / "jobs")
            for i in range(workers)]
    log(f"starting {workers} set(s) of services on {a.bundle} ...")
    results: dict = {}
    raw: dict = {}
    try:
        for services in sets:
            services.start(timeout=900)
        clients = [IceClient(**services.targets()) for services in sets]
        bundle = clients[0].server_info("learner").get("bundle", {})
        log(f"stage 1 on {len(scenes)} held-out scenes")
        localizations, results["stage_one"] = stage_one(clients[0], scenes)
        if a.concepts == "truth":
            localizations = [true_concepts(scene) for _, scene in scenes]
        log("stage 1: " + ", ".join(f"{k} {v}" for k, v in results["stage_one"].items() if k != "per_scene"))
        pending = list(rows)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def worker(ice) -> None:
            while True:
                with lock:
                    if not pending or errors:
                        return
                    name = pending.pop(0)
                log(f"row {name}")
                try:
                    raw[name] = run_row(ice, name, ROWS[name], scenes, localizations, schedule, a.seed, a.images,
                                        log)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=worker, args=(ice,)) for ice in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ice in clients:
            ice.close()
        if errors:
            raise errors[0]
    finally:
        for services in sets:
            services.stop()
    raw = {name: raw[name] for name in rows}

    rng = np.random.default_rng(a.seed)
    table = {}
    for name, r in raw.items():
        row = {m: bootstrap([tuple(s.counts.get(m, (0, 0))) for s in r["per_scene"]], rng) for m in METRICS}
        row["uce"] = uce_dict(r["uce"])
        row["seconds_per_scene"] = round(float(np.mean(r["seconds"])), 1) if r["seconds"] else None
        row["schedule"], row["ablation"] = r["schedule"], r["ablation"]
        table[name] = row
    comparisons = {}
    if "full" in raw:
        for name in raw:
            if name == "full":
                continue
            comparisons[name] = {m: paired_difference(
                [tuple(s.counts.get(m, (0, 0))) for s in raw["full"]["per_scene"]],
                [tuple(s.counts.get(m, (0, 0))) for s in raw[name]["per_scene"]], rng) for m in METRICS}
    results.update({
        "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), 2 cores",
        "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"), "bundle": bundle,
        "scenes": [k for k, _ in scenes], "quick": a.quick, "images_per_prompt": a.images,
        "stage_two_learns_from": "the true masks and categories" if a.concepts == "truth" else "stage 1's output",
        "schedule": (QUICK_SCHEDULE if a.quick else SCHEDULE).set_fields(),
        "rows": table, "full_vs_ablation": comparisons,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    })
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    log(f"wrote {a.out}")
    return 0


def print_table(results: dict) -> None:
    s = results["stage_one"]
    print(f"\nstage 1: noun recall {s['noun_recall']:.2f} precision {s['noun_precision']:.2f} | mask mIoU "
          f"{s['mask_miou']:.2f} recall {s['mask_recall']:.2f} precision {s['mask_precision']:.2f} | FG-ARI "
          f"{s['fg_ari']:.2f}")
    head = ["row", *METRICS, "SIM^I clip", "SIM^C clip", "ACC^1 clip", "ACC^3 clip", "ACC^1 dino"]
    print(" | ".join(head))
    for name, row in results["rows"].items():
        cells = [name]
        for m in METRICS:
            v = row[m]
            cells.append("–" if v["value"] is None else f"{v['value']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]")
        clip, dino = row["uce"].get("clip", {}), row["uce"].get("dino", {})
        for key in ("sim_i", "sim_c", "acc1", "acc3"):
            cells.append("–" if clip.get(key) is None else f"{clip[key]:.3f}")
        cells.append("–" if dino.get("acc1") is None else f"{dino['acc1']:.3f}")
        print(" | ".join(cells))
    for name, comp in results["full_vs_ablation"].items():
        beyond = [m for m, d in comp.items() if d["beyond"]]
        print(f"full ICE vs {name}: ahead beyond the interval on {', '.join(beyond) or 'no metric'}")


if __name__ == "__main__":
    sys.exit(main())
