"""Measure what the ToyWorld bundle has learned: `make toy-eval` (python -m toyworld.evaluate).

1. Generation ceiling: single-object prompts with the world's own words ("a red striped ball"), on combinations
   seen in training and on the held-out ones, judged by the procedural classifiers (colour, category, texture).
2. CLIP zero-shot accuracy on single objects (category, colour, texture), and a DINO nearest-neighbour check.
   The retriever's geometry: on held-out scenes, how often a true category is among the three vocabulary nouns
   nearest the image in the centred space stage 1 retrieves in (`--compare-clip` measures another CLIP there).
3. Stage 1 on held-out test scenes through the localizer's own code with the bundle's recommended options: noun
   recall and precision against the true categories, mask mIoU / recall / precision with the evaluator's own
   matching, the foreground adjusted Rand index, and the share of multi-object scenes whose every object is named.
4. What stage 1 relies on: the binding figure (the share of a noun's cross-attention mass over the objects that
   lies on its own object, for the vote prompt "<category> things background"; toyworld/grounding.py) and the
   largest plain text cosine between two category words (the negative filter drops a candidate at ≥ 0.85).

Writes bench/results/toyworld.json (machine, commit, wall time, every figure) and prints a summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toyworld.classify import read_object
from toyworld.world import CATEGORIES, COLOURS, HELD_OUT, TEXTURES, held_out_scene, single_object

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "toyworld" / "bundle"
DEFAULT_OUT = ROOT / "bench" / "results" / "toyworld.json"


def object_prompt(colour: str, category: str, texture: str) -> str:
    return f"a {colour} {category}" if texture == "plain" else f"a {colour} {texture} {category}"


def generation_pipeline(bundle):
    from diffusers import DPMSolverMultistepScheduler

    from services.learner.generate import generation_defaults

    pipe = bundle.load_diffusion("cpu", torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe, generation_defaults(bundle)


def generate_images(pipe, defaults, prompts: list[str], seeds: list[int], batch: int = 16) -> list:
    images = []
    for start in range(0, len(prompts), batch):
        p, s = prompts[start : start + batch], seeds[start : start + batch]
        out = pipe(p, num_inference_steps=defaults.num_inference_steps, guidance_scale=defaults.guidance_scale,
                   generator=[torch.Generator("cpu").manual_seed(x) for x in s]).images
        images.extend(out)
    return images


def generation_ceiling(bundle, per_combo: int, seen_combos: int, rng: np.random.Generator) -> dict:
    """Accuracy of colour, category and texture of images generated from the world's words."""
    pipe, defaults = generation_pipeline(bundle)
    all_combos = list(itertools.product(COLOURS, CATEGORIES, TEXTURES))
    seen = [c for c in all_combos if c not in HELD_OUT]
    seen = [seen[i] for i in rng.choice(len(seen), min(seen_combos, len(seen)), replace=False)]
    groups = {"seen": seen, "held_out": sorted(HELD_OUT)}
    out: dict = {"sampler": f"DPM-Solver++ {defaults.num_inference_steps} steps, guidance {defaults.guidance_scale}",
                 "images_per_prompt": per_combo}
    for name, combos in groups.items():
        prompts, truth, seeds = [], [], []
        for k, (colour, category, texture) in enumerate(combos):
            for j in range(per_combo):
                prompts.append(object_prompt(colour, category, texture))
                truth.append((colour, category, texture))
                seeds.append(1000 * k + j)
        images = generate_images(pipe, defaults, prompts, seeds)
        readings = [read_object(im) for im in images]
        n = len(readings)
        out[name] = {
            "prompts": len(combos), "images": n,
            "found": round(sum(r.found for r in readings) / n, 4),
            "colour": round(sum(r.colour == t[0] for r, t in zip(readings, truth, strict=True)) / n, 4),
            "category": round(sum(r.category == t[1] for r, t in zip(readings, truth, strict=True)) / n, 4),
            "texture": round(sum(r.texture == t[2] for r, t in zip(readings, truth, strict=True)) / n, 4),
            "all_three": round(sum((r.colour, r.category, r.texture) == t
                                   for r, t in zip(readings, truth, strict=True)) / n, 4),
        }
        out.setdefault("_images", []).extend(images[: 2 * per_combo * 6])
    return out


