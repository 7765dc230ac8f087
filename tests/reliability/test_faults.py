"""Faults, on real services:

- a client deadline shorter than the work: DEADLINE_EXCEEDED, and the server drops the work (its metrics show the
  abandoned call never reached the model, and the next call is served);
- SIGTERM while calls are in flight: they all finish, new calls get UNAVAILABLE, the process exits 0;
- the learner SIGKILLed twice mid-job, its newest checkpoint corrupted while it is down the second time: the job resumes
  from the newest checkpoint that verifies and succeeds, exactly one job record. (A single kill with a bit-exact
  comparison against an uninterrupted run is `tests/test_learner_service.py::test_sigkilled_learner_resumes_...`.)
- corrupt checkpoints are skipped (unit level, every kind of damage);
- an unwritable job store fails the start clearly; a full disk (a real 4 MiB tmpfs when mounting is allowed, else
  ENOSPC injected where the store writes) gives a clear error and leaves no record behind.
"""

from __future__ import annotations

import errno
import re
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from PIL import Image
from skimage import data as skimage_data

from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc
from services.common.server import start_server
from services.common.settings import LearnerSettings, from_sources
from tests.reliability.corpus import encode, mask_png, photo
from tests.reliability.harness import ServiceProcess, free_port, outcome, start_inprocess

IMAGE = encode(photo(96, 64), "PNG")
MASK = mask_png((96, 64))
# several rounds on a real photo (the tiny bundle's attention needs a small merge threshold to segment)
SLOW = localizer_pb2.LocalizeRequest(
    image=encode(Image.fromarray(skimage_data.coffee()), "PNG"),
    options=localizer_pb2.LocalizeOptions(merge_threshold=0.0008, min_area_fraction=0.0, max_rounds=4))


def _metric(port: int, name: str, **labels) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- localizer: deadlines and SIGTERM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def localizer(tiny_bundle_dir, tmp_path_factory):
    proc = ServiceProcess("localizer", tiny_bundle_dir, tmp_path_factory.mktemp("faults") / "localizer.log",
                          metrics_port=free_port(), args=["--grace-seconds", "60"])
    try:
        proc.wait_ready()
        localizer_pb2_grpc.LocalizerServiceStub(proc.channel).Localize(SLOW, timeout=120)  # warm-up
        yield proc
    finally:
        proc.stop()


def test_a_deadline_shorter_than_the_work_is_deadline_exceeded_and_the_work_is_dropped(localizer):
    stub = localizer_pb2_grpc.LocalizerServiceStub(localizer.channel)
    port = localizer.metrics_port
    encoded_before = _metric(port, "ice_localizer_stage_seconds_count", stage="encode")
    exceeded_before = _metric(port, "grpc_server_handled_total", grpc_method="Localize", grpc_code="DEADLINE_EXCEEDED")
    # a first call holds the model; the second, with a 0.2 s deadline, expires while it waits its turn
    first = stub.Localize.future(SLOW, timeout=120)
    time.sleep(0.2)
    t0 = time.monotonic()
    late = outcome(lambda: stub.Localize(SLOW, timeout=0.2))
    assert late.code == "DEADLINE_EXCEEDED", late
    assert time.monotonic() - t0 < 2, "the client waited far past its deadline"
    first.result()
    t0 = time.monotonic()
    stub.Localize(SLOW, timeout=120)  # served at once after the first: the expired call was dropped
    assert time.monotonic() - t0 < 60
    # Where the deadline passed while the call still waited for a worker thread, gRPC drops it before any
    # handler (or interceptor) runs, so nothing is counted; where it waited for the model lock instead, the
    # servicer ends it with DEADLINE_EXCEEDED. Either way the work must never reach the model.
    deadline = time.monotonic() + 10
    handled = False
    while time.monotonic() < deadline and not handled:
        handled = _metric(port, "grpc_server_handled_total", grpc_method="Localize",
                          grpc_code="DEADLINE_EXCEEDED") >= exceeded_before + 1
        time.sleep(0.1)
    if handled:
        assert "DEADLINE_EXCEEDED" in localizer.log_text()
    # exactly the two served calls reached the end of the pipeline; the expired one stopped at the first check
    # after its deadline (before the model when it waited for it, else between rounds or before the response)
    assert _metric(port, "ice_localizer_stage_seconds_count", stage="encode") == encoded_before + 2


