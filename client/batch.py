"""`ice batch`: extract many images, resumably, from and to a local folder or object storage.

- Items come from a folder (every PNG/JPEG/WebP under it, sorted) or a manifest file (one image per line,
  relative to the manifest, or absolute, or a URL; `#` starts a comment; or JSON lines `{"id": ..., "image": ...}`).
  The folder, the manifest, the images and the output may each be a local path or an object-storage URL
  (`s3://`, `gs://`, `az://`, `file://`; client/storage.py).
- Item `x` is written to `<out>/<x>/`; when it is complete, a marker `<out>/<x>/.done` is written atomically and
  create-only (a conditional write on object storage). A rerun skips every item with a marker and redoes the
  others from scratch, so an interrupted run (Ctrl-C, SIGTERM, a killed pod) loses at most the items in flight.
- Each item's learning job is created with a `request_id` derived from the run (its output location) and the
  item, and recorded under `<out>/.ice-batch/jobs/`: a retried run waits for the job its predecessor started (on
  the learner replica that holds it) instead of starting another.
- A full learner queue or a server at its call limit (RESOURCE_EXHAUSTED) is retried with backoff, not failed.
- Failures do not stop the batch: they are listed, with their error, in `<out>/batch-summary[-shard-i].json`.
- `--shard-index/--shard-count` split the items between the pods of a Kubernetes Indexed Job.
- Ctrl-C (SIGINT): no new item starts, in-flight learning jobs are cancelled, the summary is written; exit 130.
  SIGTERM (eviction, Job deletion): the same, except that in-flight learning jobs are handed back (left running
  for the retried pod to pick up; `on_sigterm="cancel"` cancels them); exit 143. Either way the summary is
  written within STOP_SECONDS.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.errors import ServiceError
from client.options import ExtractOptions
from client.pipeline import Cancelled, run_extraction
from client.report import write_index
from client.storage import Store, is_url, join, parent, read_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
DONE = ".done"
JOBS = ".ice-batch/jobs"  # per item: the learning job it started, so a retry can pick it up
STOP_SECONDS = 20.0  # after a stop, how long in-flight items get to settle before the summary is written
RETRY_SECONDS = 1800.0  # how long RESOURCE_EXHAUSTED is retried, per call
MAX_GENERATIONS = 16  # learning jobs an item may start over all runs (a cancelled or failed one is not reused)
_NAMESPACE = uuid.UUID("6f1c4d2e-6c4b-5d8e-9a57-1ce0b4a7c0de")


@dataclass(frozen=True)
class Item:
    id: str
    image: Path | str  # a local path, or a URL


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same orderly stop as Ctrl-C."""


def _item_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "item"


def _strip_suffix(text: str) -> str:
    name = text.rsplit("/", 1)[-1]
    return text[: len(text) - len(name)] + (name.rsplit(".", 1)[0] if "." in name else name)


def list_items(source: str | Path) -> list[Item]:
    """The batch's items, in a stable order, with unique ids usable as folder names."""
    raw: list[tuple[str, Path | str]] = []
    if is_url(source):
        store = Store(source)
        if store.is_dir():
            raw = [(_strip_suffix(rel), store.url(rel)) for rel in store.files(IMAGE_SUFFIXES)]
        else:
            try:
                text = read_bytes(source).decode("utf-8")
            except FileNotFoundError:
                raise FileNotFoundError(f"{source}: no such folder or manifest") from None
            raw = _manifest(str(source), text, parent(str(source)))
    else:
        source = Path(source)
        if source.is_dir():
            paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            raw = [(str(p.relative_to(source).with_suffix("")), p) for p in paths]
        elif source.is_file():
            raw = _manifest(str(source), source.read_text(), source.parent)
        else:
            raise FileNotFoundError(f"{source}: no such folder or manifest file")
    items, seen = [], set()
    for rid, path in raw:
        iid = _item_id(rid)
        if iid in seen:  # a.png beside a.jpg
            suffix = Path(str(path)).suffix
            iid = _item_id(f"{rid}{suffix}")
        if iid in seen:
            raise ValueError(f"two items are both called {iid!r}")
        seen.add(iid)
        items.append(Item(iid, path))
    return items


