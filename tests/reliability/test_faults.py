"""Faults, on real services:

- a client deadline that passes while the call waits for the model: DEADLINE_EXCEEDED, and the server drops the
  call before the model (a gate in the model call holds the first call, so nothing depends on speed);
- SIGTERM while calls are in flight: they all finish, new calls get UNAVAILABLE, the process exits 0;
- SIGTERM while a learning job trains: the job is checkpointed at the step it reached and resumes there;
- SIGTERM while a job makes its class images (held at its second batch): the process exits 0 within the grace period
  (it aborted with SIGABRT before), the pipeline call it was in stops at its first denoising step, and the next
  process resumes the job, keeping the images made; SIGKILL there: the finished images stay, the next process makes
  only the rest, and every image is the one an uninterrupted generation makes;
- the learner SIGKILLed twice mid-job, its newest checkpoint corrupted while it is down the second time: the job resumes
  from the newest checkpoint that verifies and succeeds, exactly one job record. (A single kill with a bit-exact
  comparison against an uninterrupted run is `tests/test_learner_service.py::test_sigkilled_learner_resumes_...`.)
- corrupt checkpoints are skipped (unit level, every kind of damage);
- an unwritable job store fails the start clearly; a full disk (a real 4 MiB tmpfs when mounting is allowed, else
  ENOSPC injected where the store writes) gives a clear error and leaves no record behind; record writes that fail
  are RESOURCE_EXHAUSTED, the job they belong to fails with that reason once space is back, the runner survives, and
  readiness turns NOT_SERVING only after the store has been unwritable for the whole window, and back.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc
from services.common.server import start_server
from services.common.settings import LearnerSettings, from_sources
from tests.reliability.corpus import encode, mask_png, photo
from tests.reliability.harness import PATIENCE, ServiceProcess, metric, outcome, start_inprocess, wait_for

IMAGE = encode(photo(96, 64), "PNG")
MASK = mask_png((96, 64))
# one round on a small photo: the gate, not the size of the work, decides how long a call lasts
QUICK = localizer_pb2.LocalizeRequest(
    image=IMAGE, options=localizer_pb2.LocalizeOptions(merge_threshold=0.0008, min_area_fraction=0.0, max_rounds=1))


# -- localizer: deadlines and SIGTERM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def localizer(tiny_bundle_dir, tmp_path_factory):
    """The localizer as a process, with a gate in its model call (tests/reliability/gated.py)."""
    folder = tmp_path_factory.mktemp("faults")
    gate = folder / "gate"
    gate.mkdir()
    proc = ServiceProcess("localizer", tiny_bundle_dir, folder / "localizer.log", metrics_port=-1,
                          args=["--grace-seconds", "3600"], gate=gate)
    try:
        proc.wait_ready()
        localizer_pb2_grpc.LocalizerServiceStub(proc.channel).Localize(QUICK, timeout=PATIENCE)  # warm-up
        yield proc, gate
    finally:
        (gate / "closed").unlink(missing_ok=True)
        proc.stop()


def _entered(gate: Path) -> int:
    return len(list(gate.glob("entered-*")))


def _localize_counts(port: int) -> tuple[float, float]:
    """(started, finished) Localize calls as the server counted them."""
    return (metric(port, "grpc_server_started_total", grpc_method="Localize"),
            metric(port, "grpc_server_handled_total", grpc_method="Localize"))


def test_a_deadline_that_passes_while_the_call_waits_is_deadline_exceeded_and_never_reaches_the_model(localizer):
    proc, gate = localizer
    stub = localizer_pb2_grpc.LocalizerServiceStub(proc.channel)
    port = proc.metrics_port
    entered = _entered(gate)
    started, _ = _localize_counts(port)
    exceeded = metric(port, "grpc_server_handled_total", grpc_method="Localize", grpc_code="DEADLINE_EXCEEDED")
    encoded = metric(port, "ice_localizer_stage_seconds_count", stage="encode")
    (gate / "closed").touch()
    try:
        first = stub.Localize.future(QUICK, timeout=PATIENCE)  # holds the model until the gate opens
        wait_for(lambda: _entered(gate) == entered + 1, PATIENCE, "the first call did not reach the model")
        t0 = time.monotonic()
        late = outcome(lambda: stub.Localize(QUICK, timeout=5))  # waits for the model behind the first
        assert late.code == "DEADLINE_EXCEEDED", late
        assert time.monotonic() - t0 < 60, "the client waited far past its deadline"
        assert _localize_counts(port)[0] == started + 2  # the server had accepted the late call
    finally:
        (gate / "closed").unlink()
    assert first.result().width == 96
    stub.Localize(QUICK, timeout=PATIENCE)  # served after the first: the expired call was dropped
    # every accepted call has finished: the late one as DEADLINE_EXCEEDED, before the model
    wait_for(lambda: _localize_counts(port)[1] == started + 3, PATIENCE, "a call was never finished")
    assert metric(port, "grpc_server_handled_total", grpc_method="Localize",
                  grpc_code="DEADLINE_EXCEEDED") == exceeded + 1
    assert _entered(gate) == entered + 2, "the call whose deadline had passed still ran the model"
    assert metric(port, "ice_localizer_stage_seconds_count", stage="encode") == encoded + 2
    assert "DEADLINE_EXCEEDED" in proc.log_text()


def test_sigterm_lets_in_flight_calls_finish_and_refuses_new_ones(localizer):
    proc, gate = localizer
    stub = localizer_pb2_grpc.LocalizerServiceStub(proc.channel)
    entered = _entered(gate)
    started, _ = _localize_counts(proc.metrics_port)
    (gate / "closed").touch()
    try:
        in_flight = [stub.Localize.future(QUICK, timeout=PATIENCE) for _ in range(6)]  # served one at a time
        wait_for(lambda: _localize_counts(proc.metrics_port)[0] == started + 6, PATIENCE, "the calls were not accepted")
        wait_for(lambda: _entered(gate) == entered + 1, PATIENCE, "no call reached the model")
        proc.signal(signal.SIGTERM)
        wait_for(lambda: "shutting down" in proc.log_text(), PATIENCE, "the signal was not handled")

        def refused() -> bool:
            with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as fresh:
                got = outcome(lambda: localizer_pb2_grpc.LocalizerServiceStub(fresh).Localize(QUICK, timeout=10))
            # UNAVAILABLE once the drain has begun; a call that raced the start of the drain is CANCELLED or waits
            # behind the gate (DEADLINE_EXCEEDED): then ask again
            assert got.code in ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"), got
            return got.code == "UNAVAILABLE"

        wait_for(refused, PATIENCE, "new calls were never refused during the drain")
        assert not any(f.done() for f in in_flight)  # all six are held by the gate: the drain waits for them
    finally:
        (gate / "closed").unlink()
    for future in in_flight:
        assert future.result().rounds == 1  # every accepted call completed
    assert proc.proc.wait(PATIENCE) == 0
    assert "received SIGTERM" in proc.log_text()


# -- learner: SIGTERM, repeated SIGKILL and a corrupted checkpoint ------------------------------------------------------


def _checkpoints(job_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (job_dir / "checkpoints").glob("step-*"))


def _learner(tiny_bundle_dir, tmp_path, gate: Path | None, *extra: str) -> ServiceProcess:
    args = ["--job-store", str(tmp_path / "store"), "--class-image-steps", "2", *extra]
    proc = ServiceProcess("learner", tiny_bundle_dir, tmp_path / "learner.log", args=args, gate=gate)
    proc.wait_ready()
    return proc


def _create(proc: ServiceProcess, steps: int, checkpoint_every: int) -> operations_pb2.Operation:
    schedule = learner_pb2.Schedule(phase1_steps=steps, phase2_steps=0, refinement_steps=0, num_class_images=0,
                                    checkpoint_every=checkpoint_every)
    request = learner_pb2.CreateLearningJobRequest(
        image=IMAGE, concepts=[learner_pb2.ConceptInput(noun="cup", mask=MASK)], schedule=schedule, seed=11)
    return learner_pb2_grpc.LearnerServiceStub(proc.channel).CreateLearningJob(request, timeout=60)


def _hold_at(gate: Path, *steps: int) -> None:
    for held in gate.glob("held-*"):
        held.unlink()
    (gate / "hold-at").write_text(" ".join(map(str, steps)))


def test_sigterm_checkpoints_the_running_job_and_it_resumes_there(tiny_bundle_dir, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "closed").touch()
    _hold_at(gate, 5)  # the job trains 5 steps, then its 6th step waits at the gate
    proc = _learner(tiny_bundle_dir, tmp_path, gate)
    try:
        op = _create(proc, steps=2000, checkpoint_every=0)  # no periodic checkpoint: only the shutdown writes one
        job_dir = tmp_path / "store" / "jobs" / op.name.split("/")[1]
        wait_for(lambda: (gate / "held-5").exists(), PATIENCE, "the job did not reach its 6th step")
        assert _checkpoints(job_dir) == []
        proc.signal(signal.SIGTERM)
        wait_for(lambda: "shutting down" in proc.log_text(), PATIENCE, "the signal was not handled")
    finally:
        (gate / "closed").unlink()  # the 6th step completes, then the job stops
    assert proc.proc.wait(PATIENCE) == 0, proc.log_tail()
    proc.stop()
    assert _checkpoints(job_dir) == [6]  # written at shutdown, at the step reached
    assert f"job {op.name.split('/')[1]} interrupted by shutdown" in proc.log_text()

    proc = _learner(tiny_bundle_dir, tmp_path, None)
    try:
        ops = operations_pb2_grpc.OperationsStub(proc.channel)
        wait_for(lambda: "resuming at step" in proc.log_text(), PATIENCE, "the job did not resume")
        assert re.findall(r"resuming at step (\d+)", proc.log_text()) == ["6"]
        assert "stopped unexpectedly" not in proc.log_text()  # a clean stop is not counted as a crash
        md = _metadata(ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=30))
        assert md.state == learner_pb2.JOB_STATE_RUNNING and md.step >= 6
        ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=30)
    finally:
        proc.stop()


def _preparing_job(proc: ServiceProcess) -> operations_pb2.Operation:
    """A job that uses 8 class images (2 batches of 4) and trains 8 steps."""
    schedule = learner_pb2.Schedule(phase1_steps=4, phase2_steps=2, refinement_steps=2, num_class_images=8,
                                    checkpoint_every=0)
    request = learner_pb2.CreateLearningJobRequest(
        image=IMAGE, concepts=[learner_pb2.ConceptInput(noun="cup", mask=MASK)], schedule=schedule, seed=11)
    return learner_pb2_grpc.LearnerServiceStub(proc.channel).CreateLearningJob(request, timeout=PATIENCE)


def _class_images(store: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (inode, mtime, sha256) of every class image in the store's cache."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted((store / "class-images").rglob("*.png"))}


def _held_at_the_second_batch(tiny_bundle_dir, tmp_path) -> tuple[ServiceProcess, Path, operations_pb2.Operation]:
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "closed").touch()
    (gate / "hold-class-at").write_text("4")  # images 0-3 are made, then the call for 4-7 waits
    proc = _learner(tiny_bundle_dir, tmp_path, gate, "--grace-seconds", "600")
    op = _preparing_job(proc)
    wait_for(lambda: (gate / "class-held-4").exists(), PATIENCE, "the job did not reach its second batch")
    return proc, gate, op



def test_sigterm_while_a_job_prepares_hands_it_back_exits_0_and_it_resumes_in_the_next_process(
        tiny_bundle_dir, tmp_path):
    proc, gate, op = _held_at_the_second_batch(tiny_bundle_dir, tmp_path)
    store = tmp_path / "store"
    ops = operations_pb2_grpc.OperationsStub(proc.channel)
    assert _metadata(ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=30)).phase == \
        learner_pb2.PHASE_PREPARING
    made = _class_images(store)
    assert sorted(made) == [f"0000{n}.png" for n in range(4)]
    try:
        proc.signal(signal.SIGTERM)
        wait_for(lambda: "shutting down" in proc.log_text(), PATIENCE, "the signal was not handled")
    finally:
        (gate / "closed").unlink()  # the pipeline call starts: the job stops at its first denoising step
    assert proc.proc.wait(PATIENCE) == 0, proc.log_tail()  # not 134 (SIGABRT)
    proc.stop()
    log = proc.log_text()
    assert f"job {op.name.split('/')[1]} interrupted by shutdown" in log, log[-3000:]
    assert "terminate called" not in log and "Traceback" not in log, log[-3000:]
    assert _class_images(store) == made  # the call it was in wrote nothing, and the finished images stay

    proc = _learner(tiny_bundle_dir, tmp_path, None)  # the next process on the job store (a rescheduled pod)
    try:
        ops = operations_pb2_grpc.OperationsStub(proc.channel)
        done = _wait_done(ops, op.name, PATIENCE)
        assert done.HasField("response"), done.error
        assert _metadata(done).step == 8
    finally:
        proc.stop()
    assert "stopped unexpectedly" not in proc.log_text()  # a clean stop is no crash
    after = _class_images(store)
    assert {k: after[k] for k in made} == made and len(after) == 8  # 0-3 kept as they were, 4-7 made


def test_sigkill_while_class_images_are_made_keeps_the_finished_ones_and_goes_on_from_the_next(
        tiny_bundle_dir, tmp_path, tiny_bundle):
    from services.learner import class_images as C

    proc, gate, op = _held_at_the_second_batch(tiny_bundle_dir, tmp_path)
    store = tmp_path / "store"
    made = _class_images(store)
    proc.kill()  # SIGKILL while the call for images 4-7 waits
    (gate / "closed").unlink()
    assert _class_images(store) == made and len(made) == 4
    proc = _learner(tiny_bundle_dir, tmp_path, None)  # the next process on the job store
    try:
        done = _wait_done(operations_pb2_grpc.OperationsStub(proc.channel), op.name, PATIENCE)
        assert done.HasField("response"), done.error
    finally:
        proc.stop()
    after = _class_images(store)
    assert {k: after[k] for k in made} == made  # images 0-3 untouched (same inode, same mtime)
    assert sorted(after) == [f"0000{n}.png" for n in range(8)]
    # each image is what an uninterrupted generation makes (deterministic per seed and batch)
    reference = C.generate(C.plan(tiny_bundle, "a photo at the beach", 8, tmp_path / "reference", 2),
                           lambda: tiny_bundle.load_diffusion("cpu"))
    assert [after[p.name][2] for p in reference] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in reference]


def test_learner_survives_repeated_sigkill_and_a_corrupted_checkpoint(tiny_bundle_dir, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "closed").touch()
    _hold_at(gate, 6)
    proc = _learner(tiny_bundle_dir, tmp_path, gate)
    op = _create(proc, steps=40, checkpoint_every=3)
    job_dir = tmp_path / "store" / "jobs" / op.name.split("/")[1]
    wait_for(lambda: (gate / "held-6").exists(), PATIENCE, "the job did not reach step 6")
    proc.kill()  # SIGKILL while its 7th step waits at the gate
    assert _checkpoints(job_dir) == [3, 6]
    # the second process resumes at 6 and is killed while its 13th step waits; its newest checkpoint is damaged
    _hold_at(gate, 12)
    proc = _learner(tiny_bundle_dir, tmp_path, gate)
    wait_for(lambda: (gate / "held-12").exists(), PATIENCE, "the resumed job did not reach step 12")
    proc.kill()
    assert _checkpoints(job_dir) == [9, 12]
    newest = job_dir / "checkpoints" / "step-0000012" / "tensors.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    (gate / "closed").unlink()
    proc = _learner(tiny_bundle_dir, tmp_path, gate)
    try:
        ops = operations_pb2_grpc.OperationsStub(proc.channel)
        done = _wait_done(ops, op.name, PATIENCE)
        assert done.HasField("response"), done.error
        listed = ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), timeout=30).operations
        assert [o.name for o in listed] == [op.name]  # one job: nothing lost, nothing duplicated
        md = _metadata(done)
        assert md.step == md.total_steps == 40
    finally:
        proc.stop()
    text = (tmp_path / "learner.log").read_text(errors="replace")
    # the first restart resumed from the newest checkpoint at the kill; the second skipped the damaged one
    assert [int(s) for s in re.findall(r"resuming at step (\d+)", text)] == [6, 9], text[-3000:]
    assert "unusable" in text and "checksum" in text


def _metadata(op) -> learner_pb2.LearningJobMetadata:
    md = learner_pb2.LearningJobMetadata()
    assert op.metadata.Unpack(md)
    return md


def _wait_done(ops, name: str, timeout: float) -> operations_pb2.Operation:
    deadline = time.monotonic() + timeout
    while True:
        op = ops.WaitOperation(operations_pb2.WaitOperationRequest(
            name=name, timeout=duration_pb2.Duration(seconds=20)), timeout=60)
        if op.done:
            return op
        assert time.monotonic() < deadline, f"{name} did not finish"


@pytest.mark.parametrize("service", ["localizer", "learner", "evaluator"])
def test_a_service_whose_bundle_does_not_load_exits_1_naming_the_fault(service, tiny_bundle_dir, tmp_path):
    import os
    import sys

    from tests.reliability.harness import ROOT

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle)
    (bundle / "diffusion" / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # listed in bundle.json
    extra = ["--job-store", str(tmp_path / "store")] if service == "learner" else []
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", "-1",
         "--metrics-port", "0", *extra], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
        text=True, timeout=PATIENCE)
    assert done.returncode == 1, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "listening on" in log  # it had bound its port (liveness answered) before the load failed
    assert f"{service}: loading failed" in log and "diffusion/unet/diffusion_pytorch_model.safetensors" in log, \
        log[-3000:]


def test_checkpoint_loader_skips_every_kind_of_damage(tmp_path):
    import torch

    from services.learner import checkpoints

    root = tmp_path / "ckpt"
    for step in (3, 6):
        checkpoints.save(root, step, {"w": torch.full((4,), float(step))}, {"phase": "object_level"})
    assert checkpoints.load_latest(root)[0] == 6
    damages = {
        "tensor bytes flipped": lambda p: p.joinpath("tensors.safetensors").write_bytes(
            p.joinpath("tensors.safetensors").read_bytes()[:-1] + b"\x00"),
        "tensor file truncated": lambda p: p.joinpath("tensors.safetensors").write_bytes(b"12"),
        "state.json not JSON": lambda p: p.joinpath("state.json").write_text("{"),
        "state.json without checksum": lambda p: p.joinpath("state.json").write_text('{"step": 6}'),
        "tensor file missing": lambda p: p.joinpath("tensors.safetensors").unlink(),
    }
    for i, (what, damage) in enumerate(damages.items()):
        copy = tmp_path / f"copy-{i}"
        shutil.copytree(root, copy)
        damage(copy / "step-0000006")
        found = checkpoints.load_latest(copy)
        assert found is not None and found[0] == 3, what  # the previous checkpoint
        assert float(found[1]["w"][0]) == 3.0
        damage(copy / "step-0000003")
        assert checkpoints.load_latest(copy) is None, what  # nothing usable: the job restarts from step 0


# -- the job store: unwritable, full ------------------------------------------------------------------------------------


def test_a_job_store_that_cannot_be_created_fails_the_start_clearly(tiny_bundle_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings = from_sources(env={}, cls=LearnerSettings, bundle=Path(tiny_bundle_dir), host="127.0.0.1",
                            port=-1, metrics_port=0, job_store=blocker / "store")
    from services.learner.server import build_spec

    running = start_server(build_spec(settings), settings)
    try:
        assert not running.wait_ready(60)
        assert running.failed.is_set()
        assert str(blocker) in str(running.load_error)  # the message names the path at fault
    finally:
        running.stop(grace=0)
    assert blocker.read_text() == "not a directory"


class FullDisk:
    """A job store on a 4 MiB tmpfs that can be filled and freed (real ENOSPC from every file writer). Where mounting
    is not allowed (not root), ENOSPC is injected where the store writes files: the job inputs and the write probe."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.real = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(folder)],
                                   capture_output=True).returncode == 0
        self.patch = pytest.MonkeyPatch()

    def fill(self) -> None:
        if self.real:
            with open(self.folder / "filler", "ab", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
            return
        from services.learner import jobs

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch.setattr(jobs, "save_inputs", no_space)
        self.patch.setattr(jobs, "open", no_space, raising=False)  # the readiness probe's write

    def free(self) -> None:
        if self.real:
            (self.folder / "filler").unlink(missing_ok=True)
        else:
            self.patch.undo()

    def close(self) -> None:
        self.free()
        if self.real:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


class RecordsRefused:
    """Every write of a job record fails as SQLite fails on a full disk. Injected: on a real full disk SQLite's
    write-ahead log, once checkpointed, is reused from its start, so whether a given record write meets the full
    disk depends on where the log stands; the injection makes every one of them fail."""

    def __init__(self):
        self.patch = pytest.MonkeyPatch()

    def __enter__(self):
        from services.learner import jobs

        def db_full(*args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

        self.patch.setattr(jobs.JobStore, "put", db_full)
        return self

    def __exit__(self, *exc):
        self.patch.undo()


@pytest.fixture(scope="module")
def full_disk_learner(tiny_bundle_dir, tmp_path_factory):
    disk = FullDisk(tmp_path_factory.mktemp("disk") / "mnt")
    running = start_inprocess("learner", tiny_bundle_dir, job_store=disk.folder / "store", class_image_steps=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield disk, channel
    finally:
        channel.close()
        running.stop(grace=0)
        disk.close()


def _job(steps: int) -> learner_pb2.CreateLearningJobRequest:
    return learner_pb2.CreateLearningJobRequest(
        image=IMAGE, concepts=[learner_pb2.ConceptInput(noun="cup", mask=MASK)],
        schedule=learner_pb2.Schedule(phase1_steps=steps, phase2_steps=0, refinement_steps=0, num_class_images=0))


def _listed(ops) -> list:
    return list(ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), timeout=30).operations)


def test_a_full_disk_refuses_new_jobs_clearly_and_leaves_no_record(full_disk_learner):
    disk, channel = full_disk_learner
    stub, ops = learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
    before = [o.name for o in _listed(ops)]
    folders = sorted(p.name for p in (disk.folder / "store" / "jobs").glob("*"))
    disk.fill()
    try:
        refused = outcome(lambda: stub.CreateLearningJob(_job(1), timeout=60))
        assert refused.code == "RESOURCE_EXHAUSTED", refused
        assert "the job store has no space left" in refused.details, refused
        assert [o.name for o in _listed(ops)] == before  # no half-made record ...
        assert sorted(p.name for p in (disk.folder / "store" / "jobs").glob("*")) == folders  # ... nor folder
    finally:
        disk.free()
    accepted = outcome(lambda: stub.CreateLearningJob(_job(1), timeout=60))
    assert accepted.code == "OK", accepted
    _wait_done(ops, accepted.value.name, PATIENCE)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_refused_record_writes_fail_the_job_clearly_keep_the_runner_and_turn_readiness_off_for_a_while(
        full_disk_learner, monkeypatch):
    from services.learner import jobs

    disk, channel = full_disk_learner
    stub, ops = learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
    health = health_pb2_grpc.HealthStub(channel)

    def status(name: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert jobs.UNREADY_AFTER_SECONDS == 30.0  # the documented window; shortened below so the test is quick
    window = 3.0
    monkeypatch.setattr(jobs, "UNREADY_AFTER_SECONDS", window)
    lines = _Lines()
    logging.getLogger("ice.learner.jobs").addHandler(lines)
    running = stub.CreateLearningJob(_job(2000), timeout=60)
    wait_for(lambda: _metadata(ops.GetOperation(operations_pb2.GetOperationRequest(name=running.name),
                                                timeout=30)).step >= 2, PATIENCE, "the job did not start")
    queued = stub.CreateLearningJob(_job(1), timeout=60)
    try:
        disk.fill()  # the readiness probe cannot write either
        with RecordsRefused():
            since = time.monotonic()
            cancel = outcome(lambda: ops.CancelOperation(operations_pb2.CancelOperationRequest(name=running.name),
                                                         timeout=30))
            assert cancel.code == "RESOURCE_EXHAUSTED", cancel
            assert "the job store cannot be written (no space left on the disk" in cancel.details, cancel
            # the running job's next step record fails: its end is retried until it can be recorded
            wait_for(lambda: any("cannot record its end" in line for line in lines.lines), PATIENCE,
                     "the running job never met the refused write")
            wait_for(lambda: status("readiness") == not_serving, PATIENCE, "readiness never turned NOT_SERVING")
            assert time.monotonic() - since >= window, "readiness turned NOT_SERVING before the window"
            assert status("liveness") == serving  # the process is fine; its store is not
    finally:
        disk.free()
        logging.getLogger("ice.learner.jobs").removeHandler(lines)
    wait_for(lambda: status("readiness") == serving, PATIENCE, "readiness did not come back once the store took writes")
    failed = _wait_done(ops, running.name, PATIENCE)
    assert failed.error.code == 8, failed.error  # RESOURCE_EXHAUSTED: the job ended for the store, not cancelled
    assert "cannot be written" in failed.error.message
    done = _wait_done(ops, queued.name, PATIENCE)  # the runner survived and ran the queued job
    assert done.HasField("response"), done.error


def test_the_runner_survives_a_record_write_that_fails_as_a_job_starts(tiny_bundle_dir, tmp_path, monkeypatch):
    from services.learner import jobs

    running_server = start_inprocess("learner", tiny_bundle_dir, job_store=tmp_path / "store")
    channel = grpc.insecure_channel(f"127.0.0.1:{running_server.port}")
    stub, ops = learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
    real_put = jobs.JobStore.put
    failed = []

    def disk_full_when_a_job_starts(self, record):
        # the write that marks a job running is refused once, as a full disk would (injected: a real disk cannot
        # be filled at exactly that instant)
        if record.state == jobs.RUNNING and record.step == 0 and not failed:
            failed.append(record.id)
            raise sqlite3.OperationalError("database or disk is full")
        return real_put(self, record)

    job = None
    try:
        monkeypatch.setattr(jobs.JobStore, "put", disk_full_when_a_job_starts)
        job = stub.CreateLearningJob(_job(1), timeout=60)
        wait_for(lambda: failed, PATIENCE, "the runner did not try to start the job")
        monkeypatch.undo()
        # the runner backs off and picks the job up again: it runs to the end
        done = _wait_done(ops, job.name, PATIENCE)
        assert done.HasField("response"), done.error
    finally:
        if job is not None:
            ops.CancelOperation(operations_pb2.CancelOperationRequest(name=job.name), timeout=30)
        channel.close()
        running_server.stop(grace=0)


@pytest.mark.parametrize("when", ["loading", "ready"])
def test_a_burst_of_sigterms_still_stops_the_service_gracefully(tiny_bundle_dir, tmp_path, when):
    """A killed parent (`ice serve`, the demo) can send its services several SIGTERMs at once (the kernel signals a
    child once for each of the parent's threads that dies), and a signal may land while the main thread is inside
    any lock or inside the handler itself. The handler must take no lock and do no work: a service signalled again
    and again, while it loads its models or once ready, stops once, gracefully, and exits 0 (a handler that logged
    and set an Event aborted the process on such a burst during loading, 5 times in 6)."""
    for attempt in range(3):
        proc = ServiceProcess("evaluator", tiny_bundle_dir, tmp_path / f"evaluator-{attempt}.log")
        try:
            proc.wait_bound() if when == "loading" else proc.wait_ready()
            for _ in range(50):
                proc.signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            while "shutting down" not in proc.log_text():  # and one every ~millisecond until the stop has begun
                assert proc.proc.poll() is None, proc.log_tail()
                assert time.monotonic() < deadline, "not stopping 60 s after the first SIGTERM: " + proc.log_tail()
                proc.signal(signal.SIGTERM)
                time.sleep(0.001)
            assert proc.proc.wait(PATIENCE) == 0, proc.log_tail()
        finally:
            proc.stop()
        assert proc.log_text().count("shutting down") == 1, proc.log_tail()
        assert "received SIGTERM" in proc.log_text()
