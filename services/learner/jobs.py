"""Durable learning jobs: records in SQLite, inputs and checkpoints on disk, one runner thread per replica.

- `submit` queues a job (bounded queue: `ResourceExhausted` when full). A `request_id` seen before returns
  the first job when the request digest matches, else `Aborted`.
- One job trains at a time, in submission order. Progress (phase, step, losses) is written to the record
  after every step; watchers are woken on every change.
- `cancel` takes effect within one step (at once for a queued job), and while the job prepares within one
  denoising step of its class images. `stop` (server shutdown) stops the running job at the same points,
  checkpoints it (from its first step on) and leaves it resumable; `close` then waits for the runner, so a
  learner process exits only once its job has stopped (never with a thread inside torch under the interpreter's
  shutdown, which aborts the process).
- On start, jobs that were running when the process died are queued again ahead of the others and resume
  from their newest valid checkpoint (RNG states included), so they end exactly as an uninterrupted run. The
  reported step never goes backwards: it holds at the furthest step reached while the steps since that checkpoint
  are recomputed. A job that was running each of the last `max_crashes` times the process died (killed for
  memory, say) fails with that reason instead of taking the learner down again and again; a clean stop (SIGTERM)
  does not count.
- After every job the trainer's models and tensors are dropped and freed memory is handed back (CUDA cache,
  glibc free lists), so an idle learner returns to its idle footprint.

Layout under the store directory: `jobs.sqlite`, `jobs/{id}/input/` (image, masks, spec.json),
`jobs/{id}/checkpoints/`, `jobs/{id}/artifacts/`, `class-image-timings.json` (seconds per class image measured
here, for the plans and ETAs of later jobs), `class-images/` (the class-image cache, unless placed elsewhere).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import (
    Aborted,
    Cancelled,
    FailedPrecondition,
    IceError,
    NotFound,
    ResourceExhausted,
)
from services.common.images import decode_mask, encode_mask
from services.learner import class_images as C
from services.learner.artifacts import ArtifactFile, write_artifacts
from services.learner.memory import release_host_memory
from services.learner.trainer import (
    Concept,
    Interrupted,
    LearningSpec,
    Schedule,
    StepInfo,
    Trainer,
    spec_to_json,
)

log = logging.getLogger("ice.learner.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
RETRY_SECONDS = 1.0  # back-off of the runner while the job store cannot be written
UNREADY_AFTER_SECONDS = 30.0  # a store unwritable this long turns readiness off (a short blip does not)

QUEUE_DEPTH = Gauge("ice_learner_queue_depth", "Learning jobs waiting to run.")
ACTIVE_JOBS = Gauge("ice_learner_active_jobs", "Learning jobs queued or running on this replica: the work it holds "
                    "(the autoscaler's signal; 0 means the replica can be removed without cutting a job).")
# up to a day: a published-schedule job at SD-2.1 size takes minutes on a GPU and most of a day on a CPU
JOB_DURATION = Histogram("ice_learner_job_duration_seconds", "Wall time of a learning job from start to end.",
                         ("outcome",), buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800,
                                                57600, 86400, float("inf")))
TRAIN_STEPS = Counter("ice_learner_train_steps_total", "Training steps completed.", ("phase",))
QUEUE_WAIT = Histogram("ice_learner_queue_wait_seconds", "Time a learning job waited in the queue.",
                       buckets=(0.1, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, float("inf")))
JOB_MEMORY = Gauge("ice_learner_job_memory_estimate_bytes", "Estimated peak memory of the running learning job "
                   "(0 when none runs).")

_COLUMNS = ("id", "request_id", "request_digest", "state", "phase", "step", "total_steps", "losses",
            "create_time", "start_time", "update_time", "end_time", "error_code", "error_message",
            "cancel_requested", "result", "seq", "crashes", "interrupted", "memory_estimate", "class_images")
# columns added after the first release, with what older rows read as
_ADDED_COLUMNS = {"crashes": "INTEGER DEFAULT 0", "interrupted": "INTEGER DEFAULT 0",
                  "memory_estimate": "INTEGER DEFAULT 0", "class_images": "TEXT"}
CLASS_IMAGE_TIMINGS = "class-image-timings.json"


@dataclass
class JobRecord:
    id: str
    request_id: str
    request_digest: str
    state: str
    total_steps: int
    create_time: float
    update_time: float
    phase: str = ""
    step: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    start_time: float | None = None
    end_time: float | None = None
    error_code: str = ""
    error_message: str = ""
    cancel_requested: bool = False
    result: dict | None = None  # {"tokens": [...], "artifacts": [...]} once succeeded
    seq: int = 0
    crashes: int = 0  # times the process died while running this job
    interrupted: bool = False  # stopped cleanly (SIGTERM) while running: resumes without counting a crash
    memory_estimate: int = 0  # bytes the job is estimated to need at its peak (0: not estimated)
    # the class images it uses (None: prior preservation off): {"count", "ready", "to_generate", "source", "steps"}
    class_images: dict | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


class JobStore:
    """The SQLite table of job records (one connection, serialised by a lock)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, request_id TEXT, request_digest TEXT, "
            "state TEXT, phase TEXT, step INTEGER, total_steps INTEGER, losses TEXT, create_time REAL, "
            "start_time REAL, update_time REAL, end_time REAL, error_code TEXT, error_message TEXT, "
            "cancel_requested INTEGER, result TEXT, seq INTEGER)")
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        self._lock = threading.Lock()

    def put(self, r: JobRecord) -> None:
        row = (r.id, r.request_id, r.request_digest, r.state, r.phase, r.step, r.total_steps, json.dumps(r.losses),
               r.create_time, r.start_time, r.update_time, r.end_time, r.error_code, r.error_message,
               int(r.cancel_requested), json.dumps(r.result) if r.result is not None else None, r.seq,
               r.crashes, int(r.interrupted), r.memory_estimate,
               json.dumps(r.class_images) if r.class_images is not None else None)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({','.join(_COLUMNS)}) VALUES "
                             f"({','.join('?' * len(_COLUMNS))})", row)

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def all(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {','.join(_COLUMNS)} FROM jobs ORDER BY seq").fetchall()
        out = []
        for row in rows:
            d = dict(zip(_COLUMNS, row, strict=True))
            d["losses"] = json.loads(d["losses"] or "{}")
            d["result"] = json.loads(d["result"]) if d["result"] else None
            d["class_images"] = json.loads(d["class_images"]) if d["class_images"] else None
            d["cancel_requested"] = bool(d["cancel_requested"])
            d["interrupted"] = bool(d["interrupted"])
            d["crashes"], d["memory_estimate"] = int(d["crashes"] or 0), int(d["memory_estimate"] or 0)
            out.append(JobRecord(**d))
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- a job's inputs on disk --------------------------------------------------------------------------------------


def save_inputs(folder: Path, spec: LearningSpec) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "masks").mkdir(parents=True)
    spec.image.save(tmp / "image.png")
    for c in spec.concepts:
        (tmp / "masks" / f"{c.concept_id}.png").write_bytes(encode_mask(c.mask))
    (tmp / "spec.json").write_text(json.dumps(spec_to_json(spec)), encoding="utf-8")
    os.replace(tmp, folder)