@torch.no_grad()
def clip_zero_shot(bundle, rng: np.random.Generator) -> dict:
    """CLIP zero-shot accuracy on single objects, one per colour × category × texture combination."""
    model, preprocess, tokenize = bundle.load_clip()
    combos = list(itertools.product(COLOURS, CATEGORIES, TEXTURES))
    scenes = [single_object(c, k, t, seed=int(rng.integers(1 << 30)), background=str(rng.choice(["white", "gray",
                                                                                                 "beige"])))
              for c, k, t in combos]
    x = torch.stack([preprocess(s.image) for s in scenes])
    img = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)

    def accuracy(labels: list[str], template: str, truth: list[str]) -> float:
        txt = torch.nn.functional.normalize(model.encode_text(tokenize([template.format(w) for w in labels])).float(),
                                            dim=-1)
        pred = (img @ txt.T).argmax(1).tolist()
        return round(float(np.mean([labels[p] == t for p, t in zip(pred, truth, strict=True)])), 4)

    return {
        "images": len(scenes),
        "category": accuracy(list(CATEGORIES), "a photo of a {}", [k for _, k, _ in combos]),
        "colour": accuracy(list(COLOURS), "a {} color", [c for c, _, _ in combos]),
        "texture": accuracy(list(TEXTURES), "a {} texture", [t for _, _, t in combos]),
        "prompts": {"category": "a photo of a {category}", "colour": "a {colour} color",
                    "texture": "a {texture} texture"},
    }


@torch.no_grad()
def dino_neighbours(bundle, rng: np.random.Generator) -> dict:
    """Leave-one-out nearest neighbour (cosine of CLS features) over single objects: does DINO group what the
    world groups, without ever seeing a label?"""
    model, preprocess = bundle.load_dino()
    combos = list(itertools.product(COLOURS, CATEGORIES, TEXTURES)) * 2
    scenes = [single_object(c, k, t, seed=int(rng.integers(1 << 30))) for c, k, t in combos]
    x = torch.stack([preprocess(s.image) for s in scenes])
    feats = torch.nn.functional.normalize(model(pixel_values=x).last_hidden_state[:, 0].float(), dim=-1)
    sim = feats @ feats.T
    sim.fill_diagonal_(-2)
    nn = sim.argmax(1).tolist()
    out = {"images": len(scenes)}
    for axis, name in ((0, "colour"), (1, "category"), (2, "texture")):
        out[name] = round(float(np.mean([combos[i][axis] == combos[j][axis] for i, j in enumerate(nn)])), 4)
    return out


@torch.no_grad()
def category_word_cosines(bundle) -> dict:
    """Plain text cosines between the category words (each word alone, L2-normalised: the space the localizer's
    negative filter compares the previous round's noun in)."""
    from services.localizer.retriever import NEGATIVE_COSINE

    vocab = bundle.load_vocabulary()
    words = [w for w in CATEGORIES if w in vocab]
    plain = vocab.plain[[vocab.index(w) for w in words]].float()
    cos = plain @ plain.T
    pairs = {f"{a}-{b}": round(float(cos[i, j]), 4) for i, a in enumerate(words) for j, b in enumerate(words) if i < j}
    worst = max(pairs, key=pairs.get)
    return {"largest": pairs[worst], "largest_pair": worst, "filtered_pairs": sum(v >= NEGATIVE_COSINE for v in
            pairs.values()), "negative_filter_threshold": NEGATIVE_COSINE, "pairs": pairs}


def binding(bundle, n_scenes: int) -> dict:
    """The binding figure on held-out scenes with 2–3 objects of distinct categories (toyworld/grounding.py)."""
    from services.localizer.pipeline import LocalizeOptions
    from toyworld.grounding import binding_scenes, binding_share

    pipe = bundle.load_diffusion("cpu", torch.float32)
    timestep = bundle.recommended_defaults("localize", LocalizeOptions()).timestep
    return binding_share(pipe, binding_scenes(n_scenes), timestep)