def _manifest(name: str, text: str, base: str | Path) -> list[tuple[str, Path | str]]:
    """(id, image) per entry; relative entries are taken relative to the manifest's folder `base`."""
    raw = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            entry = json.loads(line)
            if "image" not in entry:
                raise ValueError(f"{name}:{n}: a JSON line needs an \"image\" key")
            image = str(entry["image"])
            rid = str(entry.get("id") or _strip_suffix(image.split("://", 1)[-1]))
        else:
            image = line
            rid = _strip_suffix(image.split("://", 1)[-1])
        if is_url(image):
            raw.append((rid, image))
        elif Path(image).is_absolute():
            raw.append((rid, Path(image)))
        else:
            raw.append((rid, join(base, image)))
    return raw


def request_id(run: str, item_id: str, generation: int) -> str:
    """The learning job's request_id: the same for the same run, item and generation, so a repeat (a retried pod
    reaching the same replica) returns the job already started instead of starting another."""
    return str(uuid.uuid5(_NAMESPACE, f"{run}\n{item_id}\n{generation}"))


def _summary_name(shard_index: int | None, shard_count: int) -> str:
    return "batch-summary.json" if shard_count <= 1 else f"batch-summary-shard-{shard_index}.json"


@dataclass
class _Run:
    """What the items of one batch run share."""

    backend: Any
    out: Store
    stop: threading.Event = field(default_factory=threading.Event)
    cancel_jobs: bool = True  # on a stop: cancel in-flight learning jobs (else hand them back)
    retry_seconds: float = RETRY_SECONDS
    log: Callable[[str], None] = print
    jobs: dict[str, Any] = field(default_factory=dict)  # item id -> the learning job it waits for
    lock: threading.Lock = field(default_factory=threading.Lock)


