"""`ice batch`: extract many images, resumably.

- Items come from a folder (every PNG/JPEG/WebP under it, sorted) or a manifest file (one image path per line,
  relative to the manifest; `#` starts a comment; or JSON lines `{"id": ..., "image": ...}`).
- Item `x` is written to `<out>/<x>/`; when it is complete, a marker `<out>/<x>/.done` is written atomically.
  A rerun skips every item with a marker and redoes the others from scratch, so an interrupted run (Ctrl-C,
  a killed pod) loses at most the items that were in flight.
- Failures do not stop the batch: they are listed, with their error, in `<out>/batch-summary[-shard-i].json`.
- `--shard-index/--shard-count` split the items between the pods of a Kubernetes Indexed Job.
- Ctrl-C: no new item starts, in-flight learning jobs are cancelled, the summary is written; exit code 130.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.options import ExtractOptions
from client.pipeline import Cancelled, run_extraction
from client.report import atomic_write, write_index

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
DONE = ".done"


@dataclass(frozen=True)
class Item:
    id: str
    image: Path


def _item_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "item"


def list_items(source: Path) -> list[Item]:
    """The batch's items, in a stable order, with unique ids usable as folder names."""
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        raw = [(str(p.relative_to(source).with_suffix("")), p) for p in paths]
    elif source.is_file():
        raw = []
        for n, line in enumerate(source.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                entry = json.loads(line)
                if "image" not in entry:
                    raise ValueError(f"{source}:{n}: a JSON line needs an \"image\" key")
                path = Path(entry["image"])
                raw.append((str(entry.get("id") or path.with_suffix("")), path))
            else:
                path = Path(line)
                raw.append((str(path.with_suffix("")), path))
        raw = [(rid, p if p.is_absolute() else source.parent / p) for rid, p in raw]
    else:
        raise FileNotFoundError(f"{source}: no such folder or manifest file")
    items, seen = [], set()
    for rid, path in raw:
        iid = _item_id(rid)
        if iid in seen:  # a.png beside a.jpg
            iid = _item_id(f"{rid}{path.suffix}")
        if iid in seen:
            raise ValueError(f"two items are both called {iid!r}")
        seen.add(iid)
        items.append(Item(iid, path))
    return items


def is_done(out: Path, item: Item) -> bool:
    return (out / item.id / DONE).is_file()


def _summary_name(shard_index: int | None, shard_count: int) -> str:
    return "batch-summary.json" if shard_count <= 1 else f"batch-summary-shard-{shard_index}.json"


def run_batch(
    backend,
    items: list[Item],
    out: Path,
    options: ExtractOptions,
    concurrency: int = 1,
    shard_index: int = 0,
    shard_count: int = 1,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Run the batch; returns the summary (also written to the out folder). KeyboardInterrupt is handled:
    the summary then says `interrupted` and lists the items not done."""
    from client.sharding import shard

    all_items = items
    mine = shard(items, shard_index, shard_count)
    todo = [i for i in mine if not is_done(out, i)]
    skipped = [i.id for i in mine if is_done(out, i)]
    log(f"batch: {len(mine)} item(s) in this shard, {len(skipped)} already done, {len(todo)} to do")
    cancel = threading.Event()
    done: list[str] = []
    failed: list[dict[str, str]] = []
    interrupted = False
    started = time.time()

    def one(item: Item) -> None:
        folder = out / item.id
        if folder.exists():  # a partial result of an interrupted run: redo it from scratch
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        image = item.image.read_bytes()
        extraction = run_extraction(backend, image, options, out_dir=folder, progress=False, cancel=cancel)
        scores = extraction.evaluation.by_encoder() if extraction.evaluation else {}
        marker = {"id": item.id, "image": str(item.image), "seconds": round(time.perf_counter() - t0, 3),
                  "nouns": [c.noun for c in extraction.localization.concepts],
                  "sim_i": {k: v.sim_i for k, v in scores.items()}, "finished": time.time()}
        atomic_write(folder / DONE, json.dumps(marker))

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="ice-batch")
    futures: dict[Future, Item] = {}
    queue = list(todo)
    try:
        while queue or futures:
            while queue and len(futures) < max(1, concurrency):
                item = queue.pop(0)
                futures[pool.submit(one, item)] = item
            finished, _ = wait(list(futures), timeout=0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                item = futures.pop(future)
                _record(future, item, done, failed, log, len(done) + len(failed) + len(skipped) + 1, len(mine))
    except KeyboardInterrupt:
        interrupted = True
        log("batch: interrupted; cancelling the items in flight (Ctrl-C again to quit at once)")
        cancel.set()
        try:
            for future in list(futures):
                try:
                    future.result()
                    done.append(futures[future].id)
                except BaseException:  # cancelled or failed while stopping: not done, redone next time
                    pass
        except KeyboardInterrupt:
            pass
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)

    pending = [i.id for i in mine if i.id not in set(done) | set(skipped) and i.id not in {f["id"] for f in failed}]
    summary = {
        "source_items": len(all_items),
        "shard_index": shard_index,
        "shard_count": shard_count,
        "items": len(mine),
        "done": len(done) + len(skipped),
        "done_now": sorted(done),
        "skipped": sorted(skipped),
        "failed": failed,
        "pending": pending,
        "interrupted": interrupted,
        "seconds": round(time.time() - started, 3),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / _summary_name(shard_index, shard_count), json.dumps(summary, indent=2))
    write_batch_index(out, all_items)
    return summary


def _record(future: Future, item: Item, done: list, failed: list, log, n: int, total: int) -> None:
    try:
        future.result()
    except Cancelled:
        return
    except Exception as exc:  # one bad item does not stop the batch
        message = " ".join(str(exc).split()) or type(exc).__name__
        failed.append({"id": item.id, "image": str(item.image), "error": message, "type": type(exc).__name__})
        log(f"[{n}/{total}] failed {item.id}: {message}")
        return
    done.append(item.id)
    log(f"[{n}/{total}] done {item.id}")


def write_batch_index(out: Path, items: list[Item]) -> Path:
    """index.html over every item of the source, from the markers and every shard's summary."""
    failures: dict[str, str] = {}
    for path in sorted(out.glob("batch-summary*.json")):
        try:
            for f in json.loads(path.read_text()).get("failed", []):
                failures[f["id"]] = f["error"]
        except (OSError, ValueError):
            continue
    rows = []
    for item in items:
        marker = out / item.id / DONE
        if marker.is_file():
            info = json.loads(marker.read_text())
            rows.append({"id": item.id, "status": "done", "dir": item.id, "nouns": info.get("nouns", []),
                         "sim_i": (info.get("sim_i") or {}).get("CLIP")})
        elif item.id in failures:
            rows.append({"id": item.id, "status": "failed", "error": failures[item.id]})
        else:
            rows.append({"id": item.id, "status": "not done"})
    return write_index(out, rows)