@torch.no_grad()
def retriever_nouns(bundle, n_scenes: int, clip_weights: Path | None = None) -> dict:
    """Top-3 noun recall in the retriever's centred geometry (SpLiCE's): every vocabulary word embedded alone and
    centred, the image embedding centred by the image mean; a true category counts when it is among the three
    nouns nearest the whole scene. With `clip_weights` (same config as the bundle's CLIP, e.g. a checkpoint of
    the training run), the dictionary and the image mean are recomputed for that CLIP the way the bundle's were."""
    from services.common.assemble import compute_image_mean, compute_text_dictionary
    from toyworld.train import mean_image_scenes

    model, preprocess, tokenize = bundle.load_clip()
    vocab = bundle.load_vocabulary()
    text, mean = vocab.text.float(), vocab.image_mean.float()
    if clip_weights is not None:
        import copy

        from safetensors.torch import load_file

        model = copy.deepcopy(model)
        model.load_state_dict(load_file(str(clip_weights)))
        model.float().eval()
        text = compute_text_dictionary(model, tokenize, list(vocab.words)).float()
        mean = compute_image_mean(model, preprocess, (s.image for s in mean_image_scenes()))  # as the bundle's
    nouns = torch.nonzero(vocab.nouns_mask()).flatten()
    hits = first = total = 0
    for k in range(n_scenes):
        scene = held_out_scene(k)
        z = torch.nn.functional.normalize(model.encode_image(preprocess(scene.image)[None]).float(), dim=-1)[0]
        z = torch.nn.functional.normalize(z - mean, dim=-1)
        sims = text[nouns] @ z
        top = [vocab.words[int(nouns[i])] for i in torch.topk(sims, 3).indices]
        truth = {o.category for o in scene.objects}
        hits += len(truth & set(top))
        first += top[0] in truth
        total += len(truth)
    return {"scenes": n_scenes, "objects": total, "clip": "bundle" if clip_weights is None else _shown(clip_weights),
            "top3_noun_recall": round(hits / max(total, 1), 4), "nearest_noun_correct": round(first / n_scenes, 4)}


