"""`make quality`: ICE's claims, its ablations and two peer baselines measured against ToyWorld's ground truth.

    python bench/quality.py [--quick] [--scenes N] [--rows full,mask_only,...] [--concepts stage1|truth]

For each held-out ToyWorld scene with two or three objects (the same scenes and seeds for every row):
- stage 1 (once per scene, shared by every row): Localize; noun recall/precision against the true categories;
  mask mIoU / recall / precision from the evaluator's ScoreMasks; foreground ARI;
- stage 2, one run per (row, scene): the ICE rows are learning jobs of the learner service (the paper's
  ablations and the project's own, each a learner option); the baselines (Break-A-Scene with the true masks and
  with ICE's stage-1 masks, Textual Inversion per mask) are trained in this process by bench/baselines.py from
  the learner's modules. Then, per learned concept matched to a true object (best mask IoU ≥ 0.3):
  * intrinsic accuracy (ICE rows): images of "a <colour token> color" and "a <texture token> texture" judged by
    the world's procedural classifiers against the object's true colour and texture;
  * object-level: "a photo of <&i><#i><$i>" (a baseline: "a photo of <&i>", its one token) judged on category,
    colour and texture;
  * the swap test (ICE rows): for two concepts A and B of different colours in one scene,
    "a photo of <&B><#B><$A>" must show B's category in A's colour;
  * UCE metrics SIM^I, SIM^C, ACC^1, ACC^3 (CLIP and DINO of the bundle) over the whole set with EvaluateSet,
    so that accuracy ranks every concept among all the concepts of the set, as the paper does.
Every figure has a bootstrap 95 % interval over scenes; every row is compared with full ICE by a paired
bootstrap of the difference on the same scenes, and "beyond" means its interval excludes 0.

Statistical power: the full row runs first; while its colour-token and object-category intervals are wider than
± --target-halfwidth, scenes are added (up to --max-scenes), and then every other row runs on the final scenes.

Resumable: every (row, scene) result (counts, generated images) and every scene's stage 1 is cached under the
work folder (build/quality/cache), keyed by what determines it (bundle, row, schedule, images, seed, concepts);
a killed run started again with the same arguments continues where it stopped. --fresh recomputes.

Writes bench/results/quality.json (machine, commits, wall time, schedule, every figure, interval widths, power)
and refreshes the generated tables in docs/quality.md and README.md (bench/quality_tables.py). --quick writes
build/quality-quick/quality.json and leaves the docs alone.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.options import GenerateOptions, Schedule  # noqa: E402

DEFAULT_BUNDLE = ROOT / "toyworld" / "bundle"
DEFAULT_OUT = ROOT / "bench" / "results" / "quality.json"
QUICK_OUT = ROOT / "build" / "quality-quick" / "quality.json"
CACHE_VERSION = 2  # bump when what a cached (row, scene) record holds or means changes

# The stage-2 schedule scaled to this world (64 px, one to three flat objects, 128-wide token embeddings): the
# published learning rates and losses and equal object-level and intrinsic phases, with refinement half a phase
# (published: three quarters) and 80/80/40 steps instead of 400/400/300; the bundle's own class prompt and
# 64 class images. The baselines get the same budget: Break-A-Scene 80 + 80 (published 400 + 400), Textual
# Inversion 160 token steps.
SCHEDULE = Schedule(phase1_steps=80, phase2_steps=80, refinement_steps=40, checkpoint_every=0)
QUICK_SCHEDULE = Schedule(phase1_steps=30, phase2_steps=30, refinement_steps=10, checkpoint_every=0,
                          num_class_images=8)
IMAGES = 4  # per prompt
FIRST_SCENE = 100
SCENES = 40  # the power target below needs about this many on the committed bundle's stage 1
TARGET_HALFWIDTH = 0.10
POWER_FIGURES = ("colour_token_colour", "object_category")
MIN_PAIRED_SCENES = 5  # a bootstrap over fewer scenes (one: an interval of zero width) separates nothing


@dataclass(frozen=True)
class Row:
    label: str  # as a table names it
    changes: str  # what the row changes against full ICE
    group: str  # "paper": the published ablation table; "project": our own ablations; "baseline": a peer
    ablation: str | None = None  # the learner's ablation option
    schedule: tuple[tuple[str, float], ...] = ()  # learner schedule fields the row sets
    method: str | None = None  # a baseline of bench/baselines.py
    masks: str = "rows"  # what it learns from: "rows" = what the ICE rows learn from (--concepts), "truth", "stage1"


ROWS: dict[str, Row] = {
    "full": Row("ICE", "nothing: the method as published", "paper"),
    "mask_only": Row("ICE w. mask only", "no retrieved text: the tokens start from the generic word \"object\", "
                     "which also anchors the triplets (learner ablation MASK_ONLY)", "paper", ablation="mask_only"),
    "without_stage_two": Row("ICE w/o stage two", "object-level tokens only: no intrinsic phase, no refinement "
                             "(learner ablation WITHOUT_STAGE_TWO)", "paper", ablation="without_stage_two"),
    "without_text_init": Row("ICE w/o text init", "tokens start from random vocabulary rows, not their words "
                             "(learner ablation WITHOUT_TEXT_INIT)", "paper", ablation="without_text_init"),
    "without_attention_loss": Row("λ_att = 0", "no attention loss: schedule.lambda_attention = 0", "project",
                                  schedule=(("lambda_attention", 0.0),)),
    "without_triplet_losses": Row("no triplet losses", "schedule.reg_weight = 0, schedule.reg_intrinsic_weight = 0",
                                  "project", schedule=(("reg_weight", 0.0), ("reg_intrinsic_weight", 0.0))),
    "without_refinement": Row("no refinement", "no UNet refinement: schedule.refinement_steps = 0", "project",
                              schedule=(("refinement_steps", 0),)),
    "break_a_scene_true_masks": Row("Break-A-Scene, true masks", "the peer method given the true masks and "
                                    "categories", "baseline", method="break_a_scene", masks="truth"),
    "break_a_scene_ice_masks": Row("Break-A-Scene, ICE's masks", "the peer method given ICE's stage-1 masks and "
                                   "nouns", "baseline", method="break_a_scene", masks="stage1"),
    "textual_inversion": Row("Textual Inversion per mask", "one token per mask, the masked diffusion loss alone, "
                             "on the ICE rows' masks", "baseline", method="textual_inversion"),
}
METRICS = ("colour_token_colour", "texture_token_texture", "object_category", "object_colour", "object_texture",
           "swap")
# A baseline has one token per object: no colour or texture token, so neither intrinsic figure nor the swap test
# exists for it; its object token's colour and texture are the object_colour / object_texture figures.
NOT_FOR_BASELINES = ("colour_token_colour", "texture_token_texture", "swap")
UCE_FIGURES = ("sim_i", "sim_c", "acc1", "acc3")
ENCODERS = ("clip", "dino")


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_mask(mask) -> bytes:
    from PIL import Image

    return png(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255))


def applicable(row: Row, metric: str) -> bool:
    return not (row.method and metric in NOT_FOR_BASELINES)


# -- statistics ----------------------------------------------------------------------------------------------------


def bootstrap(per_scene: list[tuple[float, float]], rng: np.random.Generator, n: int = 1000) -> dict:
    """Ratio of sums (right / total) over scenes with a percentile bootstrap 95 % interval and its half-width."""
    arr = np.array([x for x in per_scene if x[1] > 0], dtype=float)
    if len(arr) == 0:
        return {"value": None, "ci95": None, "halfwidth": None, "n": 0, "scenes": 0}
    value = arr[:, 0].sum() / arr[:, 1].sum()
    idx = rng.integers(0, len(arr), (n, len(arr)))
    sums = arr[idx].sum(axis=1)
    ratios = sums[:, 0] / np.maximum(sums[:, 1], 1e-9)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"value": round(float(value), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "halfwidth": round(float(hi - lo) / 2, 4), "n": int(round(arr[:, 1].sum())), "scenes": len(arr)}


def paired_difference(a: list[tuple[float, float]], b: list[tuple[float, float]], rng: np.random.Generator,
                      n: int = 1000) -> dict:
    """(ratio of a) − (ratio of b) over the scenes both have, with a paired bootstrap 95 % interval; "beyond"
    (a ahead) or "behind" only when the interval excludes 0 and rests on at least MIN_PAIRED_SCENES scenes."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x[1] > 0 and y[1] > 0]
    if not pairs:
        return {"difference": None, "ci95": None, "beyond": False, "behind": False, "scenes": 0}
    A = np.array([p[0] for p in pairs], dtype=float)
    B = np.array([p[1] for p in pairs], dtype=float)
    diff = A[:, 0].sum() / A[:, 1].sum() - B[:, 0].sum() / B[:, 1].sum()
    idx = rng.integers(0, len(pairs), (n, len(pairs)))
    sa, sb = A[idx].sum(axis=1), B[idx].sum(axis=1)
    d = sa[:, 0] / sa[:, 1] - sb[:, 0] / sb[:, 1]
    lo, hi = np.percentile(d, [2.5, 97.5])
    enough = len(pairs) >= MIN_PAIRED_SCENES
    return {"difference": round(float(diff), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "beyond": bool(lo > 0) and enough, "behind": bool(hi < 0) and enough, "scenes": len(pairs)}


def scenes_for_power(n: int, halfwidths: list[float], target: float, step: int = 4) -> int:
    """How many scenes should bring every half-width to `target`: an interval narrows as 1/√n, so
    n·(w/target)², rounded up to a multiple of `step` and at least `step` more than now."""
    worst = max(halfwidths)
    need = math.ceil(n * (worst / target) ** 2)
    return max(n + step, step * math.ceil(need / step))


# -- scenes, masks, concepts -------------------------------------------------------------------------------------


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


def true_concepts(scene) -> list:
    """The scene's true masks and categories as localizer concepts."""
    from client.types import Concept

    return [Concept(f"c{i}", o.category, float(o.mask.mean()), 0, [], png_mask(o.mask))
            for i, o in enumerate(scene.objects)]


def concepts_digest(concepts) -> str:
    h = hashlib.sha256()
    for c in concepts:
        h.update(f"{c.concept_id}\n{c.noun}\n".encode())
        h.update(hashlib.sha256(c.mask_png).digest())
    return h.hexdigest()[:16]


# -- the on-disk cache -------------------------------------------------------------------------------------------


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Cache:
    """One JSON record per (kind, scene), with its files in a folder beside it. The files are written first and
    the record last (atomically), so a killed run leaves either a whole result or none."""

    def __init__(self, root: Path, fresh: bool = False):
        self.root = Path(root)
        self.fresh = fresh
        self._seen: set[tuple[str, int]] = set()  # records this run wrote (never recomputed, even with --fresh)

    def _paths(self, kind: str, scene: int) -> tuple[Path, Path]:
        base = self.root / kind / f"scene-{scene}"
        return base.with_suffix(".json"), base

    def get(self, kind: str, scene: int, key: str) -> dict | None:
        record_path, folder = self._paths(kind, scene)
        if self.fresh and (kind, scene) not in self._seen:
            return None
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if record.get("key") != key:
            return None
        record["folder"] = str(folder)
        return record

    def folder(self, kind: str, scene: int) -> Path:
        """An empty folder for the files of a record about to be written."""
        _, folder = self._paths(kind, scene)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def put(self, kind: str, scene: int, key: str, record: dict) -> dict:
        record_path, folder = self._paths(kind, scene)
        record = {**record, "key": key}
        tmp = record_path.with_suffix(f".json.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, record_path)
        self._seen.add((kind, scene))
        return {**record, "folder": str(folder)}


def cached_concepts(record: dict) -> list:
    """The localizer concepts a stage-1 record holds."""
    from client.types import Concept

    folder = Path(record["folder"])
    return [Concept(c["concept_id"], c["noun"], c["area_fraction"], c["round"], [],
                    (folder / c["mask"]).read_bytes()) for c in record["concepts"]]


class Counts:
    """{metric: [right, total]} for one (row, scene)."""

    def __init__(self):
        self.counts: dict[str, list[int]] = {}

    def add(self, metric: str, right: bool) -> None:
        c = self.counts.setdefault(metric, [0, 0])
        c[0] += int(right)
        c[1] += 1


def _save_item(folder: Path, concepts, by_concept: dict[str, list[bytes]], composition: list[bytes]) -> dict | None:
    """The evaluator's inputs of one scene, written as files; the record keeps their names."""
    out = []
    for c in concepts:
        images = by_concept.get(c.concept_id) or []
        if not images:
            continue
        (folder / f"mask-{c.concept_id}.png").write_bytes(c.mask_png)
        names = []
        for n, data in enumerate(images):
            names.append(f"{c.concept_id}-{n}.png")
            (folder / names[-1]).write_bytes(data)
        out.append([c.concept_id, f"mask-{c.concept_id}.png", names])
    comp = []
    for n, data in enumerate(composition):
        comp.append(f"composition-{n}.png")
        (folder / comp[-1]).write_bytes(data)
    return {"concepts": out, "composition": comp} if out else None


# -- one unit of work each ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a unit needs besides its row and scene."""

    bundle_dir: Path
    bundle_digest: str
    schedule: Schedule
    images: int
    seed: int
    concepts_mode: str  # "stage1" | "truth": what the ICE rows learn from
    cache: Cache
    class_images: Path
    commit: str
    log: Callable[[str], None]
    device: str = "cpu"
    _bundle: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    scenes: dict[int, object] = field(default_factory=dict)

    def bundle(self):
        with self._lock:
            if self._bundle is None:
                from services.common.bundle import Bundle

                self._bundle = Bundle.open(self.bundle_dir)
            return self._bundle


def stage_one_unit(run: Run, ice, k: int) -> dict:
    from toyworld.evaluate import fg_ari

    key = _key({"v": CACHE_VERSION, "bundle": run.bundle_digest, "stage": 1})
    record = run.cache.get("stage1", k, key)
    if record is not None:
        return record
    scene = run.scenes[k]
    t0 = time.perf_counter()
    loc = ice.localize(png(scene.image))
    scores = ice.score_masks([c.mask_png for c in loc.concepts], [png_mask(o.mask) for o in scene.objects])
    labels = np.zeros(scene.label_map().shape, dtype=np.int64)
    for i, c in enumerate(loc.concepts, start=1):
        labels[c.mask() & (labels == 0)] = i
    folder = run.cache.folder("stage1", k)
    for c in loc.concepts:
        (folder / f"mask-{c.concept_id}.png").write_bytes(c.mask_png)
    record = {
        "scene": k, "truth": [o.phrase() for o in scene.objects], "categories": [o.category for o in scene.objects],
        "found": [c.noun for c in loc.concepts],
        "concepts": [{"concept_id": c.concept_id, "noun": c.noun, "area_fraction": c.area_fraction,
                      "round": c.round, "mask": f"mask-{c.concept_id}.png"} for c in loc.concepts],
        "miou": round(scores.miou, 4), "recall": round(scores.recall, 4), "precision": round(scores.precision, 4),
        "fg_ari": round(float(fg_ari(scene.label_map(), labels)), 4), "objects": len(scene.objects),
        "seconds": round(time.perf_counter() - t0, 2), "commit": run.commit,
    }
    run.log(f"stage 1: scene {k} found {record['found']} (truth {record['truth']}) mIoU {record['miou']:.2f}")
    return run.cache.put("stage1", k, key, record)


def concepts_for(run: Run, row: Row, k: int) -> list:
    source = run.concepts_mode if row.masks == "rows" else row.masks
    if source == "truth":
        return true_concepts(run.scenes[k])
    return cached_concepts(run.cache.get("stage1", k, _key({"v": CACHE_VERSION, "bundle": run.bundle_digest,
                                                              "stage": 1})))


def _read(image_png: bytes):
    from PIL import Image

    from toyworld.classify import read_object

    return read_object(Image.open(io.BytesIO(image_png)))


def _score_object(counts: Counts, reading, truth) -> None:
    counts.add("object_category", reading.category == truth.category)
    counts.add("object_colour", reading.colour == truth.colour)
    counts.add("object_texture", reading.texture == truth.texture)


def unit_key(run: Run, name: str, row: Row, concepts) -> str:
    return _key({"v": CACHE_VERSION, "bundle": run.bundle_digest, "row": asdict(row), "name": name,
                 "schedule": run.schedule.set_fields(), "images": run.images, "seed": run.seed,
                 "concepts": concepts_digest(concepts)})


def _token(learning, cid: str, role: str, attribute: str = "") -> str | None:
    for t in learning.tokens:
        if t.concept_id == cid and t.role == role and (role != "INTRINSIC" or t.attribute == attribute):
            return t.token
    return None


def generate(ice, job, kind: str, options: GenerateOptions, prompts=(), tries: int = 3) -> list:
    """The job's images, asked again from the start when the stream is cut (UNAVAILABLE: the server closes a
    connection at its maximum age, and a long stream on a busy box can outlive the grace it gives): the images
    are seeded, so a repeat is the same images."""
    from client.errors import ServiceUnavailable

    for attempt in range(tries):
        try:
            return ice.generate(job, kind, prompts=prompts, options=options)
        except ServiceUnavailable:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def ice_unit(run: Run, ice, name: str, row: Row, k: int) -> dict:
    """One learning job of an ICE row on one scene, through the learner service, and its images judged."""
    concepts = concepts_for(run, row, k)
    key = unit_key(run, name, row, concepts)
    record = run.cache.get(name, k, key)
    if record is not None:
        return record
    scene = run.scenes[k]
    counts = Counts()
    t0 = time.perf_counter()
    folder = run.cache.folder(name, k)
    item = None
    if concepts:
        sched = replace(run.schedule, **dict(row.schedule))
        gen = GenerateOptions(num_images=run.images, seed=run.seed)
        job = ice.create_job(png(scene.image), concepts, schedule=sched, ablation=row.ablation, seed=run.seed + k)
        learning = ice.wait(job)
        matched = match_concepts(concepts, scene)
        by_concept: dict[str, list[bytes]] = {}
        for g in generate(ice, job, "object_level", gen):
            by_concept.setdefault(g.concept_id, []).append(g.image_png)
            if g.concept_id in matched:
                _score_object(counts, _read(g.image_png), scene.objects[matched[g.concept_id]])
        for g in generate(ice, job, "intrinsic", gen):
            if g.concept_id not in matched or g.attribute not in ("color", "texture"):
                continue
            truth, r = scene.objects[matched[g.concept_id]], _read(g.image_png)
            if g.attribute == "color":
                counts.add("colour_token_colour", r.colour == truth.colour)
            else:
                counts.add("texture_token_texture", r.texture == truth.texture)
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
            for g in generate(ice, job, "free", gen, [s[0] for s in swaps]):
                _, category, colour = next(s for s in swaps if s[0] == g.prompt)
                r = _read(g.image_png)
                counts.add("swap", r.category == category and r.colour == colour)
        composition = []
        concept_tokens = [t.token for t in learning.tokens if t.role == "CONCEPT"]
        if len(concept_tokens) > 1:
            composition = [g.image_png for g in generate(
                ice, job, "free", gen, ["a photo of " + " and ".join(concept_tokens)])]
        item = _save_item(folder, concepts, by_concept, composition)
        ice.delete(job)
    return run.cache.put(name, k, key, {
        "row": name, "scene": k, "counts": counts.counts, "item": item, "concepts": len(concepts),
        "seconds": round(time.perf_counter() - t0, 1), "commit": run.commit})


def baseline_unit(run: Run, name: str, row: Row, k: int) -> dict:
    """One baseline run on one scene, in this process (bench/baselines.py), and its images judged the same way."""
    import baselines as B

    from client.messages import learning_request
    from services.common.settings import LearnerSettings
    from services.learner.generate import Prompt
    from services.learner.server import parse_request

    concepts = concepts_for(run, row, k)
    key = unit_key(run, name, row, concepts)
    record = run.cache.get(name, k, key)
    if record is not None:
        return record
    scene = run.scenes[k]
    counts = Counts()
    t0 = time.perf_counter()
    folder = run.cache.folder(name, k)
    item = None
    if concepts:
        bundle = run.bundle()
        # the learner's own request parser: the same training square, masks and class-image settings as a job
        spec = parse_request(learning_request(png(scene.image), concepts, schedule=run.schedule,
                                              seed=run.seed + k), bundle, LearnerSettings())
        s = spec.schedule
        schedule = B.BaselineSchedule(
            token_steps=s.phase1_steps, joint_steps=s.phase2_steps, token_learning_rate=s.embedding_learning_rate,
            joint_learning_rate=s.unet_learning_rate, num_class_images=s.num_class_images,
            class_prompt=s.class_prompt, prior_loss_weight=s.prior_loss_weight)
        if row.method == B.TEXTUAL_INVERSION:  # the same token-step budget as ICE's two token phases
            schedule = replace(schedule, token_steps=s.phase1_steps + s.phase2_steps)
        trainer = B.BaselineTrainer(bundle, B.BaselineSpec(row.method, spec.image, spec.concepts, schedule,
                                                           spec.seed),
                                    device=run.device, class_images_dir=run.class_images)
        try:
            trainer.run()
            matched = match_concepts(concepts, scene)
            by_concept: dict[str, list[bytes]] = {}
            for prompt, _n, _seed, image in trainer.images(trainer.object_prompts(), run.images, run.seed):
                data = png(image)
                by_concept.setdefault(prompt.concept_id, []).append(data)
                if prompt.concept_id in matched:
                    _score_object(counts, _read(data), scene.objects[matched[prompt.concept_id]])
            composition = []
            if len(concepts) > 1:
                composition = [png(image) for _p, _n, _s, image in trainer.images(
                    [Prompt(trainer.composition_prompt())], run.images, run.seed)]
            item = _save_item(folder, concepts, by_concept, composition)
        finally:
            trainer.release()
    return run.cache.put(name, k, key, {
        "row": name, "scene": k, "counts": counts.counts, "item": item, "concepts": len(concepts),
        "seconds": round(time.perf_counter() - t0, 1), "commit": run.commit})


def run_unit(run: Run, ice, name: str, k: int) -> dict:
    row = ROWS[name]
    return baseline_unit(run, name, row, k) if row.method else ice_unit(run, ice, name, row, k)


def run_pool(clients, tasks: list[Callable], log: Callable[[str], None], what: str) -> None:
    """Run `tasks` (each called with one client) on one thread per client; the first error stops the pool."""
    pending = list(enumerate(tasks))
    lock = threading.Lock()
    errors: list[BaseException] = []
    done, worked = [0], []  # worked: seconds of the tasks that computed something (not read from the cache)

    def worker(ice) -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                _i, task = pending.pop(0)
            started = time.perf_counter()
            try:
                task(ice)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)
                return
            with lock:
                done[0] += 1
                if time.perf_counter() - started > 1.0:
                    worked.append(time.perf_counter() - started)
                left = len(pending)
                eta = np.mean(worked) * left / len(clients) if worked else 0.0
            log(f"{what}: {done[0]}/{len(tasks)} done, about {eta / 60:.0f} min left")

    threads = [threading.Thread(target=worker, args=(ice,)) for ice in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- the whole set: aggregation ----------------------------------------------------------------------------------


def counts_of(records: list[dict], metric: str) -> list[tuple[float, float]]:
    return [tuple(r["counts"].get(metric, (0, 0))) for r in records]


def uce_of(ice, records: list[dict], source_of: Callable[[int], bytes]) -> tuple[dict, dict]:
    """(the set's UCE figures per encoder, per-scene sums {encoder_figure: [(sum, count)] per record})."""
    items, index = [], []
    for i, r in enumerate(records):
        if not r.get("item"):
            continue
        folder = Path(r["folder"])
        items.append((f"scene-{r['scene']}", source_of(r["scene"]),
                      [(cid, (folder / mask).read_bytes(), [(folder / n).read_bytes() for n in names])
                       for cid, mask, names in r["item"]["concepts"]],
                      [(folder / n).read_bytes() for n in r["item"]["composition"]]))
        index.append(i)
    per_scene = {f"{e}_{f}": [(0.0, 0.0)] * len(records) for e in ENCODERS for f in UCE_FIGURES}
    if not items:
        return {}, per_scene
    result = ice.evaluate_set(items)
    overall = {s.encoder.lower(): {"sim_i": round(s.sim_i, 4), "sim_c": None if s.sim_c is None else round(s.sim_c, 4),
                                   "acc1": round(s.acc1, 4), "acc3": round(s.acc3, 4),
                                   "concepts_in_scope": s.concepts_in_scope} for s in result.scores}
    for i, (_item_id, scores) in zip(index, result.items, strict=True):
        for s in scores:
            e = s.encoder.lower()
            n = len(s.concepts)
            for f in ("sim_i", "acc1", "acc3"):
                per_scene[f"{e}_{f}"][i] = (sum(getattr(c, f) for c in s.concepts), float(n))
            if s.sim_c is not None:
                per_scene[f"{e}_sim_c"][i] = (s.sim_c, 1.0)
    return overall, per_scene


def stage_one_summary(records: list[dict], rng: np.random.Generator) -> dict:
    """Stage 1 over the scenes, each object counting once (a scene's mask scores weigh by its objects)."""
    tp = n_true = n_pred = 0
    for r in records:
        truth, found = set(r["categories"]), set(r["found"])
        tp, n_true, n_pred = tp + len(truth & found), n_true + len(truth), n_pred + len(found)
    out = {"noun_recall": round(tp / max(n_true, 1), 4), "noun_precision": round(tp / max(n_pred, 1), 4)}
    for figure in ("miou", "recall", "precision"):
        out[f"mask_{figure}"] = bootstrap([(r[figure] * r["objects"], r["objects"]) for r in records], rng)
    out["fg_ari"] = round(float(np.nanmean([r["fg_ari"] for r in records])), 4) if records else None
    out["per_scene"] = [{k: r[k] for k in ("scene", "truth", "found", "miou", "fg_ari")} for r in records]
    return out


def aggregate(rows: list[str], records: dict[str, list[dict]], uce: dict, uce_scenes: dict,
              rng: np.random.Generator) -> tuple[dict, dict]:
    table, comparisons = {}, {}
    for name in rows:
        row = ROWS[name]
        entry = {}
        for m in METRICS:
            entry[m] = (bootstrap(counts_of(records[name], m), rng) if applicable(row, m)
                        else {"value": None, "ci95": None, "halfwidth": None, "n": 0, "scenes": 0,
                              "not_applicable": "one token per object: no colour or texture token"})
        entry["uce"] = {}
        for e in ENCODERS:
            for f in UCE_FIGURES:
                b = bootstrap(uce_scenes[name][f"{e}_{f}"], rng)
                b["value"] = uce[name].get(e, {}).get(f)  # the evaluator's own figure over the whole set
                entry["uce"].setdefault(e, {})[f] = b
        entry["uce_concepts_in_scope"] = {e: uce[name].get(e, {}).get("concepts_in_scope") for e in ENCODERS}
        seconds = [r["seconds"] for r in records[name] if r["concepts"]]
        entry["seconds_per_scene"] = round(float(np.mean(seconds)), 1) if seconds else None
        entry.update({"label": row.label, "changes": row.changes, "group": row.group,
                      "ablation": row.ablation or "none", "schedule": dict(row.schedule),
                      "method": row.method or "ice",
                      "learns_from": row.masks, "commits": sorted({r["commit"] for r in records[name]})})
        table[name] = entry
    if "full" in rows:
        for name in rows:
            if name == "full":
                continue
            row = ROWS[name]
            comp = {m: paired_difference(counts_of(records["full"], m), counts_of(records[name], m), rng)
                    for m in METRICS if applicable(row, m)}
            for key in uce_scenes["full"]:
                comp[key] = paired_difference(uce_scenes["full"][key], uce_scenes[name][key], rng)
            comparisons[name] = comp
    return table, comparisons


# -- main --------------------------------------------------------------------------------------------------------


def bundle_digest(bundle_dir: Path) -> str:
    return str(json.loads((bundle_dir / "bundle.json").read_text(encoding="utf-8"))["digest"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/quality.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default bench/results/quality.json, quality-true-masks.json with "
                        "--concepts truth, build/quality-quick/quality.json with --quick)")
    p.add_argument("--scenes", type=int, default=None,
                   help=f"held-out scenes with two or three objects to start with (default {SCENES}; --quick 2)")
    p.add_argument("--max-scenes", type=int, default=None,
                   help="scenes are added until the full row reaches the power target or this many (default "
                        "3 × --scenes; --quick: no scenes added)")
    p.add_argument("--target-halfwidth", type=float, default=TARGET_HALFWIDTH,
                   help="half-width of the full row's colour-token and object-category 95 %% intervals to reach")
    p.add_argument("--first-scene", type=int, default=FIRST_SCENE, help="the scenes are the first ones from here on")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    p.add_argument("--images", type=int, default=None, help=f"images per prompt (default {IMAGES}; --quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a short schedule, 2 scenes unless --scenes, 2 images per prompt, every row: a smoke run "
                        "of the whole harness (minutes per row), written to build/quality-quick/")
    p.add_argument("--concepts", choices=("stage1", "truth"), default="stage1",
                   help="what the ICE rows (and Textual Inversion) learn from: stage 1's masks and nouns (the "
                        "whole method, default) or the true masks and categories (stage 2 alone)")
    p.add_argument("--parallel", type=int, default=2,
                   help="sets of services working side by side, one CPU thread each (default 2: two cores)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder of the cache and the services' logs (default build/quality/, build/quality-quick/)")
    p.add_argument("--fresh", action="store_true", help="recompute every cached (row, scene) result")
    p.add_argument("--no-tables", action="store_true", help="do not refresh the tables in docs/ and README.md")
    a = p.parse_args(argv)
    schedule = QUICK_SCHEDULE if a.quick else SCHEDULE
    a.scenes = a.scenes or (2 if a.quick else SCENES)
    a.images = a.images or (2 if a.quick else IMAGES)
    a.max_scenes = a.max_scenes or (a.scenes if a.quick else 3 * a.scenes)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if a.out is None:
        a.out = QUICK_OUT if a.quick else (
            DEFAULT_OUT if a.concepts == "stage1" else DEFAULT_OUT.with_name("quality-true-masks.json"))
    work = (a.work or ROOT / "build" / ("quality-quick" if a.quick else "quality")) / (
        "stage1" if a.concepts == "stage1" else "true-masks")
    workers = max(1, a.parallel)
    if workers > 1:  # services side by side: one intra-op thread each, or they fight over the same cores
        os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["ICE_CLASS_IMAGES_DIR"] = str(ROOT / "build" / "quality-class-images")  # shared by every set

    import torch

    from client.devservers import DevServices
    from client.sdk import IceClient
    from services.common.service import resolve_device
    from toyworld.train import git_commit

    if workers > 1:
        torch.set_num_threads(1)  # the baselines train in this process, one per worker thread
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[quality {time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    run = Run(a.bundle, bundle_digest(a.bundle), schedule, a.images, a.seed, a.concepts,
              Cache(work / "cache", fresh=a.fresh), Path(os.environ["ICE_CLASS_IMAGES_DIR"]), git_commit(), log,
              device=resolve_device("auto"))
    scenes = [k for k, _ in multi_object_scenes(a.first_scene, a.scenes)]
    run.scenes.update(multi_object_scenes(a.first_scene, a.max_scenes))
    sets = []
    for i in range(workers):  # a killed run's unfinished jobs would resume and hold the queue: start empty
        shutil.rmtree(work / f"set{i}" / "jobs", ignore_errors=True)
        sets.append(DevServices(a.bundle, log_dir=work / f"set{i}" / "logs", job_store=work / f"set{i}" / "jobs"))
    log(f"starting {workers} set(s) of services on {a.bundle} ...")
    power: dict = {}
    try:
        for services in sets:
            services.start(timeout=900)
        clients = [IceClient(**services.targets()) for services in sets]
        bundle_info = clients[0].server_info("learner").get("bundle", {})

        done: dict[tuple[str, int], dict] = {}  # (row or "stage1", scene) -> its record

        def stage_one(ks):
            def task(ice, k):
                done["stage1", k] = stage_one_unit(run, ice, k)
            run_pool(clients, [lambda ice, k=k: task(ice, k) for k in ks], log, "stage 1")

        def units(name, ks):
            def task(ice, k):
                done[name, k] = run_unit(run, ice, name, k)
            run_pool(clients, [lambda ice, k=k: task(ice, k) for k in ks], log, name)

        stage_one(scenes)
        if "full" in rows:  # the full row first: it decides how many scenes the rest need
            while True:
                units("full", scenes)
                records = [done["full", k] for k in scenes]
                rng = np.random.default_rng(a.seed)
                widths = {m: bootstrap(counts_of(records, m), rng)["halfwidth"] for m in POWER_FIGURES}
                known = [w for w in widths.values() if w is not None]
                reached = bool(known) and len(known) == len(widths) and max(known) <= a.target_halfwidth
                power = {"target_halfwidth": a.target_halfwidth, "figures": POWER_FIGURES, "halfwidths": widths,
                         "reached": reached, "scenes": len(scenes), "max_scenes": a.max_scenes}
                log(f"power: full row half-widths {widths} on {len(scenes)} scenes (target ±{a.target_halfwidth})")
                if reached or len(scenes) >= a.max_scenes or not known:
                    break
                more = min(a.max_scenes, scenes_for_power(len(scenes), known, a.target_halfwidth))
                scenes = [k for k, _ in multi_object_scenes(a.first_scene, more)]
                log(f"power: extending to {len(scenes)} scenes")
                stage_one(scenes)
        for name in rows:
            if name != "full":
                units(name, scenes)

        records = {name: [done[name, k] for k in scenes] for name in rows}
        log("UCE metrics over the whole set, row by row")
        uce, uce_scenes = {}, {}
        for name in rows:
            uce[name], uce_scenes[name] = uce_of(clients[0], records[name], lambda k: png(run.scenes[k].image))
        stage1_records = [done["stage1", k] for k in scenes]
        for ice in clients:
            ice.close()
    finally:
        for services in sets:
            services.stop()

    rng = np.random.default_rng(a.seed)
    table, comparisons = aggregate(rows, records, uce, uce_scenes, rng)
    all_seconds = [r["seconds"] for name in rows for r in records[name] if r["concepts"]]
    results = {
        "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), {os.cpu_count()} cores",
        "commit": run.commit, "date": time.strftime("%Y-%m-%d %H:%M"), "bundle": bundle_info,
        "scenes": scenes, "objects": sum(len(run.scenes[k].objects) for k in scenes), "quick": a.quick,
        "images_per_prompt": a.images,
        "stage_two_learns_from": "the true masks and categories" if a.concepts == "truth" else "stage 1's output",
        "schedule": schedule.set_fields(), "parallel": workers,
        "stage_one": stage_one_summary(stage1_records, np.random.default_rng(a.seed)),
        "rows": table, "full_vs_row": comparisons, "power": power,
        "seconds_per_unit": round(float(np.mean(all_seconds)), 1) if all_seconds else None,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    log(f"wrote {a.out}")
    if not a.quick and not a.no_tables and a.out == DEFAULT_OUT:
        import quality_tables

        for path in quality_tables.write(results):
            log(f"refreshed the tables in {path}")
    return 0


def _cell(v: dict) -> str:
    if v.get("value") is None:
        return "n/a" if v.get("not_applicable") else "–"
    if not v.get("ci95"):
        return f"{v['value']:.2f}"
    return f"{v['value']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"


def print_table(results: dict) -> None:
    s = results["stage_one"]
    print(f"\nstage 1: noun recall {s['noun_recall']:.2f} precision {s['noun_precision']:.2f} | mask mIoU "
          f"{_cell(s['mask_miou'])} recall {_cell(s['mask_recall'])} precision {_cell(s['mask_precision'])} | "
          f"FG-ARI {s['fg_ari']}")
    head = ["row", *METRICS, "SIM^I clip", "SIM^C clip", "ACC^1 clip", "ACC^3 clip", "ACC^1 dino", "s/scene"]
    print(" | ".join(head))
    for name, row in results["rows"].items():
        cells = [name, *(_cell(row[m]) for m in METRICS)]
        clip, dino = row["uce"].get("clip", {}), row["uce"].get("dino", {})
        for key in UCE_FIGURES:
            v = clip.get(key, {}).get("value")
            cells.append("–" if v is None else f"{v:.3f}")
        v = dino.get("acc1", {}).get("value")
        cells.append("–" if v is None else f"{v:.3f}")
        cells.append(str(row["seconds_per_scene"]))
        print(" | ".join(cells))
    for name, comp in results["full_vs_row"].items():
        beyond = [m for m, d in comp.items() if d["beyond"]]
        behind = [m for m, d in comp.items() if d["behind"]]
        print(f"full ICE vs {name}: ahead beyond the interval on {', '.join(beyond) or 'no figure'}"
              + (f"; behind on {', '.join(behind)}" if behind else ""))
    if results.get("power"):
        pw = results["power"]
        print(f"power: half-widths {pw['halfwidths']} on {pw['scenes']} scenes, target ±{pw['target_halfwidth']}: "
              f"{'reached' if pw['reached'] else 'not reached'}")


if __name__ == "__main__":
    sys.exit(main())
