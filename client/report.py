"""What an extraction leaves on disk, and the HTML report that shows it.

One folder per image:

    image.png                      the source image
    masks/c0.png ...               each concept's mask (8-bit, 255 inside)
    overlay.png                    the masks over the image, each labelled with its noun
    generated/c0/object/0.png ...  every generated image, by concept and prompt
    grids/c0_object.png ...        one grid per concept and prompt (object-level, each intrinsic attribute,
                                   "a <&i>"), and grids/composition.png
    metrics.json                   the UCE metrics per encoder and per concept
    extraction.json                everything else: nouns, areas, rounds, tokens, artifacts, seeds, timings
    report.html                    all of it on one page: relative links only, no external assets

A batch run adds `index.html` linking every item's report. The pages carry a small inline script that marks
each <img> with `data-loaded="1"` once it decoded (naturalWidth > 0) and counts them on <body>
(`data-images-loaded`, `data-images-broken`), so a headless browser can check a report renders.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from client.types import Extraction, GeneratedImage

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _save_png(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def overlay(image: Image.Image, masks: Sequence[np.ndarray], labels: Sequence[str], alpha: float = 0.45,
            scale: int = 1) -> Image.Image:
    """The image with each mask tinted in its own colour and its label written at the mask's centre. `scale`
    enlarges image and masks first (nearest), so that labels stay readable on a small picture."""
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        masks = [np.asarray(m, dtype=bool).repeat(scale, axis=0).repeat(scale, axis=1) for m in masks]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base.copy()
    for i, mask in enumerate(masks):
        colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    result = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(result)
    font = _font(max(12, min(result.size) // 25))
    for i, (mask, label) in enumerate(zip(masks, labels, strict=True)):
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        # the mask pixel nearest its centroid, so the label sits on the concept even for a ring-shaped mask
        cx, cy = xs.mean(), ys.mean()
        k = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
        x, y = int(xs[k]), int(ys[k])
        box = draw.textbbox((x, y), label, font=font, anchor="mm")
        draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=PALETTE[i % len(PALETTE)])
        draw.text((x, y), label, fill=(0, 0, 0), font=font, anchor="mm")
    return result


def label_scale(image: Image.Image, target: int = 256) -> int:
    """The integer enlargement that brings a small picture's shorter side to about `target` px (1 otherwise)."""
    return max(1, target // max(1, min(image.size)))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def cutout(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The concept's pixels as they are, everything else dimmed to a fifth."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    pixels[~mask] *= 0.2
    return Image.fromarray(pixels.round().astype(np.uint8))


def grid(images: Sequence[Image.Image], columns: int = 4, pad: int = 2) -> Image.Image:
    """Images side by side in rows of `columns`, on white, each at the size of the first."""
    w, h = images[0].size
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(img.convert("RGB").resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def _group_key(g: GeneratedImage) -> str:
    if g.kind == "FREE":
        return "composition"
    if g.kind == "OBJECT_LEVEL":
        return f"{g.concept_id}_object"
    return f"{g.concept_id}_{g.attribute or 'concept'}"


def _groups(generated: Iterable[GeneratedImage]) -> dict[str, list[GeneratedImage]]:
    groups: dict[str, list[GeneratedImage]] = {}
    for g in generated:
        groups.setdefault(_group_key(g), []).append(g)
    return groups


def _image_path(g: GeneratedImage) -> str:
    if g.kind == "FREE":
        return f"generated/composition/{g.index}.png"
    sub = "object" if g.kind == "OBJECT_LEVEL" else (g.attribute or "concept")
    return f"generated/{g.concept_id}/{sub}/{g.index}.png"


def write_extraction(extraction: Extraction, out_dir: Path) -> Path:
    """Write every file of the extraction and its `report.html` into `out_dir`; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source = _decode(extraction.image_png).convert("RGB")
    _save_png(source, out_dir / "image.png")
    concepts = extraction.localization.concepts
    masks = []
    for c in concepts:
        mask = c.mask()
        masks.append(mask)
        atomic_write(out_dir / "masks" / f"{c.concept_id}.png", c.mask_png)
        _save_png(cutout(source, mask), out_dir / "masks" / f"{c.concept_id}_cutout.png")
    _save_png(overlay(source, masks, [c.noun for c in concepts], scale=label_scale(source)), out_dir / "overlay.png")

    files: dict[int, str] = {}
    for g in extraction.generated:
        files[id(g)] = _image_path(g)
        atomic_write(out_dir / files[id(g)], g.image_png)
    grids = {}
    for key, items in _groups(extraction.generated).items():
        grids[key] = f"grids/{key}.png"
        _save_png(grid([g.pil() for g in items]), out_dir / grids[key])

    metrics = extraction.evaluation.to_dict() if extraction.evaluation else {"scores": []}
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    record = extraction.to_dict()
    record["out_dir"] = str(out_dir)
    for entry, g in zip(record["generated"], extraction.generated, strict=True):
        entry["file"] = files[id(g)]
    record["files"] = {"image": "image.png", "overlay": "overlay.png", "metrics": "metrics.json",
                       "masks": {c.concept_id: f"masks/{c.concept_id}.png" for c in concepts},
                       "cutouts": {c.concept_id: f"masks/{c.concept_id}_cutout.png" for c in concepts},
                       "grids": grids}
    atomic_write(out_dir / "extraction.json", json.dumps(record, indent=2))
    extraction.out_dir = str(out_dir)
    atomic_write(out_dir / "report.html", render_report(record, metrics))
    return out_dir / "report.html"


# --- HTML ---------------------------------------------------------------------------------------------------
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px;margin:14px 0 4px}
img.px{image-rendering:pixelated}.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px;color:#555;max-width:320px;word-break:break-word}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.note{background:#fff7d6;padding:8px 12px;border-radius:4px}
.concept{border:1px solid #e3e3e3;border-radius:6px;padding:10px 14px;margin:12px 0}code{font-size:13px}
.bad{color:#b00}
"""

# Marks each image once it decoded; a headless browser reads the counts off <body>.
_CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var ok = 0, bad = 0;
  document.querySelectorAll('img').forEach(function (img) {
    var good = img.complete && img.naturalWidth > 0;
    img.setAttribute('data-loaded', good ? '1' : '0');
    if (good) { ok++; } else { bad++; }
  });
  document.body.setAttribute('data-images-loaded', String(ok));
  document.body.setAttribute('data-images-broken', String(bad));
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style><script>{_CHECK_SCRIPT}</script></head>\n<body>\n{body}\n</body></html>\n")


def _img(src: str, alt: str, width: int | None = None, pixelated: bool = False) -> str:
    size = f' width="{width}"' if width else ""
    cls = ' class="px"' if pixelated else ""
    return f'<img src="{_e(src)}" alt="{_e(alt)}"{size}{cls}>'


def _fmt(value: Any) -> str:
    return "–" if value is None else (f"{value:.3f}" if isinstance(value, float) else _e(value))


def _metrics_table(metrics: dict[str, Any]) -> str:
    scores = metrics.get("scores") or []
    if not scores:
        return "<p>No metrics (nothing was generated, or evaluation was skipped).</p>"
    rows = ["<tr><th>encoder</th><th>SIM<sup>I</sup></th><th>SIM<sup>C</sup></th><th>ACC<sup>1</sup></th>"
            "<th>ACC<sup>3</sup></th></tr>"]
    for s in scores:
        sim_c = _fmt(s["sim_c"]) if s["sim_c"] is not None or not s.get("sim_c_absent_reason") else (
            f'<span title="{_e(s["sim_c_absent_reason"])}">–</span>')
        rows.append(f"<tr><td>{_e(s['encoder'])}</td><td>{_fmt(s['sim_i'])}</td><td>{sim_c}</td>"
                    f"<td>{_fmt(s['acc1'])}</td><td>{_fmt(s['acc3'])}</td></tr>")
    notes = []
    scoped = next((s for s in scores if s.get("accuracy_scope") == "REQUEST"), None)
    if scoped is not None:
        notes.append(f'<p class="note">Per-image accuracy: ACC<sup>1</sup> and ACC<sup>3</sup> rank each concept '
                     f"among this image's own {scoped.get('concepts_in_scope', 0)} concept(s) only (ACC<sup>3</sup> "
                     "is 1 with at most 3), not among a whole benchmark set as the paper does. Score a set of "
                     "results together for those numbers: <code>ice evaluate RESULTS_DIR</code>.</p>")
    absent = next((s.get("sim_c_absent_reason") for s in scores if s["sim_c"] is None
                   and s.get("sim_c_absent_reason")), None)
    if absent:
        notes.append(f'<p class="note">No SIM<sup>C</sup>: {_e(absent)}.</p>')
    return "<table>" + "".join(rows) + "</table>" + "".join(notes)


def _concept_scores(metrics: dict[str, Any], concept_id: str) -> str:
    cells = []
    for s in metrics.get("scores") or []:
        for c in s["concepts"]:
            if c["concept_id"] == concept_id:
                cells.append(f"{_e(s['encoder'])}: SIM<sup>I</sup> {_fmt(c['sim_i'])}, ACC<sup>1</sup> "
                             f"{_fmt(c['acc1'])}, rank {_fmt(c['rank'])}")
    return "<p>" + " · ".join(cells) + "</p>" if cells else ""


def render_report(record: dict[str, Any], metrics: dict[str, Any]) -> str:
    loc = record["localization"]
    learning = record.get("learning") or {}
    tokens = learning.get("tokens") or []
    files = record["files"]
    size = max(256, min(480, loc["width"]))
    parts = [f"<h1>ICE extraction: {len(loc['concepts'])} concept(s)</h1>"]
    bundle = learning.get("bundle") or {}
    if str(bundle.get("name", "")).startswith("tiny"):
        parts.append('<p class="note">Made with the <b>tiny</b> random bundle: it exercises every step, but its '
                     "concepts, images and scores carry no meaning. Assemble a real bundle with "
                     "<code>ice-bundle assemble</code>.</p>")
    truth_figure, truth_table = _truth_section(record["ground_truth"], size) if record.get("ground_truth") else ("", "")
    pixelated = loc["width"] < 160  # small pictures are scaled up: keep their pixels sharp
    parts.append('<div class="row">'
                 f'<figure>{_img(files["image"], "source image", size, pixelated)}<figcaption>source image '
                 f'({loc["width"]}×{loc["height"]})</figcaption></figure>'
                 f'<figure>{_img(files["overlay"], "concept masks", size, pixelated)}<figcaption>masks and nouns: '
                 + ", ".join(f'{_e(c["concept_id"])} = {_e(c["noun"])}' for c in loc["concepts"])
                 + "</figcaption></figure>" + truth_figure + "</div>" + truth_table)
    uncovered = loc.get("uncovered_fraction", loc["remaining_fraction"])  # an older record: the same quantity
    parts.append(f"<p>Localization: {loc['rounds']} round(s), stopped by {_e(loc['stop_reason'])}, "
                 f"{100 * uncovered:.1f}% of the image covered by no concept.</p>")
    parts.append("<h2>Metrics</h2>" + _metrics_table(metrics)
                 + '<p><a href="metrics.json">metrics.json</a> · <a href="extraction.json">extraction.json</a></p>')

    generated = record.get("generated") or []
    grids = files["grids"]
    parts.append("<h2>Concepts</h2>")
    for c in loc["concepts"]:
        cid = c["concept_id"]
        own = [t for t in tokens if t["concept_id"] == cid]
        token_text = ", ".join(f"<code>{_e(t['token'])}</code> {_e(t['attribute'] or t['role'].lower())}"
                               for t in own)
        block = [f'<div class="concept"><h3>{_e(cid)}: {_e(c["noun"])} '
                 f'<small>({100 * c["area_fraction"]:.1f}% of the image, round {c["round"]})</small></h3>',
                 '<div class="row">'
                 f'<figure>{_img(files["cutouts"][cid], "region of " + cid, 160)}<figcaption>region '
                 f'(<a href="{_e(files["masks"][cid])}">mask</a>)</figcaption></figure>']
        for key, label in _concept_grid_keys(cid, grids, generated):
            prompt = next((g["prompt"] for g in generated if _record_key(g) == key), "")
            block.append(f'<figure>{_img(grids[key], label, 320, pixelated=True)}<figcaption><b>{_e(label)}</b>'
                         f"<br><code>{_e(prompt)}</code></figcaption></figure>")
        block.append("</div>")
        if token_text:
            block.append(f"<p>tokens: {token_text}</p>")
        block.append(_concept_scores(metrics, cid) + "</div>")
        parts.append("".join(block))
    if "composition" in grids:
        prompt = next((g["prompt"] for g in generated if g["kind"] == "FREE"), "")
        parts.append(f"<h2>All concepts together</h2><figure>{_img(grids['composition'], 'composition', 320, True)}"
                     f"<figcaption><code>{_e(prompt)}</code></figcaption></figure>")
    if record.get("job_id"):
        parts.append(f"<p>Learning job <code>{_e(record['job_id'])}</code>.</p>")
    timing = ", ".join(f"{_e(k)} {v:.1f}s" for k, v in (record.get("seconds") or {}).items())
    if timing:
        parts.append(f"<p>Time: {timing}.</p>")
    return _page("ICE extraction", "\n".join(parts))


def _record_key(g: dict[str, Any]) -> str:
    if g["kind"] == "FREE":
        return "composition"
    if g["kind"] == "OBJECT_LEVEL":
        return f"{g['concept_id']}_object"
    return f"{g['concept_id']}_{g['attribute'] or 'concept'}"


def _concept_grid_keys(cid: str, grids: dict[str, str], generated: list[dict[str, Any]]) -> list[tuple[str, str]]:
    keys = []
    if f"{cid}_object" in grids:
        keys.append((f"{cid}_object", "object-level"))
    for g in generated:  # intrinsic attributes in the order they were generated
        key = _record_key(g)
        if g["kind"] == "INTRINSIC" and g["concept_id"] == cid and key in grids and key not in dict(keys):
            keys.append((key, g["attribute"] or "concept token alone"))
    return keys


def write_index(out_dir: Path, items: Sequence[dict[str, Any]], title: str = "ICE batch") -> Path:
    """`index.html` of a batch: one row per item (thumbnail, nouns, metrics, link) and the failures."""
    rows = ["<tr><th>item</th><th>overlay</th><th>concepts</th><th>SIM<sup>I</sup> (CLIP)</th><th>status</th></tr>"]
    for item in items:
        iid = item["id"]
        if item.get("status") == "done":
            report = f"{item['dir']}/report.html"
            thumb = _img(f"{item['dir']}/overlay.png", f"overlay of {iid}", 96)
            rows.append(f'<tr><td><a href="{_e(report)}">{_e(iid)}</a></td><td>{thumb}</td>'
                        f"<td>{_e(', '.join(item.get('nouns', [])))}</td><td>{_fmt(item.get('sim_i'))}</td>"
                        "<td>done</td></tr>")
        else:
            rows.append(f"<tr><td>{_e(iid)}</td><td></td><td></td><td></td>"
                        f'<td class="bad">{_e(item.get("status"))}: {_e(item.get("error", ""))}</td></tr>')
    done = sum(1 for i in items if i.get("status") == "done")
    body = (f"<h1>{_e(title)}</h1><p>{done} of {len(items)} item(s) done.</p><table>" + "".join(rows)
            + "</table>")
    path = out_dir / "index.html"
    atomic_write(path, _page(title, body))
    return path


def attach_ground_truth(out_dir: Path, objects: Sequence[tuple[str, np.ndarray]], source: str = "") -> Path:
    """Add the ground truth (name and bool mask per true object) to a written extraction: `truth/overlay.png`,
    one mask per object, each object's best-overlapping concept and its IoU, shown beside the result in
    `report.html` (re-rendered). For scenes whose truth is known, e.g. ToyWorld's."""
    out_dir = Path(out_dir)
    record = json.loads((out_dir / "extraction.json").read_text())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    source_image = Image.open(out_dir / record["files"]["image"]).convert("RGB")
    predicted = {cid: np.asarray(Image.open(out_dir / path)) > 127 for cid, path in record["files"]["masks"].items()}
    nouns = {c["concept_id"]: c["noun"] for c in record["localization"]["concepts"]}
    truth = []
    for k, (name, mask) in enumerate(objects):
        mask = np.asarray(mask, dtype=bool)
        path = f"truth/t{k}.png"
        _save_png(Image.fromarray(mask.astype(np.uint8) * 255), out_dir / path)
        best, best_iou = None, 0.0
        for cid, pm in predicted.items():
            union = int((pm | mask).sum())
            iou = int((pm & mask).sum()) / union if union else 0.0
            if iou > best_iou:
                best, best_iou = cid, iou
        truth.append({"name": name, "mask": path, "concept_id": best, "noun": nouns.get(best), "iou": best_iou})
    _save_png(overlay(source_image, [np.asarray(m, dtype=bool) for _, m in objects], [n for n, _ in objects],
                      scale=label_scale(source_image)), out_dir / "truth" / "overlay.png")
    record["ground_truth"] = {"source": source, "overlay": "truth/overlay.png", "objects": truth}
    atomic_write(out_dir / "extraction.json", json.dumps(record, indent=2))
    atomic_write(out_dir / "report.html", render_report(record, metrics))
    return out_dir / "report.html"


def _truth_section(truth: dict[str, Any], size: int) -> tuple[str, str]:
    """(a figure for the top row, a table of each true object against its best concept)."""
    figure = (f'<figure>{_img(truth["overlay"], "ground truth", size, pixelated=True)}<figcaption>ground truth'
              + (f" ({_e(truth['source'])})" if truth.get("source") else "") + "</figcaption></figure>")
    rows = ["<tr><th>true object</th><th>mask</th><th>best concept</th><th>noun found</th><th>IoU</th></tr>"]
    for t in truth["objects"]:
        found = t.get("noun") or "–"
        hit = bool(t.get("noun")) and t["noun"] == t["name"].split()[-1]
        cls = "" if hit else ' class="bad"'
        rows.append(f"<tr><td>{_e(t['name'])}</td><td>{_img(t['mask'], 'mask of ' + t['name'], 48, True)}</td>"
                    f"<td>{_e(t.get('concept_id') or '–')}</td>"
                    f"<td{cls}>{_e(found)}</td><td>{_fmt(float(t['iou']))}</td></tr>")
    return figure, "<h2>Against the ground truth</h2><table>" + "".join(rows) + "</table>"


def load_extraction(folder: Path) -> Extraction:
    """Read back what `write_extraction` wrote (to re-score or re-render a result)."""
    from client.types import (
        ArtifactFile,
        Concept,
        LearnedToken,
        LearningResult,
        LocalizeResult,
    )

    record = json.loads((folder / "extraction.json").read_text())
    loc = record["localization"]
    concepts = [Concept(c["concept_id"], c["noun"], c["area_fraction"], c["round"],
                        [tuple(r) for r in c["retrieval"]],
                        (folder / record["files"]["masks"][c["concept_id"]]).read_bytes())
                for c in loc["concepts"]]
    localization = LocalizeResult(concepts, loc["width"], loc["height"], loc["rounds"], loc["remaining_fraction"],
                                  loc["stop_reason"], [tuple(t) for t in loc.get("timings", [])],
                                  loc.get("uncovered_fraction", loc["remaining_fraction"]))
    learning = None
    if record.get("learning"):
        lr = record["learning"]
        learning = LearningResult(lr["job_id"], [LearnedToken(**t) for t in lr["tokens"]],
                                  [ArtifactFile(**f) for f in lr["artifacts"]], lr["bundle"])
    generated = [GeneratedImage(g["prompt"], g["index"], g["concept_id"], g["attribute"], g["seed"], g["kind"],
                                (folder / g["file"]).read_bytes()) for g in record.get("generated", [])]
    return Extraction(localization, record.get("job_id"), learning, generated, None, record.get("seconds", {}),
                      str(folder), (folder / record["files"]["image"]).read_bytes())
