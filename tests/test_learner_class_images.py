"""Class images through the learner's real gRPC on loopback (tiny bundle, 2 denoising steps an image): a job's plan
says before it starts how many it uses and must generate and what that costs; a job generates only the ones it
uses, counting them as its PREPARING progress; a cancel while it generates takes effect inside the pipeline call
(within one denoising step) and the next job starts; `--few-class-images` scales them; and a bundle that carries
its class images (`ice-bundle class-images`) is never made to generate them.

Generation is held where a test must act by a gate in `class_images.make_batch` (the in-process twin of
tests/reliability/gated.py): nothing depends on the speed of the machine."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from PIL import Image

from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from services.common.images import encode_mask
from services.learner import class_images as C
from tests.reliability.harness import PATIENCE, start_inprocess

PROMPT = "a photo at the beach"  # the published class prompt, the tiny bundle's default


class Gate:
    """Holds the pipeline call that makes the batch starting at image `at` (each time one comes) until `open()`."""

    def __init__(self, monkeypatch):
        self.at: set[int] = set()
        self.held = threading.Event()
        self._open = threading.Event()
        self.calls: list[list[int]] = []
        make_batch = C.make_batch

        def batch(pipe, prompt, seeds, *args, **kwargs):
            self.calls.append(list(seeds))
            if seeds[0] in self.at:
                self.held.set()
                assert self._open.wait(PATIENCE), "the gate was never opened"
            return make_batch(pipe, prompt, seeds, *args, **kwargs)

        monkeypatch.setattr(C, "make_batch", batch)

    def hold(self, *at: int) -> None:
        """Hold from now on at these batches (call it only while nothing is held: it closes the gate again)."""
        self.at, self._open = set(at), threading.Event()
        self.held.clear()

    def open(self) -> None:
        self._open.set()


def _request(photo_png, prompt=PROMPT, **schedule) -> learner_pb2.CreateLearningJobRequest:
    w, h = Image.open(io.BytesIO(photo_png)).size
    mask = np.zeros((h, w), bool)
    mask[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = True
    s = dict(phase1_steps=6, phase2_steps=4, refinement_steps=2, checkpoint_every=0) | schedule
    return learner_pb2.CreateLearningJobRequest(
        image=photo_png, concepts=[learner_pb2.ConceptInput(noun="cup", mask=encode_mask(mask))],
        schedule=learner_pb2.Schedule(class_prompt=prompt, **s), seed=3)


def _metadata(op) -> learner_pb2.LearningJobMetadata:
    md = learner_pb2.LearningJobMetadata()
    assert op.metadata.Unpack(md)
    return md


def _get(ops, name) -> operations_pb2.Operation:
    return ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=PATIENCE)


def _wait(ops, name) -> operations_pb2.Operation:
    deadline = time.monotonic() + PATIENCE
    while True:
        op = ops.WaitOperation(operations_pb2.WaitOperationRequest(
            name=name, timeout=duration_pb2.Duration(seconds=20)), timeout=PATIENCE)
        if op.done:
            return op
        assert time.monotonic() < deadline, f"{name} did not finish"


@pytest.fixture
def learner(tiny_bundle_dir, tmp_path):
    running = start_inprocess("learner", tiny_bundle_dir, job_store=tmp_path / "store", class_image_steps=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield (learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(channel),
               tmp_path / "store" / "class-images", running.port)
    finally:
        channel.close()
        running.stop(grace=0)


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.png")) if folder.exists() else []


def test_the_plan_says_what_a_job_will_generate_and_its_progress_counts_the_class_images(
        learner, photo_png, monkeypatch):
    stub, ops, cache, _ = learner
    gate = Gate(monkeypatch)
    request = _request(photo_png)  # 6/4/2 steps, the default 1000 class images
    plan = stub.PlanLearningJob(learner_pb2.PlanLearningJobRequest(job=request), timeout=PATIENCE)
    assert plan.total_steps == 12
    c = plan.class_image_status
    assert (c.count, c.ready, c.to_generate, c.source, c.inference_steps) == (12, 0, 12, "cache", 2)
    assert not c.HasField("seconds_each") and not plan.HasField("class_images_seconds")  # never timed here
    assert plan.HasField("memory_estimate_bytes") and plan.jobs_ahead == 0
    assert _pngs(cache) == []  # a plan makes nothing

    gate.hold(8)
    op = stub.CreateLearningJob(request, timeout=PATIENCE)
    assert gate.held.wait(PATIENCE)
    md = _metadata(_get(ops, op.name))  # held before the batch of images 8-11: 8 are made
    assert md.phase == learner_pb2.PHASE_PREPARING and md.step == 0
    assert (md.class_image_status.count, md.class_image_status.ready, md.class_image_status.to_generate) == (12, 8, 12)
    assert md.class_image_status.seconds_each > 0  # measured on the batches made so far
    gate.open()
    done = _wait(ops, op.name)
    assert done.HasField("response"), done.error
    assert _metadata(done).class_image_status.ready == 12
    # the job used 12 images, so 12 were made (3 batches of 4): not the 1000 asked for
    assert [s[0] for s in gate.calls] == [0, 4, 8] and len(_pngs(cache)) == 12

    again = stub.PlanLearningJob(learner_pb2.PlanLearningJobRequest(job=request), timeout=PATIENCE)
    assert (again.class_image_status.ready, again.class_image_status.to_generate) == (12, 0)
    assert again.class_images_seconds == 0.0 and again.class_image_status.seconds_each > 0
    assert again.HasField("training_seconds") and again.training_seconds > 0

    # another prompt is not cached: its plan prices it at this learner's measured time, and so does the ETA
    other = _request(photo_png, prompt="a photo of a dog")
    priced = stub.PlanLearningJob(learner_pb2.PlanLearningJobRequest(job=other), timeout=PATIENCE)
    per_image = priced.class_image_status.seconds_each
    assert priced.class_image_status.to_generate == 12
    assert priced.class_images_seconds == pytest.approx(12 * per_image)
    gate.hold(0)
    op = stub.CreateLearningJob(other, timeout=PATIENCE)
    assert gate.held.wait(PATIENCE)
    md = _metadata(_get(ops, op.name))
    assert md.class_image_status.ready == 0 and md.eta_seconds >= 12 * md.class_image_status.seconds_each
    gate.open()
    assert _wait(ops, op.name).HasField("response")


def test_a_cancel_while_class_images_are_made_takes_effect_within_a_denoising_step_and_the_next_job_starts(
        learner, photo_png, monkeypatch):
    stub, ops, cache, _ = learner
    gate = Gate(monkeypatch)
    gate.hold(4)
    first = stub.CreateLearningJob(_request(photo_png, num_class_images=8), timeout=PATIENCE)
    second = stub.CreateLearningJob(_request(photo_png, num_class_images=8, phase1_steps=4, phase2_steps=2,
                                             refinement_steps=2), timeout=PATIENCE)  # 8 steps: it uses the 8 images
    assert gate.held.wait(PATIENCE)  # the first job made images 0-3 and holds before the pipeline call of 4-7
    ops.CancelOperation(operations_pb2.CancelOperationRequest(name=first.name), timeout=PATIENCE)
    assert _metadata(_get(ops, first.name)).cancel_requested
    made = _pngs(cache)
    gate.open()  # and stays open: the second job passes too
    cancelled = _wait(ops, first.name)
    assert cancelled.error.code == grpc.StatusCode.CANCELLED.value[0], cancelled.error
    md = _metadata(cancelled)
    assert md.step == 0 and md.phase == learner_pb2.PHASE_PREPARING
    # the call for images 4-7 had started: the cancel stopped it at its first denoising step, nothing was written
    assert gate.calls[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]] and made == [f"0000{n}.png" for n in range(4)]
    done = _wait(ops, second.name)  # the job queued behind it ran, keeping images 0-3 and making 4-7
    assert done.HasField("response"), done.error
    assert gate.calls[2:] == [[4, 5, 6, 7]] and len(_pngs(cache)) == 8


def test_the_cli_says_the_plan_before_the_job_and_few_class_images_scales_them(
        learner, photo_png, tmp_path, capsys):
    from client.cli import main

    _, ops, _, port = learner
    image = tmp_path / "photo.png"
    image.write_bytes(photo_png)
    w, h = Image.open(image).size
    mask = tmp_path / "mask.png"
    Image.fromarray((np.arange(w)[None, :].repeat(h, 0) < w // 2).astype(np.uint8) * 255).save(mask)
    base = ["learn", "start", str(image), "--concept", f"cup={mask}", "--learner", f"127.0.0.1:{port}",
            "--phase1-steps", "20", "--phase2-steps", "0", "--refinement-steps", "0", "--seed", "1"]
    assert main(base) == 0
    out = capsys.readouterr()
    job = out.out.strip()
    assert out.err.startswith("ice: learning job: 20 class images to generate (20 used, 2 denoising steps each;")
    assert "then 20 steps" in out.err
    ops.CancelOperation(operations_pb2.CancelOperationRequest(name=job.split("@")[0]), timeout=PATIENCE)
    _wait(ops, job.split("@")[0])

    assert main([*base, "--few-class-images", "--json"]) == 0  # one image per 10 steps: 2
    out = capsys.readouterr()
    assert out.err.startswith("ice: learning job: 2 class images")
    planned = json.loads(out.out)["plan"]
    assert planned["class_images"]["count"] == 2 and planned["total_steps"] == 20
    done = _wait(ops, json.loads(out.out)["job"].split("@")[0])
    assert done.HasField("response"), done.error
    assert _metadata(done).class_image_status.count == 2


def test_a_bundle_that_carries_its_class_images_is_never_made_to_generate_them(
        tiny_bundle_dir, photo_png, tmp_path, monkeypatch, capsys):
    from services.common.bundle import Bundle
    from services.common.bundle_cli import main as bundle_cli
    from services.learner.memory import MemoryEstimator

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle_dir)
    assert bundle_cli(["class-images", str(bundle_dir), "--count", "8", "--steps", "2", "--device", "cpu"]) == 0
    assert bundle_cli(["verify", str(bundle_dir)]) == 0
    assert "ok: class images (8 of 'a photo at the beach', 2 denoising steps)" in capsys.readouterr().out
    carried = Bundle.open(bundle_dir, verify_hashes=True)
    assert carried.digest != Bundle.open(tiny_bundle_dir).digest  # a new bundle version
    listed = sorted(r for r in carried.info["files"] if r.startswith("class_images/"))
    assert listed == sorted(["class_images/class_images.json"] + [f"class_images/0000{n}.png" for n in range(8)])
    assert not (bundle_dir / ".class_images.partial").exists()
    # the very images a learner would have made on the plain bundle (same diffusion weights, same seeds)
    reference = C.generate(C.plan(Bundle.open(tiny_bundle_dir), PROMPT, 8, tmp_path / "reference", 2),
                           lambda: Bundle.open(tiny_bundle_dir).load_diffusion("cpu"))
    for n, ref in enumerate(reference):
        assert hashlib.sha256((bundle_dir / "class_images" / f"0000{n}.png").read_bytes()).digest() == \
            hashlib.sha256(ref.read_bytes()).digest()

    def no_generation(*args, **kwargs):
        raise AssertionError("a class image was generated although the bundle carries it")

    monkeypatch.setattr(C, "make_batch", no_generation)
    running = start_inprocess("learner", bundle_dir, job_store=tmp_path / "store", class_image_steps=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub, ops = learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
            request = _request(photo_png, phase1_steps=4, phase2_steps=2, refinement_steps=2)  # uses 8
            plan = stub.PlanLearningJob(learner_pb2.PlanLearningJobRequest(job=request), timeout=PATIENCE)
            assert (plan.class_image_status.count, plan.class_image_status.to_generate, plan.class_image_status.source) == \
                (8, 0, "bundle")
            assert plan.class_images_seconds == 0.0
            done = _wait(ops, stub.CreateLearningJob(request, timeout=PATIENCE).name)
            assert done.HasField("response"), done.error
            assert _metadata(done).class_image_status.source == "bundle"
            longer = _request(photo_png, num_class_images=12)  # 12 steps, 12 used: 8 carried, 4 to make
            plan = stub.PlanLearningJob(learner_pb2.PlanLearningJobRequest(job=longer), timeout=PATIENCE)
            assert (plan.class_image_status.count, plan.class_image_status.to_generate, plan.class_image_status.source) == \
                (12, 4, "bundle+cache")
    finally:
        running.stop(grace=0)
    assert _pngs(tmp_path / "store" / "class-images") == []

    # the memory estimate counts class-image generation only for a job that generates
    estimator = MemoryEstimator(carried, "cpu", cache_file=tmp_path / "traces.json")
    spec_args = dict(phases=("object_level",), refinement="full", lora_rank=4, prior=True, tokens=5)
    generating = estimator.estimate(**spec_args, generates_class_images=True)
    taking = estimator.estimate(**spec_args, generates_class_images=False)
    assert "class-image generation" not in taking.parts and taking.total <= generating.total

    image = bundle_dir / "class_images" / "00003.png"
    image.write_bytes(image.read_bytes()[:-1] + b"\x00")  # one damaged class image
    assert bundle_cli(["verify", str(bundle_dir)]) == 1
    assert "class_images/00003.png" in capsys.readouterr().err
