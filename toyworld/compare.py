"""Are two toy-eval results the same within noise? `python -m toyworld.compare REFERENCE.json OTHER.json`.

Used to check that `make toy-train` from scratch reproduces the committed bundle: evaluate the new bundle with
`python -m toyworld.evaluate --bundle DIR --out OTHER.json` and compare it with bench/results/toyworld.json.

Each figure is a share of n items (images, objects, scenes) or a mean over scenes. Two bundles trained the same
way differ by more than sampling noise alone (float reductions, thread counts), so the yardstick is generous but
stated: a difference is *within noise* when it is at most two standard errors of a difference between two
independent measurements, 2·√2·σ, with σ = √(p(1−p)/n) at the pooled share p for a share and the pooled
standard deviation over scenes / √n for a mean, and never below one item (1/n). Exit status 0 when every figure
is within noise, 1 otherwise, 2 on unusable input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# (label, path to the share, path to its item count); a count given as an int is fixed by the evaluation
SHARES = (
    ("generation, seen: colour", ("generation", "seen", "colour"), ("generation", "seen", "images")),
    ("generation, seen: category", ("generation", "seen", "category"), ("generation", "seen", "images")),
    ("generation, seen: texture", ("generation", "seen", "texture"), ("generation", "seen", "images")),
    ("generation, held out: colour", ("generation", "held_out", "colour"), ("generation", "held_out", "images")),
    ("generation, held out: category", ("generation", "held_out", "category"), ("generation", "held_out", "images")),
    ("generation, held out: texture", ("generation", "held_out", "texture"), ("generation", "held_out", "images")),
    ("CLIP zero-shot: category", ("clip_zero_shot", "category"), ("clip_zero_shot", "images")),
    ("CLIP zero-shot: colour", ("clip_zero_shot", "colour"), ("clip_zero_shot", "images")),
    ("CLIP zero-shot: texture", ("clip_zero_shot", "texture"), ("clip_zero_shot", "images")),
    ("DINO 1-NN: category", ("dino_nearest_neighbour", "category"), ("dino_nearest_neighbour", "images")),
    ("DINO 1-NN: texture", ("dino_nearest_neighbour", "texture"), ("dino_nearest_neighbour", "images")),
    ("retriever: top-3 noun recall", ("retriever_nouns", "top3_noun_recall"), ("retriever_nouns", "objects")),
    ("stage 1: noun recall", ("stage_one", "noun_recall"), ("stage_one", "objects")),
    ("stage 1: first noun right", ("stage_one", "first_noun_correct"), ("stage_one", "scenes")),
)
# (label, path to the mean, the per-scene key it is the mean of)
MEANS = (
    ("stage 1: mask mIoU", ("stage_one", "mask_miou"), "miou"),
    ("stage 1: FG-ARI", ("stage_one", "fg_ari"), "fg_ari"),
)


@dataclass(frozen=True)
class Row:
    label: str
    reference: float
    other: float
    bound: float

    @property
    def difference(self) -> float:
        return self.other - self.reference

    @property
    def within(self) -> bool:
        return abs(self.difference) <= self.bound + 1e-9


def _get(result: dict, path: tuple[str, ...]):
    value = result
    for key in path:
        value = value[key]
    return value


def share_bound(p1: float, p2: float, n1: int, n2: int) -> float:
    p, n = (p1 * n1 + p2 * n2) / (n1 + n2), min(n1, n2)
    return max(2 * math.sqrt(2) * math.sqrt(p * (1 - p) / n), 1 / n)


def mean_bound(values1: list[float], values2: list[float]) -> float:
    values = [v for v in (*values1, *values2) if not math.isnan(v)]
    n = min(len(values1), len(values2))
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    return max(2 * math.sqrt(2) * sd / math.sqrt(n), 1 / n)


def compare(reference: dict, other: dict) -> list[Row]:
    rows = []
    for label, path, count in SHARES:
        p1, p2 = _get(reference, path), _get(other, path)
        rows.append(Row(label, p1, p2, share_bound(p1, p2, _get(reference, count), _get(other, count))))
    for label, path, key in MEANS:
        scenes1, scenes2 = reference["stage_one"]["per_scene"], other["stage_one"]["per_scene"]
        if not all(key in s for s in (*scenes1, *scenes2)):
            continue  # a result written before the per-scene figure was recorded
        bound = mean_bound([s[key] for s in scenes1], [s[key] for s in scenes2])
        rows.append(Row(label, _get(reference, path), _get(other, path), bound))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toyworld.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", type=Path, help="toy-eval result, e.g. bench/results/toyworld.json")
    p.add_argument("other", type=Path, help="toy-eval result of the bundle to check")
    p.add_argument("--json", type=Path, help="also write the comparison here")
    a = p.parse_args(argv)
    try:
        reference, other = (json.loads(f.read_text()) for f in (a.reference, a.other))
        rows = compare(reference, other)
    except (OSError, ValueError) as exc:
        print(f"toyworld.compare: cannot read the results: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"toyworld.compare: not a toy-eval result (no {exc})", file=sys.stderr)
        return 2
    width = max(len(r.label) for r in rows)
    print(f"{'figure':<{width}}  reference  other   diff   bound  ")
    for r in rows:
        print(f"{r.label:<{width}}  {r.reference:9.3f}  {r.other:5.3f}  {r.difference:+.3f}  {r.bound:.3f}  "
              f"{'within' if r.within else 'OUTSIDE'}")
    outside = [r.label for r in rows if not r.within]
    print(f"{len(rows) - len(outside)} of {len(rows)} figures within noise"
          + (f"; outside: {', '.join(outside)}" if outside else ""))
    if a.json:
        a.json.write_text(json.dumps({
            "reference": str(a.reference), "other": str(a.other),
            "rows": [{"figure": r.label, "reference": r.reference, "other": r.other,
                      "difference": round(r.difference, 4), "bound": round(r.bound, 4), "within": r.within}
                     for r in rows],
        }, indent=2) + "\n")
    return 0 if not outside else 1


if __name__ == "__main__":
    sys.exit(main())