class _ItemBackend:
    """The back-end as one item sees it: RESOURCE_EXHAUSTED retried with backoff; its learning job created with a
    request_id derived from the run and the item (or picked up from an earlier run); a wait for it that ends at
    once when the batch stops."""

    def __init__(self, run: _Run, item: Item, image: bytes):
        self.run, self.item, self.backend = run, item, run.backend
        self.image_sha256 = hashlib.sha256(image).hexdigest()

    # -- calls that a busy server may refuse for a while ------------------------------------------------------
    def _retry(self, call: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + self.run.retry_seconds
        delay = 0.5
        while True:
            try:
                return call()
            except ServiceError as exc:
                if exc.code.name != "RESOURCE_EXHAUSTED" or time.monotonic() + delay > deadline:
                    raise
                self.run.log(f"batch: {self.item.id}: the {exc.service} is full; retrying in {delay:.0f}s")
            if self.run.stop.wait(delay * random.uniform(0.5, 1.0)):
                raise Cancelled("the batch is stopping")
            delay = min(delay * 2, 60.0)

    def localize(self, image, options):
        return self._retry(lambda: self.backend.localize(image, options))

    def generate_for(self, job_id, kind, options, prompts=()):
        return self._retry(lambda: self.backend.generate_for(job_id, kind, options, prompts))

    def evaluate(self, *args, **kwargs):
        return self._retry(lambda: self.backend.evaluate(*args, **kwargs))

    def cancel_job(self, job_id: str) -> None:
        if self.run.cancel_jobs:
            self.backend.cancel_job(job_id)

    # -- learning ---------------------------------------------------------------------------------------------
    def learn(self, image, concepts, options: ExtractOptions, progress, on_job) -> Any:
        if not hasattr(self.backend, "create_job"):  # in-process: nothing to pick up or hand back
            return self.backend.learn(image, concepts, options, progress, on_job)
        job = self._earlier_job() or self._create_job(image, concepts, options)
        self._track(job)
        on_job(job.name)
        try:
            return self._wait(job, progress)
        finally:
            with self.run.lock:
                self.run.jobs.pop(self.item.id, None)

    def _track(self, job) -> None:
        """From here on a stop cancels or hands back this job."""
        with self.run.lock:
            self.run.jobs[self.item.id] = job

    def _record_path(self) -> str:
        return f"{JOBS}/{self.item.id}.json"

    def _earlier_job(self):
        """The job an earlier run of this item started, when it can still give a result."""
        from client.types import Job

        try:
            record = json.loads(self.run.out.read_bytes(self._record_path()))
        except (OSError, ValueError):
            return None
        if record.get("image_sha256") != self.image_sha256:
            return None
        job = Job(record["name"], record.get("replica", ""))
        try:
            state = self._retry(lambda: self.backend.job(job)).state
        except ServiceError:  # gone, or its replica cannot be reached: start again elsewhere
            return None
        if state in ("FAILED", "CANCELLED"):
            return None
        self.run.log(f"batch: {self.item.id}: picking up learning job {job.name} ({state}) from an earlier run")
        return job

    def _create_job(self, image, concepts, options: ExtractOptions):
        for generation in range(MAX_GENERATIONS):
            rid = request_id(self.run.out.url(), self.item.id, generation)
            try:
                job = self._retry(lambda rid=rid: self.backend.create_job(
                    image, concepts, anchors=options.anchors, schedule=options.schedule, seed=options.seed,
                    request_id=rid))
            except ServiceError as exc:
                if exc.code.name == "ABORTED":  # this id was used for a different request (other masks)
                    continue
                raise
            if self._retry(lambda job=job: self.backend.job(job)).state in ("FAILED", "CANCELLED"):  # ended before
                continue
            self._track(job)
            record = {"name": job.name, "replica": job.replica, "request_id": rid, "generation": generation,
                      "image_sha256": self.image_sha256, "created": time.time()}
            self.run.out.write_bytes(self._record_path(), json.dumps(record))
            return job
        raise ValueError(f"{self.item.id}: {MAX_GENERATIONS} learning jobs were started for this item over earlier "
                         "runs and none succeeded; use a new --out to start afresh")

    def _wait(self, job, progress):
        result: dict[str, Any] = {}

        def follow() -> None:
            try:
                result["value"] = self._retry(lambda: self.backend.wait(job, progress=progress))
            except BaseException as exc:  # handed to the item's thread below
                result["error"] = exc

        waiter = threading.Thread(target=follow, name=f"ice-batch-wait-{self.item.id}", daemon=True)
        waiter.start()
        while waiter.is_alive():
            if self.run.stop.is_set():
                if self.run.cancel_jobs:
                    try:
                        self.backend.cancel_job(job.name)
                    except Exception as exc:  # best effort: the summary lists the job either way
                        self.run.log(f"batch: {self.item.id}: could not cancel {job.name}: {exc}")
                    waiter.join(STOP_SECONDS / 2)
                raise Cancelled(f"the batch stopped while {job.name} was learning")
            waiter.join(0.2)
        if "error" in result:
            raise result["error"]
        return result["value"]


def _start(fn: Callable[[], Any]) -> Future:
    """`fn` on a daemon thread: a stopped batch never waits for an item stuck in a call at exit."""
    future: Future = Future()
    future.set_running_or_notify_cancel()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="ice-batch-item", daemon=True).start()
    return future


