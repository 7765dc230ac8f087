"""Composition across extractions, measured on ToyWorld's ground truth: the cross-extraction swap, per delta mode.

    python bench/composition.py [--quick] [--scenes N] [--bundle DIR] [--max-pairs N] [--images N]

One learning job per held-out ToyWorld scene with two or three objects, from the scene's true masks and categories
(stage 2 alone, as `bench/quality.py --concepts truth`), with LoRA refinement, on two learner replicas that share
one concept library (a folder both are started with, `--concept-library`): the jobs of both are composed alike.
Then, for objects A of scene i and B of scene j (i ≠ j) of different categories and different colours, the prompts

    swap_colour           "a photo of {i:A}{j:B.color}"
    swap_colour_texture   "a photo of {i:A}{j:B.texture}{j:B.color}"

(`IceClient.compose`, through GenerateComposition) must draw A's category in B's colour (and B's texture), as read
by `toyworld.classify.read_object`. Each prompt is rendered under every delta mode: `tokens_only` (the base UNet),
`one_job_a` (job i's LoRA: the concept's scene), `one_job_b` (job j's: the attribute's scene) and `merged_lora`
(both). Pairs are drawn at random (seeded) among all valid ones, at most --max-pairs; every figure has a bootstrap
95 % interval over the scene pairs (i, j) (quality.bootstrap: ratio of sums), and each mode is compared with
tokens_only by a paired bootstrap on the same pairs. The goal: swap_colour ≥ 0.6 with tokens on base weights.

Writes bench/results/composition.json (machine, commit, bundle, schedule, wall time, every figure); --quick
(2 scenes, a 6/6/2-step schedule, 2 pairs, 1 image of 10 steps: a smoke test, not a result) writes
build/composition-quick/composition.json. The jobs stay in the work folder (build/composition*/): a rerun with the
same arguments reuses them (each request_id is derived from the bundle, scene, schedule and seed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import bootstrap, multi_object_scenes, paired_difference, png, png_mask  # noqa: E402
from client.options import GenerateOptions, Schedule  # noqa: E402

DEFAULT_BUNDLE = ROOT / "toyworld" / "bundle"
DEFAULT_OUT = ROOT / "bench" / "results" / "composition.json"
QUICK_OUT = ROOT / "build" / "composition-quick" / "composition.json"
# quality.py's stage-2 schedule for this world (80/80/40), with LoRA refinement so that every mode applies
SCHEDULE = Schedule(phase1_steps=80, phase2_steps=80, refinement_steps=40, checkpoint_every=0)
QUICK_SCHEDULE = Schedule(phase1_steps=6, phase2_steps=6, refinement_steps=2, checkpoint_every=0, num_class_images=2)
MODES = ("tokens_only", "one_job_a", "one_job_b", "merged_lora")
METRICS = ("swap_colour", "swap_colour_texture")
IMAGES = 4


def learn_scenes(clients, scenes, schedule: Schedule, seed: int, bundle: str, log) -> dict[int, str]:
    """One LoRA job per scene from its true masks, scene n on replica n mod replicas; {scene number: job id}.
    Each job's request_id is derived from what determines it, so a rerun on the same work folder finds the jobs
    its replicas already learned instead of learning them again."""
    jobs: dict[int, str] = {}

    def learn_on(r: int) -> None:
        ice = clients[r]
        for k, scene in scenes[r :: len(clients)]:
            t0 = time.perf_counter()
            key = json.dumps([bundle, k, schedule.set_fields(), seed], sort_keys=True)
            job = ice.create_job(png(scene.image), [(o.category, png_mask(o.mask)) for o in scene.objects],
                                 schedule=schedule, refinement_delta="lora", seed=seed + k,
                                 request_id=str(uuid.uuid5(uuid.NAMESPACE_URL, "ice-composition-bench/" + key)))
            ice.wait(job)
            jobs[k] = job.job_id
            log(f"scene {k}: job {job.job_id[:8]} on replica {r} ({', '.join(o.phrase() for o in scene.objects)}) "
                f"in {time.perf_counter() - t0:.0f}s")

    with ThreadPoolExecutor(len(clients)) as pool:
        for done in [pool.submit(learn_on, r) for r in range(len(clients))]:
            done.result()
    return dict(sorted(jobs.items()))


def swap_pairs(scenes, max_pairs: int, seed: int) -> list[tuple]:
    """(i, a, j, b): object a of scene i, object b of scene j (i ≠ j), of different categories and colours; a
    seeded sample of at most `max_pairs` of them, in a stable order."""
    found = []
    for i, si in scenes:
        for j, sj in scenes:
            if i == j:
                continue
            for a, oa in enumerate(si.objects):
                for b, ob in enumerate(sj.objects):
                    if oa.category != ob.category and oa.colour != ob.colour:
                        found.append((i, a, j, b))
    rng = np.random.default_rng(seed)
    if len(found) > max_pairs:
        found = [found[k] for k in sorted(rng.choice(len(found), max_pairs, replace=False))]
    return found


def prompts_for(jobs: dict[int, str], i: int, a: int, j: int, b: int) -> dict[str, str]:
    concept, other = f"{jobs[i]}:c{a}", f"{jobs[j]}:c{b}"
    return {"swap_colour": f"a photo of {{{concept}}}{{{other}.color}}",
            "swap_colour_texture": f"a photo of {{{concept}}}{{{other}.texture}}{{{other}.color}}"}


def mode_args(mode: str, jobs: dict[int, str], i: int, j: int) -> dict:
    if mode == "one_job_a":
        return {"delta": "one_job", "delta_job": jobs[i]}
    if mode == "one_job_b":
        return {"delta": "one_job", "delta_job": jobs[j]}
    return {"delta": mode}


def measure(clients, scenes, jobs, pairs, images: int, steps: int | None, seed: int, log) -> dict:
    """{mode: {metric: {(i, j): [right, total]}}} and a few example readings. The pairs of one scene pair share
    their jobs: they are composed together, mode by mode, so that each (jobs, delta) pipeline is built once; the
    scene pairs are spread over the replicas, each composing jobs of both (the library is shared)."""
    by_number = dict(scenes)
    counts = {m: {metric: {} for metric in METRICS} for m in MODES}
    examples: list[dict] = []
    gen = GenerateOptions(num_images=images, num_inference_steps=steps, seed=seed)
    scene_pairs = list(dict.fromkeys((i, j) for i, _, j, _ in pairs))

    def compose_pair(n: int) -> None:
        from PIL import Image

        from toyworld.classify import read_object

        i, j = scene_pairs[n]
        ice = clients[n % len(clients)]
        wanted = {}  # prompt -> (metric, object A, object B)
        for _, a, _, b in (q for q in pairs if (q[0], q[2]) == (i, j)):
            for metric, prompt in prompts_for(jobs, i, a, j, b).items():
                wanted[prompt] = (metric, by_number[i].objects[a], by_number[j].objects[b])
        prompts = list(wanted)
        for mode in MODES:
            for start in range(0, len(prompts), 16):  # at most 16 prompts per request
                composition = ice.compose(prompts[start : start + 16], options=gen, **mode_args(mode, jobs, i, j))
                for img in composition.images:
                    metric, oa, ob = wanted[img.prompt]
                    r = read_object(Image.open(io.BytesIO(img.image_png)))
                    right = r.category == oa.category and r.colour == ob.colour
                    if metric == "swap_colour_texture":
                        right = right and r.texture == ob.texture
                    c = counts[mode][metric].setdefault((i, j), [0, 0])
                    c[0] += int(right)
                    c[1] += 1
                    if len(examples) < 24 and img.index == 0:
                        examples.append({"mode": mode, "metric": metric, "want": [oa.category, ob.colour, ob.texture],
                                         "read": [r.category, r.colour, r.texture], "prompt": img.expanded_prompt})
        log(f"scene pair ({i}, {j}) on replica {n % len(clients)}: {len(prompts)} prompts x {len(MODES)} modes")

    with ThreadPoolExecutor(len(clients)) as pool:
        for done in [pool.submit(compose_pair, n) for n in range(len(scene_pairs))]:
            done.result()
    return {"counts": counts, "examples": examples}


def summarise(counts: dict, scene_pairs: list[tuple[int, int]], rng: np.random.Generator) -> dict:
    def series(mode: str, metric: str) -> list[tuple[float, float]]:
        return [tuple(counts[mode][metric].get(p, (0, 0))) for p in scene_pairs]

    table = {mode: {metric: bootstrap(series(mode, metric), rng) for metric in METRICS} for mode in MODES}
    versus = {mode: {metric: paired_difference(series(mode, metric), series("tokens_only", metric), rng)
                     for metric in METRICS} for mode in MODES if mode != "tokens_only"}
    return {"modes": table, "versus_tokens_only": versus}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/composition.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--out", type=Path, default=None, help=f"results file (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--scenes", type=int, default=6, help="held-out scenes with two or three objects")
    p.add_argument("--first-scene", type=int, default=100, help="the scenes are the first ones from here on")
    p.add_argument("--max-pairs", type=int, default=48, help="object pairs (A, B) measured, drawn among all valid")
    p.add_argument("--images", type=int, default=IMAGES, help="images per prompt and mode")
    p.add_argument("--inference-steps", type=int, help="denoising steps (default: the learner's, 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", type=int, default=2, help="learner replicas sharing the library (one CPU thread "
                                                           "each; default 2: two cores)")
    p.add_argument("--quick", action="store_true",
                   help="2 scenes, a short schedule, 2 pairs, 1 image of 10 steps: a smoke test of the whole path")
    a = p.parse_args(argv)
    schedule = SCHEDULE
    if a.quick:
        a.scenes, schedule, a.images, a.max_pairs = 2, QUICK_SCHEDULE, 1, min(a.max_pairs, 2)
        a.inference_steps = a.inference_steps or 10
    out = a.out or (QUICK_OUT if a.quick else DEFAULT_OUT)

    from client.devservers import DevServices
    from client.sdk import IceClient
    from toyworld.train import git_commit

    t_start = time.perf_counter()
    commit = git_commit()

    def log(msg: str) -> None:
        print(f"[composition {time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    scenes = multi_object_scenes(a.first_scene, a.scenes)
    work = ROOT / "build" / ("composition-quick" if a.quick else "composition")
    library = work / "library"
    if a.replicas > 1:  # services side by side: one intra-op thread each, or they fight over the same cores
        os.environ["OMP_NUM_THREADS"] = "1"
    sets = [DevServices(a.bundle, log_dir=work / f"replica{r}" / "logs", job_store=work / f"replica{r}" / "jobs",
                        extra_args={"learner": ["--concept-library", str(library)]}, services=("learner",))
            for r in range(a.replicas)]
    log(f"starting {a.replicas} learner replica(s) on {a.bundle}, sharing the library {library} ...")
    try:
        for services in sets:
            services.start(timeout=900)
        clients = [IceClient(**services.targets(), timeout=3600) for services in sets]
        bundle = clients[0].server_info("learner").get("bundle", {})
        t_learn = time.perf_counter()
        jobs = learn_scenes(clients, scenes, schedule, a.seed, bundle.get("sha256", ""), log)
        learn_seconds = time.perf_counter() - t_learn
        pairs = swap_pairs(scenes, a.max_pairs, a.seed)
        scene_pairs = sorted({(i, j) for i, _, j, _ in pairs})
        log(f"{len(pairs)} object pairs, {len(MODES)} modes, {len(METRICS)} prompts, {a.images} images each")
        t_gen = time.perf_counter()
        measured = measure(clients, scenes, jobs, pairs, a.images, a.inference_steps, a.seed, log)
        compose_seconds = time.perf_counter() - t_gen
        for ice in clients:  # the jobs stay: a rerun on this work folder reuses them
            ice.close()
    finally:
        for services in sets:
            services.stop()

    results = {
        "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), {os.cpu_count()} cores",
        "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"), "bundle": bundle, "quick": a.quick,
        "scenes": [k for k, _ in scenes], "jobs": {str(k): v for k, v in jobs.items()},
        "schedule": {**schedule.set_fields(), "refinement_delta": "LORA"}, "images_per_prompt": a.images,
        "inference_steps": a.inference_steps or "the learner's default",
        "pairs": [{"concept": [i, a_], "attributes": [j, b]} for i, a_, j, b in pairs],
        "prompts": {"swap_colour": "a photo of {i:A}{j:B.color}",
                    "swap_colour_texture": "a photo of {i:A}{j:B.texture}{j:B.color}"},
        **summarise(measured["counts"], scene_pairs, np.random.default_rng(a.seed)),
        "examples": measured["examples"],
        "seconds": {"learning": round(learn_seconds, 1), "composing": round(compose_seconds, 1),
                    "per_job": round(learn_seconds * min(a.replicas, len(jobs)) / max(len(jobs), 1), 1),
                    "per_image": round(compose_seconds * min(a.replicas, len(scene_pairs)) / max(
                        1, len(pairs) * len(MODES) * len(METRICS) * a.images), 3)},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    log(f"wrote {out}")
    return 0


def print_table(results: dict) -> None:
    print(f"\ncross-extraction swap, {len(results['pairs'])} pairs x {results['images_per_prompt']} images")
    print("mode | " + " | ".join(METRICS))
    for mode, row in results["modes"].items():
        cells = []
        for metric in METRICS:
            v = row[metric]
            cells.append("-" if v["value"] is None else f"{v['value']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]")
        print(f"{mode} | " + " | ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