def load_inputs(folder: Path) -> LearningSpec:
    data = json.loads((folder / "spec.json").read_text(encoding="utf-8"))
    image = Image.open(folder / "image.png").convert("RGB")
    concepts = [Concept(c["concept_id"], c["noun"],
                        np.asarray(decode_mask((folder / "masks" / f"{c['concept_id']}.png").read_bytes())))
                for c in data["concepts"]]
    return LearningSpec(image, concepts, list(data["anchors"]), Schedule(**data["schedule"]), data["ablation"],
                        data["refinement"], int(data["lora_rank"]), int(data["seed"]))


# -- the manager -------------------------------------------------------------------------------------------------


class JobManager:
    def __init__(self, root: Path, bundle, *, device: str = "cpu", queue_size: int = 8,
                 class_images_dir: Path | None = None, class_image_steps: int = 50, resume_jobs: bool = True,
                 advertise_address: str = "", max_crashes: int = 3, gradient_checkpointing: bool = True,
                 adam_8bit: bool = False, before_job: Callable[[], None] | None = None,
                 on_succeeded: Callable[[JobRecord], None] | None = None):
        self.root = Path(root)
        self.on_succeeded = on_succeeded or (lambda record: None)  # e.g. publish to the concept library
        self.max_crashes = max_crashes
        self.gradient_checkpointing = gradient_checkpointing
        self.adam_8bit = adam_8bit
        self.before_job = before_job or (lambda: None)  # e.g. drop the generation pipeline of the last job
        self.bundle = bundle
        self.device = device
        self.queue_size = queue_size
        self.advertise_address = advertise_address  # where clients reach this replica (see LearnerSettings)
        self.class_images_dir = Path(class_images_dir) if class_images_dir else self.root / "class-images"
        self.class_image_steps = class_image_steps
        self.store = JobStore(self.root / "jobs.sqlite")
        self._cond = threading.Condition()
        self._version = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.store_writable = True
        self._unwritable_since = 0.0
        self._step_seconds: float | None = None  # moving average over this replica's steps
        self._timings_path = self.root / CLASS_IMAGE_TIMINGS
        self._image_seconds: dict[str, float] = _read_timings(self._timings_path)  # per (diffusion, steps, device)
        self._jobs: dict[str, JobRecord] = {}
        for r in self.store.all():
            if r.state == RUNNING:
                now = time.time()
                crashes = r.crashes + (0 if r.interrupted else 1)
                if not resume_jobs:
                    r = replace(r, state=FAILED, error_code="ABORTED", end_time=now, update_time=now,
                                error_message="interrupted by a server restart (resume_jobs is off)")
                elif crashes >= max_crashes:
                    r = replace(r, state=FAILED, crashes=crashes, interrupted=False, error_code="ABORTED",
                                end_time=now, update_time=now, error_message=crash_loop_message(r, crashes))
                    log.error("job %s: %s", r.id, r.error_message)
                else:
                    if crashes > r.crashes:
                        log.warning("job %s was running when the learner stopped unexpectedly (%d of %d allowed "
                                    "times); resuming it", r.id, crashes, max_crashes)
                    r = replace(r, state=QUEUED, crashes=crashes, interrupted=False, update_time=now)
                self.store.put(r)
            self._jobs[r.id] = r
        self._seq = max((r.seq for r in self._jobs.values()), default=0)
        self._update_queue_gauge()

    # -- records ------------------------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def _put(self, record: JobRecord) -> None:
        """Persist, then publish, a record (caller holds the condition). A failed write changes nothing in memory
        and is a clear RESOURCE_EXHAUSTED (full disk, read-only store), never a corrupt or half-made record."""
        try:
            self.store.put(record)
        except (sqlite3.Error, OSError) as exc:
            if self.store_writable:
                self.store_writable, self._unwritable_since = False, time.monotonic()
            raise ResourceExhausted(f"the job store cannot be written (no space left on the disk, or read-only): "
                                    f"{exc}") from exc
        self.store_writable = True
        self._jobs[record.id] = record
        self._version += 1
        self._update_queue_gauge()
        self._cond.notify_all()

    def _update_queue_gauge(self) -> None:
        QUEUE_DEPTH.set(sum(1 for r in self._jobs.values() if r.state == QUEUED))
        ACTIVE_JOBS.set(sum(1 for r in self._jobs.values() if r.state in (QUEUED, RUNNING)))

    def get(self, job_id: str) -> JobRecord:
        with self._cond:
            record = self._jobs.get(job_id)
        if record is None:
            raise NotFound(f"no learning job {job_id!r}")
        return record

    def list(self) -> list[JobRecord]:
        with self._cond:
            return sorted(self._jobs.values(), key=lambda r: r.seq)

    def active_jobs(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return sum(1 for r in self._jobs.values() if r.state in (QUEUED, RUNNING))

    def step_seconds(self) -> float | None:
        """This replica's training step time (moving average), None before its first timed step."""
        return self._step_seconds

    def queue_position(self, job_id: str) -> int:
        with self._cond:
            record = self._jobs[job_id]
            return sum(1 for r in self._jobs.values() if r.state == QUEUED and r.seq < record.seq)

    def eta_seconds(self, record: JobRecord) -> float | None:
        """Remaining steps and class images to generate of this job and of everything ahead of it, at this
        replica's step time and class-image time (None while either is needed and not measured yet)."""
        if record.done or self._step_seconds is None:
            return None
        with self._cond:
            pending = [r for r in self._jobs.values() if not r.done and r.seq < record.seq] + [record]
        images = sum(class_images_left(r) for r in pending)
        per_image = self.seconds_per_class_image()
        if images and per_image is None:
            return None
        return sum(r.total_steps - r.step for r in pending) * self._step_seconds + images * (per_image or 0.0)

    # -- class images -------------------------------------------------------------------------------------------

    def class_image_plan(self, spec: LearningSpec) -> C.ClassImagePlan | None:
        """The class images a job of `spec` uses and which of them exist now (None: prior preservation off)."""
        s = spec.schedule
        if s.num_class_images <= 0:
            return None
        return C.plan(self.bundle, s.class_prompt, C.used_count(s.num_class_images, s.total_steps),
                      self.class_images_dir, self.class_image_steps)

    def _timing_key(self) -> str:
        return f"{C.diffusion_digest(self.bundle)[:16]}|{self.class_image_steps}|{self.device}"

    def seconds_per_class_image(self) -> float | None:
        """Seconds one class image takes here, as measured on the class images this store's learner generated
        (with this bundle's diffusion weights, denoising steps and device); None before any was."""
        return self._image_seconds.get(self._timing_key())

    def _measured_class_image(self, seconds: float) -> None:
        key = self._timing_key()
        known = self._image_seconds.get(key)
        self._image_seconds[key] = seconds if known is None else 0.7 * known + 0.3 * seconds
        try:  # a file that cannot be written only costs the next plans their estimate
            tmp = self._timings_path.with_name(f"{CLASS_IMAGE_TIMINGS}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._image_seconds, indent=1), encoding="utf-8")
            os.replace(tmp, self._timings_path)
        except OSError as exc:
            log.debug("cannot write %s: %s", self._timings_path, exc)

    # -- commands -----------------------------------------------------------------------------------------------

    def submit(self, spec: LearningSpec, request_id: str = "", request_digest: str = "",
               memory_estimate: int = 0, source_sha256: str = "") -> JobRecord:
        with self._cond:
            if request_id:
                for r in self._jobs.values():
                    if r.request_id == request_id:
                        if r.request_digest != request_digest:
                            raise Aborted(f"request_id {request_id!r} was already used for a different request")
                        return r
            queued = sum(1 for r in self._jobs.values() if r.state == QUEUED)
            if queued >= self.queue_size:
                raise ResourceExhausted(f"the learning queue is full ({queued} jobs waiting); retry later")
            job_id = uuid.uuid4().hex
            try:
                self.job_dir(job_id).mkdir(parents=True)
                save_inputs(self.job_dir(job_id) / "input", spec)
                if source_sha256:  # the request's own image (the input folder holds its training square)
                    (self.job_dir(job_id) / "input" / "source.json").write_text(json.dumps({"sha256": source_sha256}))
                now = time.time()
                record = JobRecord(job_id, request_id, request_digest, QUEUED, spec.schedule.total_steps, now, now,
                                   seq=self._seq + 1, memory_estimate=memory_estimate,
                                   class_images=class_images_info(self.class_image_plan(spec)))
                self._put(record)
            except OSError as exc:  # the inputs could not be saved: leave nothing half-made behind
                shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
                raise ResourceExhausted(f"the job store has no space left or cannot be written: {exc}") from exc
            except ResourceExhausted:
                shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
                raise
            self._seq += 1
            return record

    def cancel(self, job_id: str) -> JobRecord:
        with self._cond:
            record = self.get(job_id)
            if record.done:
                return record
            now = time.time()
            if record.state == QUEUED:
                record = replace(record, state=CANCELLED, cancel_requested=True, end_time=now, update_time=now,
                                 error_code="CANCELLED", error_message="cancelled while queued")
            else:
                record = replace(record, cancel_requested=True, update_time=now)
            self._put(record)
            return record

    def delete(self, job_id: str) -> None:
        with self._cond:
            record = self.get(job_id)
            if not record.done:
                raise FailedPrecondition(f"job {job_id} is {record.state}; cancel it before deleting it")
            self.store.delete(job_id)
            del self._jobs[job_id]
            self._version += 1
            self._cond.notify_all()
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def wait(self, job_id: str, timeout: float | None) -> JobRecord:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                record = self.get(job_id)
                remaining = None if deadline is None else deadline - time.monotonic()
                if record.done or (remaining is not None and remaining <= 0):
                    return record
                self._cond.wait(remaining if remaining is not None else 1.0)

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True) -> Iterator[JobRecord]:
        """The current record, then the latest one after each change (coalesced), until it is terminal."""
        last = None
        while is_active():
            with self._cond:
                record = self.get(job_id)
                if record is last:
                    self._cond.wait(0.5)
                    continue
            last = record
            yield record
            if record.done:
                return

    # -- the runner ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="learner-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop after the current step (or denoising step, while preparing); the running job is checkpointed and
        resumes on the next start. True when the runner stopped within `timeout` seconds."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout)
            stopped = not self._thread.is_alive()
            if not stopped:
                log.warning("the running job did not stop within %.0fs", timeout)
        # a job stopped this way (or still finishing its step) is no crash: it resumes on the next start
        with self._cond:
            for r in list(self._jobs.values()):
                if r.state == RUNNING and not r.interrupted:
                    try:
                        self._put(replace(r, interrupted=True))
                    except ResourceExhausted:  # unwritable store: counted as a crash on the next start
                        log.warning("job %s: could not record the clean stop", r.id)
        return stopped

    def close(self, timeout: float = 30.0) -> None:
        """Stop (see `stop`), then wait for the runner however long its step takes: a process must not exit with
        a thread inside torch (the interpreter's shutdown would tear torch down under it and abort)."""
        if not self.stop(timeout) and self._thread is not None:
            log.warning("waiting for the running job to end its step")
            self._thread.join()
        self.store.close()

    def _next(self) -> JobRecord | None:
        with self._cond:
            while not self._stopping.is_set():
                queued = [r for r in self._jobs.values() if r.state == QUEUED]
                if queued:
                    record = min(queued, key=lambda r: r.seq)
                    now = time.time()
                    if record.start_time is None:
                        QUEUE_WAIT.observe(now - record.create_time)
                    record = replace(record, state=RUNNING, start_time=record.start_time or now, update_time=now)
                    self._put(record)
                    return record
                self._cond.wait(1.0)
        return None

    def _loop(self) -> None:
        """Run jobs one at a time. A failure of the store itself (a record that cannot be written) must not end
        the runner: it backs off and tries again, and readiness reports NOT_SERVING meanwhile (`ready`)."""
        while not self._stopping.is_set():
            try:
                record = self._next()
                if record is None:
                    return
                self._run(record)
            except Exception:
                log.exception("the learning runner could not update the job store; retrying in %.0fs", RETRY_SECONDS)
                self._stopping.wait(RETRY_SECONDS)

    def ready(self) -> bool:
        """False when the runner is gone, or the job store has been unwritable for UNREADY_AFTER_SECONDS (probed
        again on each call, so readiness comes back as soon as space does)."""
        if self._thread is not None and not self._thread.is_alive():
            return False
        if self.store_writable:
            return True
        try:  # can the store's disk take a write again?
            probe = self.root / ".write-probe"
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
            self.store_writable = True
            return True
        except OSError:
            return time.monotonic() - self._unwritable_since < UNREADY_AFTER_SECONDS

    def _update(self, job_id: str, **changes) -> JobRecord:
        with self._cond:
            record = replace(self._jobs[job_id], update_time=time.time(), **changes)
            self._put(record)
            return record

    def _run(self, record: JobRecord) -> None:
        job_id = record.id
        started = time.time()

        def on_phase(phase: str) -> None:
            self._update(job_id, phase=phase)

        def should_stop() -> None:
            if self.get(job_id).cancel_requested:
                raise Cancelled("cancelled by the caller")
            if self._stopping.is_set():
                raise Interrupted()

        def on_class_images(plan: C.ClassImagePlan, seconds_per_image: float | None) -> None:
            if seconds_per_image is not None:
                self._measured_class_image(seconds_per_image)
            known = self.get(job_id).class_images or {}
            info = class_images_info(plan, to_generate=known.get("to_generate"))
            if info != known:
                self._update(job_id, class_images=info)

        def on_step(info: StepInfo) -> None:
            seconds = info.losses.pop("step_seconds", None)
            if seconds is not None:
                self._step_seconds = seconds if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * seconds
            TRAIN_STEPS.labels(info.phase).inc()
            # After a restart the job recomputes the steps since its last checkpoint (the same values: resumes are
            # exact); the reported step holds at the furthest step reached until training passes it again.
            reached = self.get(job_id).step
            current = self._update(job_id, phase=info.phase, step=max(info.step, reached), losses=info.losses)
            if current.cancel_requested:
                raise Cancelled("cancelled by the caller")
            if self._stopping.is_set():
                raise Interrupted()

        trainer = None
        JOB_MEMORY.set(record.memory_estimate)
        try:
            self.before_job()
            spec = load_inputs(self.job_dir(job_id) / "input")
            trainer = Trainer(self.bundle, spec, self.job_dir(job_id), device=self.device,
                              class_images_dir=self.class_images_dir, class_image_steps=self.class_image_steps,
                              on_step=on_step, on_phase=on_phase, gradient_checkpointing=self.gradient_checkpointing,
                              adam_8bit=self.adam_8bit, should_stop=should_stop, on_class_images=on_class_images)
            if self.get(job_id).cancel_requested:
                raise Cancelled("cancelled by the caller")
            result = trainer.run(resume=True)
            trainer.release()  # the models go before the artifacts are written (a full delta is one UNet)
            files = write_artifacts(self.job_dir(job_id) / "artifacts", result, spec, self.bundle.digest)
            payload = {"tokens": [t.to_json() for t in result.tokens], "artifacts": [asdict(f) for f in files]}
            del result
            shutil.rmtree(self.job_dir(job_id) / "checkpoints", ignore_errors=True)
            self.on_succeeded(self.get(job_id))  # before the operation is done: its concepts are listed by then
            self._finish(job_id, SUCCEEDED, started, result=payload)
        except Interrupted:
            log.info("job %s interrupted by shutdown; it resumes on the next start", job_id)
        except OSError as exc:  # a checkpoint or artifact that could not be written
            log.warning("job %s failed: %s", job_id, exc)
            self._finish(job_id, FAILED, started, error_code="RESOURCE_EXHAUSTED",
                         error_message=f"the job store has no space left or cannot be written: {exc}")
        except Cancelled as exc:
            self._finish(job_id, CANCELLED, started, error_code="CANCELLED", error_message=exc.message)
        except IceError as exc:
            log.warning("job %s failed: %s", job_id, exc.message)
            self._finish(job_id, FAILED, started, error_code=exc.code, error_message=exc.message)
        except Exception as exc:
            if is_out_of_memory(exc):
                current = self.get(job_id)
                message = (f"ran out of memory on {self.device} at step {current.step} of {current.total_steps} "
                           f"({current.phase or 'preparing'})")
                if record.memory_estimate:
                    message += f"; the job was estimated to need {record.memory_estimate / (1 << 30):.1f} GiB"
                log.error("job %s: %s", job_id, message)
                self._finish(job_id, FAILED, started, error_code="RESOURCE_EXHAUSTED", error_message=message)
            else:
                log.exception("job %s failed", job_id)
                self._finish(job_id, FAILED, started, error_code="INTERNAL",
                             error_message="training failed with an internal error; see the server log")
        finally:
            if trainer is not None:
                trainer.release()
            del trainer
            gc.collect()
            release_host_memory()
            JOB_MEMORY.set(0)

    def _finish(self, job_id: str, state: str, started: float, **changes) -> None:
        """Record a job's end; retried until the store takes it, so an outcome is never dropped."""
        JOB_DURATION.labels(state).observe(time.time() - started)
        while True:
            try:
                self._update(job_id, state=state, end_time=time.time(), **changes)
                return
            except ResourceExhausted as exc:
                if self._stopping.is_set():  # unfinished on disk: the job resumes on the next start
                    raise
                log.error("job %s: cannot record its end (%s); retrying in %.0fs", job_id, exc.message, RETRY_SECONDS)
                self._stopping.wait(RETRY_SECONDS)


def crash_loop_message(record: JobRecord, crashes: int) -> str:
    where = f"step {record.step} of {record.total_steps}" + (f", {record.phase}" if record.phase else "")
    text = (f"the learner process stopped unexpectedly {crashes} times while running this job (last at {where}); "
            "it is not run again. A process killed while training has most often run out of memory")
    if record.memory_estimate:
        text += f" (this job was estimated to need {record.memory_estimate / (1 << 30):.1f} GiB)"
    return text + ": see the learner's log and its memory limit, or ask for less (LoRA refinement, fewer concepts)"


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or a CPU allocation that failed."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def class_images_info(plan: C.ClassImagePlan | None, to_generate: int | None = None) -> dict | None:
    """A plan as the job record keeps it. `to_generate` is what the job had to make when it was accepted (kept
    as the job makes them; a plan made later counts only what is still missing)."""
    if plan is None:
        return None
    return {"count": plan.count, "ready": plan.ready, "source": plan.source, "steps": plan.steps,
            "to_generate": plan.to_generate if to_generate is None else to_generate}


def class_images_left(record: JobRecord) -> int:
    info = record.class_images or {}
    return max(0, int(info.get("count", 0)) - int(info.get("ready", 0)))


def _read_timings(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def artifact_files(record: JobRecord) -> list[ArtifactFile]:
    return [ArtifactFile(**f) for f in (record.result or {}).get("artifacts", [])]