def test_sigterm_lets_in_flight_calls_finish_and_refuses_new_ones(localizer):
    stub = localizer_pb2_grpc.LocalizerServiceStub(localizer.channel)
    in_flight = [stub.Localize.future(SLOW, timeout=120) for _ in range(6)]  # served one at a time
    time.sleep(0.5)
    assert sum(not f.done() for f in in_flight) >= 3, "the calls finished before the signal; nothing was tested"
    localizer.signal(signal.SIGTERM)
    time.sleep(0.3)
    with grpc.insecure_channel(f"127.0.0.1:{localizer.port}") as fresh:
        refused = outcome(lambda: localizer_pb2_grpc.LocalizerServiceStub(fresh).Localize(SLOW, timeout=5))
    draining = sum(not f.done() for f in in_flight)
    assert refused.code == "UNAVAILABLE", refused
    assert draining >= 1, "the server had already finished everything: the refusal proves nothing about draining"
    for future in in_flight:
        assert future.result().rounds >= 1  # every accepted call completed
    assert localizer.proc.wait(60) == 0
    assert "received SIGTERM" in localizer.log_text()


# -- learner: repeated SIGKILL and a corrupted checkpoint ---------------------------------------------------------------


def _checkpoints(job_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (job_dir / "checkpoints").glob("step-*"))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_learner_survives_repeated_sigkill_and_a_corrupted_checkpoint(tiny_bundle_dir, tmp_path):
    store, log, port = tmp_path / "store", tmp_path / "learner.log", free_port()
    args = ["--job-store", str(store), "--class-image-steps", "2"]
    schedule = learner_pb2.Schedule(phase1_steps=40, phase2_steps=0, refinement_steps=0, num_class_images=0,
                                    checkpoint_every=3)
    request = learner_pb2.CreateLearningJobRequest(image=IMAGE, concepts=[learner_pb2.ConceptInput(noun="cup", mask=MASK)],
                                                   schedule=schedule, seed=11)
    proc = ServiceProcess("learner", tiny_bundle_dir, log, port=port, args=args)
    proc.wait_ready()
    op = learner_pb2_grpc.LearnerServiceStub(proc.channel).CreateLearningJob(request, timeout=60)
    job_dir = store / "jobs" / op.name.split("/")[1]
    _wait_for(lambda: _checkpoints(job_dir), 120, "no checkpoint was written")
    first_kill = _checkpoints(job_dir)
    proc.kill()
    proc = ServiceProcess("learner", tiny_bundle_dir, log, port=port, args=args)
    proc.wait_ready()
    # while the second process trains, kill it too and damage its newest checkpoint before the restart
    seen = first_kill[-1]
    _wait_for(lambda: _checkpoints(job_dir)[-1] > seen and len(_checkpoints(job_dir)) >= 2, 120,
              "no checkpoint after the restart")
    proc.kill()
    steps = _checkpoints(job_dir)
    newest = job_dir / "checkpoints" / f"step-{steps[-1]:07d}" / "tensors.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    proc = ServiceProcess("learner", tiny_bundle_dir, log, port=port, args=args)
    try:
        proc.wait_ready()
        ops = operations_pb2_grpc.OperationsStub(proc.channel)
        deadline = time.monotonic() + 240
        done = ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
        while not done.done:
            assert time.monotonic() < deadline, "the job did not finish after the restarts"
            done = ops.WaitOperation(operations_pb2.WaitOperationRequest(
                name=op.name, timeout=duration_pb2.Duration(seconds=20)), timeout=30)
        assert done.HasField("response"), done.error
        listed = ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), timeout=10).operations
        assert [o.name for o in listed] == [op.name]  # one job: nothing lost, nothing duplicated
        md = learner_pb2.LearningJobMetadata()
        done.metadata.Unpack(md)
        assert md.step == md.total_steps == 40
    finally:
        proc.stop()
    text = log.read_text(errors="replace")
    resumed = [int(s) for s in re.findall(r"resuming at step (\d+)", text)]
    assert len(resumed) == 2, text[-3000:]
    # the first restart resumed from a checkpoint that existed at the kill; the second skipped the damaged one
    assert resumed[0] in first_kill, (resumed, first_kill)
    assert "unusable" in text and "checksum" in text
    assert resumed[1] == steps[-2], (resumed, steps)


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
                            port=free_port(), metrics_port=0, job_store=blocker / "store")
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
    """A job store on a 4 MiB tmpfs that can be filled and freed (real ENOSPC from every writer). Where mounting is
    not allowed (not root), ENOSPC is injected where the store writes: the job inputs and the SQLite records."""

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

        def db_full(*args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

        self.patch.setattr(jobs, "save_inputs", no_space)
        self.patch.setattr(jobs.JobStore, "put", db_full)

    def free(self) -> None:
        if self.real:
            (self.folder / "filler").unlink(missing_ok=True)
        else:
            self.patch.undo()

    def close(self) -> None:
        self.free()
        if self.real:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


@pytest.fixture(scope="module")
def full_disk_learner(tiny_bundle_dir, tmp_path_factory):
    disk = FullDisk(tmp_path_factory.mktemp("disk") / "mnt")
    running = start_inprocess("learner", tiny_bundle_dir, job_store=disk.folder / "store", class_image_steps=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield disk, learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
    finally:
        channel.close()
        running.stop(grace=0)
        disk.close()


def _job(steps: int) -> learner_pb2.CreateLearningJobRequest:
    return learner_pb2.CreateLearningJobRequest(
        image=IMAGE, concepts=[learner_pb2.ConceptInput(noun="cup", mask=MASK)],
        schedule=learner_pb2.Schedule(phase1_steps=steps, phase2_steps=0, refinement_steps=0, num_class_images=0))


def _listed(ops) -> list:
    return list(ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), timeout=10).operations)


