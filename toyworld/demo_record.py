"""What `make demo` found on a ToyWorld scene, set beside the truth (bench/results/demo.json).

For each concept of the extraction: its noun, the true object its mask overlaps most (IoU), and what the
procedural classifiers read off its generated grids — the object-level images for the category, the colour
token's images ("a <token> color") for the colour, the texture token's for the texture — as the share of images
that show the true value and whether the majority does.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from toyworld.classify import read_object
from toyworld.world import Scene

GRIDS = (  # (what is judged, the images' kind, their attribute, the axis read)
    ("category", "OBJECT_LEVEL", "", "category"),
    ("colour", "INTRINSIC", "color", "colour"),
    ("texture", "INTRINSIC", "texture", "texture"),
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def demo_record(extraction, scene: Scene, scene_index: int) -> dict:
    """The record of one extraction (client.types.Extraction) of `scene`."""
    concepts = []
    for c in extraction.localization.concepts:
        mask = c.mask()
        ious = [_iou(mask, o.mask) for o in scene.objects]
        best = int(np.argmax(ious)) if ious else -1
        obj = scene.objects[best] if best >= 0 and ious[best] > 0 else None
        entry = {"concept": c.concept_id, "noun": c.noun, "matched_object": obj.phrase() if obj else None,
                 "mask_iou": round(ious[best], 3) if obj else 0.0,
                 "noun_right": bool(obj and obj.category == c.noun), "grids": {}}
        for name, kind, attribute, axis in GRIDS:
            readings = [getattr(read_object(g.pil()), axis) for g in extraction.images_for(c.concept_id, kind, attribute)]
            if not readings:
                continue
            majority = Counter(readings).most_common(1)[0][0]
            truth = getattr(obj, axis) if obj else None
            entry["grids"][name] = {"images": len(readings), "read": dict(Counter(readings)), "truth": truth,
                                    "share_true": round(sum(r == truth for r in readings) / len(readings), 3),
                                    "majority_true": majority == truth}
        concepts.append(entry)
    found = [c["noun"] for c in concepts]
    true = sorted({o.category for o in scene.objects})
    return {
        "scene": scene_index, "truth": [o.phrase() for o in scene.objects], "found": found,
        "every_object_named": sorted(set(found)) == true and len(found) == len(scene.objects),
        "concepts": concepts,
        "seconds": {k: round(v, 1) for k, v in extraction.seconds.items()},
    }


def summary_lines(record: dict) -> list[str]:
    """A few lines for the terminal."""
    lines = [f"truth: {', '.join(record['truth'])}; found: {', '.join(record['found']) or 'nothing'}"
             + (" (every object named)" if record["every_object_named"] else "")]
    for c in record["concepts"]:
        grids = "; ".join(f"{name} grid {g['share_true']:.0%} {g['truth']}" for name, g in c["grids"].items())
        lines.append(f"  {c['concept']} '{c['noun']}' -> {c['matched_object'] or 'no object'} "
                     f"(mask IoU {c['mask_iou']:.2f}){': ' + grids if grids else ''}")
    return lines