def run_batch(
    backend,
    items: list[Item],
    out: Store | str | Path,
    options: ExtractOptions,
    concurrency: int = 1,
    shard_index: int = 0,
    shard_count: int = 1,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    on_sigterm: str = "hand-back",
) -> dict[str, Any]:
    """Run the batch; returns the summary (also written to the out folder). Ctrl-C (KeyboardInterrupt) and, on the
    main thread, SIGTERM stop it in order: the summary then says `interrupted` and lists the items not done."""
    from client.sharding import shard

    out = out if isinstance(out, Store) else Store(out)
    all_items = items
    mine = shard(items, shard_index, shard_count)
    markers = out.read_many(f"{i.id}/{DONE}" for i in mine)
    skipped = [i.id for i in mine if f"{i.id}/{DONE}" in markers]
    todo = [i for i in mine if f"{i.id}/{DONE}" not in markers]
    log(f"batch: {len(mine)} item(s) in this shard, {len(skipped)} already done, {len(todo)} to do")
    run = _Run(backend, out, log=log)
    done: list[str] = []
    failed: list[dict[str, str]] = []
    stopped_by = None
    handed_back: list[dict[str, str]] = []
    started = time.time()

    def one(item: Item) -> None:
        t0 = time.perf_counter()
        image = read_bytes(item.image)
        out.remove_tree(item.id)  # a partial result of an interrupted run: redo it from scratch
        staging = None if out.local else Path(tempfile.mkdtemp(prefix="ice-batch-"))
        folder = out.local_path(item.id) if out.local else staging / item.id
        try:
            extraction = run_extraction(_ItemBackend(run, item, image), image, options, out_dir=folder,
                                        progress=False, cancel=run.stop)
            if staging is not None:
                out.upload_tree(folder, item.id)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        scores = extraction.evaluation.by_encoder() if extraction.evaluation else {}
        marker = {"id": item.id, "image": str(item.image), "seconds": round(time.perf_counter() - t0, 3),
                  "nouns": [c.noun for c in extraction.localization.concepts], "job": extraction.job_id,
                  "sim_i": {k: v.sim_i for k, v in scores.items()}, "finished": time.time()}
        if not out.write_bytes(f"{item.id}/{DONE}", json.dumps(marker), exclusive=True):
            log(f"batch: {item.id} was finished meanwhile by another worker; its marker is kept")

    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(_signum, _frame):
            raise Terminated()

        previous = signal.signal(signal.SIGTERM, on_term)
    futures: dict[Future, Item] = {}
    queue = list(todo)
    try:
        try:
            while queue or futures:
                while queue and len(futures) < max(1, concurrency):
                    item = queue.pop(0)
                    futures[_start(lambda item=item: one(item))] = item
                finished, _ = wait(list(futures), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    item = futures.pop(future)
                    _record(future, item, done, failed, log, len(done) + len(failed) + len(skipped) + 1, len(mine))
        except KeyboardInterrupt as exc:
            stopped_by = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
            # In-process learning (--local) dies with the process: there is nothing to hand back.
            run.cancel_jobs = stopped_by == "SIGINT" or on_sigterm == "cancel" or not hasattr(backend, "create_job")
            with run.lock:
                in_flight = dict(run.jobs)
            log(f"batch: {'terminated' if stopped_by == 'SIGTERM' else 'interrupted'}; "
                + ("cancelling" if run.cancel_jobs else "handing back") + " the learning jobs in flight")
            run.stop.set()
            try:
                settled, _ = wait(list(futures), timeout=STOP_SECONDS)
            except KeyboardInterrupt:  # asked again: stop waiting
                settled = set()
            for future in settled:
                item = futures.pop(future)
                if future.exception() is None:  # it finished while stopping: done
                    done.append(item.id)
            if not run.cancel_jobs:
                handed_back = [{"id": iid, "job": job.name, "replica": job.replica}
                               for iid, job in sorted(in_flight.items()) if iid not in done]
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

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
        "interrupted": stopped_by is not None,
        "stopped_by": stopped_by,
        "handed_back": handed_back,
        "seconds": round(time.time() - started, 3),
    }
    out.write_bytes(_summary_name(shard_index, shard_count), json.dumps(summary, indent=2))
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


def write_batch_index(out: Store | str | Path, items: list[Item]) -> str:
    """index.html over every item of the source, from the markers and every shard's summary; returns where."""
    out = out if isinstance(out, Store) else Store(out)
    failures: dict[str, str] = {}
    for data in out.read_many(out.glob("batch-summary*.json")).values():
        try:
            for f in json.loads(data).get("failed", []):
                failures[f["id"]] = f["error"]
        except (ValueError, KeyError, TypeError):
            continue
    markers = out.read_many(f"{item.id}/{DONE}" for item in items)
    rows = []
    for item in items:
        marker = markers.get(f"{item.id}/{DONE}")
        if marker is not None:
            info = json.loads(marker)
            rows.append({"id": item.id, "status": "done", "dir": item.id, "nouns": info.get("nouns", []),
                         "sim_i": (info.get("sim_i") or {}).get("CLIP")})
        elif item.id in failures:
            rows.append({"id": item.id, "status": "failed", "error": failures[item.id]})
        else:
            rows.append({"id": item.id, "status": "not done"})
    if out.local:
        return str(write_index(out.local_path(), rows))
    with tempfile.TemporaryDirectory(prefix="ice-batch-index-") as tmp:
        page = write_index(Path(tmp), rows)
        out.write_bytes("index.html", page.read_bytes())
    return out.url("index.html")