def test_a_full_disk_refuses_new_jobs_clearly_and_leaves_no_record(full_disk_learner):
    disk, stub, ops = full_disk_learner
    before = [o.name for o in _listed(ops)]
    disk.fill()
    try:
        refused = outcome(lambda: stub.CreateLearningJob(_job(1), timeout=30))
        assert [o.name for o in _listed(ops)] == before  # no half-made record
        assert refused.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"), refused
        assert "space" in refused.details.lower(), refused
    finally:
        disk.free()
    accepted = outcome(lambda: stub.CreateLearningJob(_job(1), timeout=30))
    assert accepted.code == "OK", accepted


def test_cancel_on_a_full_disk_is_refused_clearly_and_the_jobs_still_end(full_disk_learner):
    disk, stub, ops = full_disk_learner
    running = stub.CreateLearningJob(_job(2000), timeout=30)
    _wait_for(lambda: _step(ops, running.name) >= 2, 120, "the job did not start")
    queued = stub.CreateLearningJob(_job(1), timeout=30)
    problems = []
    disk.fill()
    try:
        cancel = outcome(lambda: ops.CancelOperation(operations_pb2.CancelOperationRequest(name=running.name),
                                                     timeout=10))
        if cancel.code not in ("OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"):
            problems.append(f"CancelOperation on a full disk: {cancel}")
        time.sleep(2)  # training steps and record updates meet the full disk
    finally:
        disk.free()
    for name in (running.name, queued.name):
        ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name), timeout=10)
        op = ops.WaitOperation(operations_pb2.WaitOperationRequest(
            name=name, timeout=duration_pb2.Duration(seconds=20)), timeout=30)
        if not op.done:
            problems.append(f"{name} never ended after the disk was freed: the runner no longer runs jobs")
        elif op.HasField("error") and op.error.code != 1 and not re.search("space|disk|full", op.error.message, re.I):
            problems.append(f"{name} failed without saying why: {op.error}")  # CANCELLED (1) is fine
    assert not problems, "\n".join(problems)


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

    try:
        monkeypatch.setattr(jobs.JobStore, "put", disk_full_when_a_job_starts)
        job = stub.CreateLearningJob(_job(2000), timeout=30)
        _wait_for(lambda: failed, 30, "the runner did not try to start the job")
        monkeypatch.undo()
        # the runner retries or fails the job clearly; it must not stay queued behind a dead runner
        deadline = time.monotonic() + 15
        while _state(ops, job.name) == learner_pb2.JOB_STATE_QUEUED and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _state(ops, job.name) != learner_pb2.JOB_STATE_QUEUED, "the runner thread died on the failed write"
    finally:
        ops.CancelOperation(operations_pb2.CancelOperationRequest(name=job.name), timeout=10)
        channel.close()
        running_server.stop(grace=0)


def _state(ops, name: str) -> int:
    md = learner_pb2.LearningJobMetadata()
    ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10).metadata.Unpack(md)
    return md.state


def _step(ops, name: str) -> int:
    md = learner_pb2.LearningJobMetadata()
    ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10).metadata.Unpack(md)
    return md.step