def fg_ari(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Adjusted Rand index over the foreground pixels of the truth (the object-centric learning convention)."""
    from sklearn.metrics import adjusted_rand_score

    fg = truth > 0
    return float(adjusted_rand_score(truth[fg], predicted[fg])) if fg.any() else float("nan")


def round_one_vote(localizer, scenes: list) -> dict:
    """Where the pixels go in the first round's vote (the prompt "<noun> things background", the round-one noun
    as the localizer retrieves it): the share of the named object's pixels, of the OTHER objects' pixels and of
    the plain background voted to the noun, "things" and "background". The loop can find a second object only
    if the other objects are not voted to the first noun (the noun's segments are removed after the round)."""
    o = localizer.defaults
    pixels = {"named_object": np.zeros(3), "other_objects": np.zeros(3), "background": np.zeros(3)}
    for scene in scenes:
        noun = localizer.retriever.retrieve(scene.image, o.l1_penalty).noun
        if noun is None:
            continue
        square = np.asarray(scene.image.resize((localizer.size, localizer.size), Image.Resampling.BICUBIC))
        seg, _ = localizer.segment_noun(square, noun, o)
        voted = seg.segment_words[seg.labels]  # [S, S]: the index of the prompt word each pixel was voted to
        voted = np.asarray(Image.fromarray(voted.astype(np.uint8)).resize(scene.image.size, Image.Resampling.NEAREST))
        objects = np.zeros(voted.shape, dtype=bool)
        for obj in scene.objects:
            objects |= obj.mask
            key = "named_object" if obj.category == noun else "other_objects"
            pixels[key] += np.bincount(voted[obj.mask], minlength=3)[:3]
        pixels["background"] += np.bincount(voted[~objects], minlength=3)[:3]
    return {key: dict(zip(("noun", "things", "background"), np.round(v / max(v.sum(), 1), 3).tolist(), strict=True))
            for key, v in pixels.items()}


def stage_one(bundle, n_scenes: int, overrides: dict[str, str] | None = None) -> dict:
    """The localizer's own loop on held-out test scenes (the bundle's recommended options, or those with
    `overrides`, e.g. {"l1_penalty": "0.05"})."""
    import dataclasses

    from services.evaluator.masks import score_masks
    from services.localizer.pipeline import Localizer

    localizer = Localizer(bundle)
    if overrides:
        known = {f.name: f for f in dataclasses.fields(localizer.defaults)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise SystemExit(f"unknown localizer option(s) {unknown}; known: {sorted(known)}")
        cast = {k: int if getattr(localizer.defaults, k) is None else type(getattr(localizer.defaults, k))
                for k in overrides}
        localizer.defaults = dataclasses.replace(localizer.defaults, **{k: cast[k](v) for k, v in overrides.items()})
    per_mask = []
    tp = n_pred = n_true = 0
    aris, rounds, seconds, per_scene, first_right = [], [], [], [], []
    scenes = [held_out_scene(k) for k in range(n_scenes)]
    for k, scene in enumerate(scenes):
        t0 = time.perf_counter()
        result = localizer.localize(scene.image)
        seconds.append(time.perf_counter() - t0)
        rounds.append(result.rounds)
        truth_nouns = {o.category for o in scene.objects}
        pred_nouns = {c.noun for c in result.concepts}
        first_right.append(bool(result.concepts) and result.concepts[0].noun in truth_nouns)
        tp += len(truth_nouns & pred_nouns)
        n_true += len(truth_nouns)
        n_pred += len(pred_nouns)
        scores = score_masks([c.mask for c in result.concepts], [o.mask for o in scene.objects])
        per_mask.append(scores)
        labels = np.zeros(scene.image.size[::-1], dtype=np.int64)
        for i, c in enumerate(result.concepts, start=1):
            labels[c.mask & (labels == 0)] = i
        aris.append(fg_ari(scene.label_map(), labels))
        per_scene.append({"scene": k, "truth": sorted(o.phrase() for o in scene.objects),
                          "found": [c.noun for c in result.concepts], "miou": round(scores.miou, 3),
                          "fg_ari": round(aris[-1], 3),
                          "stop": result.stop_reason})
    all_named = [set(p["found"]) == {o.category for o in sc.objects}
                 for p, sc in zip(per_scene, scenes, strict=True) if len(sc.objects) >= 2]
    iou = np.concatenate([s.iou for s in per_mask])
    recall = np.concatenate([s.recall for s in per_mask])
    precision = np.concatenate([s.precision for s in per_mask])
    return {
        "scenes": n_scenes, "objects": int(iou.size),
        "options": {k: v for k, v in localizer.defaults.__dict__.items()}, "options_changed": sorted(overrides or ()),
        "noun_recall": round(tp / max(n_true, 1), 4), "noun_precision": round(tp / max(n_pred, 1), 4),
        "first_noun_correct": round(float(np.mean(first_right)), 4),
        "multi_object_scenes": len(all_named),
        "multi_object_all_named": round(float(np.mean(all_named)), 4) if all_named else None,
        "stop_reasons": {r: sum(p["stop"] == r for p in per_scene) for r in sorted({p["stop"] for p in per_scene})},
        "mask_miou": round(float(np.nanmean(iou)), 4), "mask_recall": round(float(np.nanmean(recall)), 4),
        "mask_precision": round(float(np.nanmean(precision)), 4),
        "fg_ari": round(float(np.nanmean(aris)), 4),
        "mean_rounds": round(float(np.mean(rounds)), 2), "seconds_per_scene": round(float(np.mean(seconds)), 3),
        "round_one_vote": round_one_vote(localizer, scenes),
        "per_scene": per_scene,
    }


def save_sheet(images: list, path: Path, columns: int = 12) -> None:
    from PIL import Image

    if not images:
        return
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _shown(path: Path) -> str:
    """A path as the results show it: relative to the repository when inside it (no build-machine paths)."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return path.name


def main(argv: list[str] | None = None) -> int:
    from services.common.bundle import Bundle

    p = argparse.ArgumentParser(prog="python -m toyworld.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--scenes", type=int, default=60, help="held-out scenes for stage 1")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--binding-scenes", type=int, default=40, help="held-out scenes for the binding figure")
    p.add_argument("--seen-combos", type=int, default=48, help="seen combinations sampled for generation")
    p.add_argument("--quick", action="store_true", help="a few of everything (minutes)")
    p.add_argument("--stage1-option", action="append", default=[], metavar="NAME=VALUE",
                   help="run stage 1 with this localizer option instead of the bundle's recommended value "
                        "(repeatable), e.g. l1_penalty=0.05")
    p.add_argument("--compare-clip", type=Path, default=None, metavar="SAFETENSORS",
                   help="also measure the retriever's noun geometry with these CLIP weights (the bundle's config)")
    a = p.parse_args(argv)
    if a.quick:
        a.scenes, a.images_per_prompt, a.seen_combos, a.binding_scenes = 12, 1, 12, 6
    t0 = time.perf_counter()
    bundle = Bundle.open(a.bundle)
    rng = np.random.default_rng(0)
    from toyworld.train import git_commit

    result: dict = {"bundle": {"name": bundle.name, "digest": bundle.digest, "path": _shown(a.bundle)},
                    "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
                    + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
                    "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "quick": a.quick}
    print("toy-eval: generation ceiling ...", flush=True)
    gen = generation_ceiling(bundle, a.images_per_prompt, a.seen_combos, rng)
    save_sheet(gen.pop("_images"), a.out.parent / "toyworld-generation.png")
    result["generation"] = gen
    print("toy-eval: CLIP zero-shot, DINO neighbours ...", flush=True)
    result["clip_zero_shot"] = clip_zero_shot(bundle, rng)
    result["dino_nearest_neighbour"] = dino_neighbours(bundle, rng)
    result["retriever_nouns"] = retriever_nouns(bundle, a.scenes)
    result["category_word_cosine"] = category_word_cosines(bundle)
    print("toy-eval: binding of nouns to their objects ...", flush=True)
    result["binding"] = binding(bundle, a.binding_scenes)
    if a.compare_clip is not None:
        result["retriever_nouns_compared"] = retriever_nouns(bundle, a.scenes, a.compare_clip)
    print(f"toy-eval: stage 1 on {a.scenes} held-out scenes ...", flush=True)
    overrides = dict(o.split("=", 1) for o in a.stage1_option)
    result["stage_one"] = stage_one(bundle, a.scenes, overrides)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    g, c, s = result["generation"], result["clip_zero_shot"], result["stage_one"]
    print(f"generation (seen)     colour {g['seen']['colour']:.2f}  category {g['seen']['category']:.2f}  "
          f"texture {g['seen']['texture']:.2f}  all three {g['seen']['all_three']:.2f}")
    print(f"generation (held out) colour {g['held_out']['colour']:.2f}  category {g['held_out']['category']:.2f}  "
          f"texture {g['held_out']['texture']:.2f}  all three {g['held_out']['all_three']:.2f}")
    print(f"CLIP zero-shot        category {c['category']:.2f}  colour {c['colour']:.2f}  texture {c['texture']:.2f}")
    d = result["dino_nearest_neighbour"]
    print(f"DINO 1-NN             category {d['category']:.2f}  colour {d['colour']:.2f}  texture {d['texture']:.2f}")
    for key in ("retriever_nouns", "retriever_nouns_compared"):
        if key in result:
            r = result[key]
            print(f"retriever ({r['clip']}) top-3 noun recall {r['top3_noun_recall']:.2f}  "
                  f"nearest noun right {r['nearest_noun_correct']:.2f}")
    cw, bd = result["category_word_cosine"], result["binding"]
    print(f"category words        largest plain cosine {cw['largest']:.2f} ({cw['largest_pair']}); "
          f"{cw['filtered_pairs']} pairs at >= {cw['negative_filter_threshold']} (the negative filter drops them)")
    print(f"binding               a noun's attention on its own object: {bd['16x16']:.2f} at 16x16, "
          f"{bd['8x8']:.2f} at 8x8 (chance {bd['chance']:.2f}; {bd['objects']} objects)")
    print(f"stage 1 ({s['scenes']} scenes)  noun recall {s['noun_recall']:.2f}  precision {s['noun_precision']:.2f}  "
          f"mask mIoU {s['mask_miou']:.2f}  recall {s['mask_recall']:.2f}  precision {s['mask_precision']:.2f}  "
          f"FG-ARI {s['fg_ari']:.2f}  first noun right {s['first_noun_correct']:.2f}  stops {s['stop_reasons']}")
    if s["multi_object_all_named"] is not None:
        print(f"stage 1               every object named right in {s['multi_object_all_named']:.2f} of the "
              f"{s['multi_object_scenes']} scenes with 2-3 objects")
    v = s["round_one_vote"]
    print("stage 1 round one: voted to the noun " + ", ".join(f"{v[k]['noun']:.2f} of the {k.replace('_', ' ')}"
                                                           for k in ("named_object", "other_objects", "background"))
          + f"; \"things\" {v['background']['things']:.2f} of the background")
    print(f"toy-eval: wrote {a.out} in {result['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
