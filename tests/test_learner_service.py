"""The learner through real gRPC on loopback: a job runs to success (watch, operations, artifacts, generate),
invalid inputs name their field, cancellation, idempotent creation, the queue limit; and durability: a learner
process killed with SIGKILL mid-run resumes and ends with the same embeddings as an uninterrupted run."""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from safetensors.torch import load as load_safetensors

from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from services.common.images import encode_mask
from services.common.server import start_server
from services.common.settings import LearnerSettings, from_sources
from services.learner.jobs import load_inputs
from services.learner.server import build_spec
from services.learner.trainer import Trainer
from tests.reliability.harness import PATIENCE

ROOT = Path(__file__).resolve().parents[1]
SHORT = learner_pb2.Schedule(phase1_steps=6, phase2_steps=6, refinement_steps=4, num_class_images=2)
LONG = learner_pb2.Schedule(phase1_steps=2000, phase2_steps=0, refinement_steps=0, num_class_images=0)


def _request(photo_png, schedule=SHORT, **kw) -> learner_pb2.CreateLearningJobRequest:
    w, h = Image.open(io.BytesIO(photo_png)).size
    mask = np.zeros((h, w), bool)
    mask[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = True
    concepts = [learner_pb2.ConceptInput(noun="cup", mask=encode_mask(mask)),
                learner_pb2.ConceptInput(noun="table", mask=encode_mask(~mask))]
    return learner_pb2.CreateLearningJobRequest(image=photo_png, concepts=concepts, schedule=schedule, **kw)


def _field_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            return br.field_violations[0].field
    return ""


@pytest.fixture(scope="module")
def learner(tiny_bundle_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("jobs")
    settings = from_sources(env={}, cls=LearnerSettings, host="127.0.0.1", port=-1, metrics_port=0,
                            bundle=Path(tiny_bundle_dir), job_store=store, queue_size=1, class_image_steps=2,
                            max_total_steps=5000)
    running = start_server(build_spec(settings), settings)
    assert running.wait_ready(60)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(channel), store
    channel.close()
    running.stop(grace=0)


def _metadata(op) -> learner_pb2.LearningJobMetadata:
    md = learner_pb2.LearningJobMetadata()
    assert op.metadata.Unpack(md)
    return md


def _wait(ops, name, timeout=240) -> operations_pb2.Operation:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op = ops.WaitOperation(operations_pb2.WaitOperationRequest(
            name=name, timeout=duration_pb2.Duration(seconds=20)), timeout=30)
        if op.done:
            return op
    raise AssertionError(f"{name} did not finish")


def test_job_runs_to_success_with_progress_artifacts_and_generation(learner, photo_png):
    stub, ops, _ = learner
    rid = str(uuid.uuid4())
    op = stub.CreateLearningJob(_request(photo_png, seed=3, request_id=rid), timeout=30)
    assert op.name.startswith("operations/") and not op.done
    assert _metadata(op).total_steps == 16
    # the same request_id and request: the same operation; a different request: ABORTED
    assert stub.CreateLearningJob(_request(photo_png, seed=3, request_id=rid), timeout=30).name == op.name
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateLearningJob(_request(photo_png, seed=4, request_id=rid), timeout=30)
    assert e.value.code() == grpc.StatusCode.ABORTED

    phases, steps, last = [], [], None
    for msg in stub.WatchLearningJob(learner_pb2.WatchLearningJobRequest(name=op.name), timeout=240):
        phases.append(msg.metadata.phase)
        steps.append(msg.metadata.step)
        last = msg
    assert last.done and last.metadata.state == learner_pb2.JOB_STATE_SUCCEEDED and last.metadata.percent == 100
    assert steps == sorted(steps) and steps[-1] == 16
    for phase in (learner_pb2.PHASE_OBJECT_LEVEL, learner_pb2.PHASE_INTRINSIC, learner_pb2.PHASE_REFINEMENT):
        assert phase in phases
    assert set(last.metadata.losses) >= {"total", "reconstruction", "prior", "triplet", "attention"}
    result = last.response
    assert [t.token for t in result.tokens[:5]] == ["<*0>", "<&0>", "<#0>", "<%0>", "<$0>"]
    assert result.tokens[2].role == learner_pb2.TOKEN_ROLE_INTRINSIC and result.tokens[2].attribute == "texture"

    done = ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    assert done.done and done.HasField("response")
    listed = ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), timeout=10)
    assert op.name in [o.name for o in listed.operations]

    files: dict[str, bytearray] = {}
    digests = {}
    for chunk in stub.GetArtifacts(learner_pb2.GetArtifactsRequest(name=op.name), timeout=30):
        files.setdefault(chunk.file_name, bytearray()).extend(chunk.chunk)
        if chunk.last_chunk:
            digests[chunk.file_name] = chunk.sha256
    assert {"learned_embeds.safetensors", "manifest.json", "unet_delta.safetensors"} <= set(files)
    for name, data in files.items():
        assert hashlib.sha256(data).hexdigest() == digests[name]
    embeds = load_safetensors(bytes(files["learned_embeds.safetensors"]))
    assert set(embeds) == {t.token for t in result.tokens}

    images = list(stub.Generate(learner_pb2.GenerateRequest(
        name=op.name, kind=learner_pb2.PROMPT_KIND_INTRINSIC, concept_ids=["c0"], num_images=1,
        num_inference_steps=2, seed=5), timeout=120))
    assert [m.prompt for m in images] == ["a <#0> texture", "a <%0> material", "a <$0> color", "a <&0>"]
    assert Image.open(io.BytesIO(images[0].image)).size == (64, 64) and images[0].seed == 5
    free = list(stub.Generate(learner_pb2.GenerateRequest(
        name=op.name, prompts=["a photo of <&1> in the snow"], num_images=2, num_inference_steps=2, seed=9),
        timeout=120))
    assert [m.seed for m in free] == [9, 10] and free[0].image != free[1].image


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.concepts[0].__setattr__("mask", encode_mask(np.ones((10, 12), bool))), "concepts[0].mask"),
        (lambda r: r.ClearField("concepts"), "concepts"),
        (lambda r: r.schedule.__setattr__("phase1_steps", 0), "schedule.phase1_steps"),
        (lambda r: r.schedule.__setattr__("phase2_steps", -3), "schedule.phase2_steps"),
        (lambda r: (r.schedule.__setattr__("phase1_steps", 3000), r.schedule.__setattr__("phase2_steps", 3000)),
         "schedule"),
        (lambda r: r.__setattr__("ablation", 42), "ablation"),
        (lambda r: r.__setattr__("refinement_delta", 9), "refinement_delta"),
        (lambda r: r.__setattr__("lora_rank", 4), "lora_rank"),
        (lambda r: r.__setattr__("request_id", "not-a-uuid"), "request_id"),
        (lambda r: r.intrinsic_anchors.extend(["a", "a"]), "intrinsic_anchors"),
        (lambda r: r.concepts[1].__setattr__("noun", ""), "concepts[1].noun"),
    ],
)
def test_invalid_requests_name_their_field(learner, photo_png, mutate, field):
    stub, _, _ = learner
    request = _request(photo_png)
    mutate(request)
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateLearningJob(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field_of(e.value) == field


def test_unknown_and_malformed_operation_names(learner):
    stub, ops, _ = learner
    with pytest.raises(grpc.RpcError) as e:
        ops.GetOperation(operations_pb2.GetOperationRequest(name="operations/" + "0" * 32), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        list(stub.WatchLearningJob(learner_pb2.WatchLearningJobRequest(name="jobs/x"), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_queue_limit_and_cancellation(learner, photo_png):
    stub, ops, _ = learner
    running = stub.CreateLearningJob(_request(photo_png, schedule=LONG), timeout=30)
    deadline = time.monotonic() + 60
    while _metadata(ops.GetOperation(operations_pb2.GetOperationRequest(name=running.name))).step < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    queued = stub.CreateLearningJob(_request(photo_png, schedule=LONG), timeout=30)
    assert _metadata(queued).state == learner_pb2.JOB_STATE_QUEUED and _metadata(queued).queue_position == 0
    with pytest.raises(grpc.RpcError) as e:  # queue_size = 1
        stub.CreateLearningJob(_request(photo_png, schedule=LONG), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    ops.CancelOperation(operations_pb2.CancelOperationRequest(name=queued.name), timeout=10)
    step_at_cancel = _metadata(ops.GetOperation(operations_pb2.GetOperationRequest(name=running.name))).step
    ops.CancelOperation(operations_pb2.CancelOperationRequest(name=running.name), timeout=10)
    for name in (queued.name, running.name):
        op = _wait(ops, name, timeout=30)
        assert op.error.code == code_pb2.CANCELLED
    # cancellation took effect within a step or two of the request, far from the 2000 scheduled
    assert _metadata(op).step <= step_at_cancel + 2
    ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=queued.name), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        ops.GetOperation(operations_pb2.GetOperationRequest(name=queued.name), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# -- the paper's ablations, through the service ---------------------------------------------------------------------

# one step per token phase at a vanishing learning rate: the learned tokens are where each ablation starts them
STILL = learner_pb2.Schedule(phase1_steps=1, phase2_steps=1, refinement_steps=0, num_class_images=0,
                             embedding_learning_rate=1e-9)


def _learned(stub, ops, photo_png, ablation, seed=3, schedule=STILL):
    op = stub.CreateLearningJob(_request(photo_png, schedule=schedule, ablation=ablation, seed=seed), timeout=60)
    created = _metadata(op)
    phases = {m.metadata.phase for m in stub.WatchLearningJob(learner_pb2.WatchLearningJobRequest(name=op.name),
                                                               timeout=PATIENCE)}
    done = _wait(ops, op.name, timeout=PATIENCE)
    assert done.HasField("response"), done.error
    files = {c.file_name for c in stub.GetArtifacts(learner_pb2.GetArtifactsRequest(name=op.name), timeout=60)}
    data = b"".join(c.chunk for c in stub.GetArtifacts(learner_pb2.GetArtifactsRequest(
        name=op.name, files=["learned_embeds.safetensors"]), timeout=60))
    response = learner_pb2.LearningJobResult()
    done.response.Unpack(response)
    return {"tokens": [t.token for t in response.tokens], "embeds": load_safetensors(data), "files": files,
            "total_steps": created.total_steps, "phases": phases}


@pytest.fixture(scope="module")
def word_rows(tiny_bundle):
    """The bundle's token embedding table and the first BPE row of a word."""
    pipe = tiny_bundle.load_diffusion("cpu", torch.float32)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    return table, lambda word: pipe.tokenizer(word, add_special_tokens=False).input_ids[0]


def _row_of(table: torch.Tensor, vector: torch.Tensor) -> int:
    """The row of the table the vector is (to 1e-6), or -1."""
    distance = (table - vector).abs().max(dim=1).values
    row = int(distance.argmin())
    return row if float(distance[row]) <= 1e-6 else -1


def test_ablations_start_the_tokens_where_the_paper_says_and_drop_stage_two(learner, photo_png, word_rows):
    stub, ops, _ = learner
    table, first_row = word_rows
    cup, table_word, generic = first_row("cup"), first_row("table"), first_row("object")
    assert len({cup, table_word, generic}) == 3

    full = _learned(stub, ops, photo_png, learner_pb2.ABLATION_NONE)
    assert full["tokens"][:5] == ["<*0>", "<&0>", "<#0>", "<%0>", "<$0>"]  # intrinsic tokens exist
    for concept, row in ((0, cup), (1, table_word)):  # no ablation: both tokens start at the concept's noun
        assert _row_of(table, full["embeds"][f"<*{concept}>"]) == row
        assert _row_of(table, full["embeds"][f"<&{concept}>"]) == row

    mask_only = _learned(stub, ops, photo_png, learner_pb2.ABLATION_MASK_ONLY)
    assert mask_only["tokens"] == full["tokens"]
    for token in ("<*0>", "<&0>", "<*1>", "<&1>"):  # the generic word "object" instead of each noun
        assert _row_of(table, mask_only["embeds"][token]) == generic, token

    rows = []
    for seed in (3, 4):
        no_init = _learned(stub, ops, photo_png, learner_pb2.ABLATION_WITHOUT_TEXT_INIT, seed=seed)
        found = [_row_of(table, no_init["embeds"][t]) for t in ("<*0>", "<&0>", "<*1>", "<&1>")]
        assert all(r >= 0 for r in found), found  # each starts at a row of the vocabulary ...
        assert cup not in found[:2] and table_word not in found[2:], found  # ... not at its noun
        rows.append(found)
    assert rows[0] != rows[1]  # random rows: another seed draws others

    schedule = learner_pb2.Schedule(phase1_steps=2, phase2_steps=2, refinement_steps=1, num_class_images=0)
    stage_one = _learned(stub, ops, photo_png, learner_pb2.ABLATION_WITHOUT_STAGE_TWO, schedule=schedule)
    assert stage_one["tokens"] == ["<*0>", "<&0>", "<*1>", "<&1>"]  # no intrinsic tokens
    assert stage_one["total_steps"] == 2  # phase 1 only: phase 2 and refinement are dropped
    assert learner_pb2.PHASE_INTRINSIC not in stage_one["phases"]
    assert learner_pb2.PHASE_REFINEMENT not in stage_one["phases"]
    assert "unet_delta.safetensors" not in stage_one["files"] and "learned_embeds.safetensors" in stage_one["files"]
    assert _row_of(table, stage_one["embeds"]["<*0>"]) == -1  # it did learn (the default rate) in phase 1


def test_a_running_job_cannot_be_deleted_until_it_has_ended(learner, photo_png):
    stub, ops, store = learner
    op = stub.CreateLearningJob(_request(photo_png, schedule=LONG), timeout=60)
    job_dir = store / "jobs" / op.name.split("/")[1]

    def step() -> int:
        return _metadata(ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=30)).step

    deadline = time.monotonic() + PATIENCE
    while step() < 1:
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as e:
        ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cancel it before deleting it" in e.value.details()
    at_refusal = step()
    deadline = time.monotonic() + PATIENCE
    while step() <= at_refusal:  # untouched: it keeps training, its folder is there
        assert time.monotonic() < deadline, "the refused delete stopped the job"
        time.sleep(0.05)
    assert (job_dir / "input" / "spec.json").is_file()
    ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=30)
    assert _wait(ops, op.name, timeout=120).error.code == code_pb2.CANCELLED
    ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name), timeout=30)
    with pytest.raises(grpc.RpcError) as e:
        ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert not job_dir.exists()
    assert op.name not in [o.name for o in ops.ListOperations(operations_pb2.ListOperationsRequest(
        name="operations"), timeout=30).operations]


def test_resume_jobs_false_fails_the_interrupted_job_instead_of_resuming_it(tiny_bundle_dir, photo_png, tmp_path):
    def start(resume: bool):
        settings = from_sources(env={}, cls=LearnerSettings, host="127.0.0.1", port=-1, metrics_port=0,
                                bundle=Path(tiny_bundle_dir), job_store=tmp_path / "store", class_image_steps=2,
                                resume_jobs=resume)
        running = start_server(build_spec(settings), settings)
        assert running.wait_ready(PATIENCE), running.load_error
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        return running, channel, learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(
            channel)

    running, channel, stub, ops = start(True)
    try:
        op = stub.CreateLearningJob(_request(photo_png, schedule=LONG), timeout=60)
        deadline = time.monotonic() + PATIENCE
        while _metadata(ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=30)).step < 2:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.05)
    finally:
        channel.close()
        running.stop(grace=0)  # the job is interrupted while running, resumable
    running, channel, stub, ops = start(False)
    try:
        done = ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=30)
        assert done.done and done.error.code == code_pb2.ABORTED
        assert done.error.message == "interrupted by a server restart (resume_jobs is off)"
        md = _metadata(done)
        assert md.state == learner_pb2.JOB_STATE_FAILED
        step = md.step
        later = stub.CreateLearningJob(_request(photo_png, schedule=SHORT), timeout=60)  # the runner is free
        assert _wait(ops, later.name, timeout=PATIENCE).HasField("response")
        assert _metadata(ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=30)).step == step
    finally:
        channel.close()
        running.stop(grace=0)


# -- durability ----------------------------------------------------------------------------------------------------


def _spawn(bundle, store, log_path, gate=None):
    from tests.reliability.harness import ServiceProcess

    proc = ServiceProcess("learner", bundle, log_path, args=["--job-store", str(store), "--class-image-steps", "2"],
                          gate=gate)
    proc.wait_ready()
    return proc, learner_pb2_grpc.LearnerServiceStub(proc.channel), operations_pb2_grpc.OperationsStub(proc.channel)


def test_sigkilled_learner_resumes_and_matches_an_uninterrupted_run(tiny_bundle, tiny_bundle_dir, photo_png,
                                                                     tmp_path):
    store, log_path = tmp_path / "store", tmp_path / "learner.log"
    schedule = learner_pb2.Schedule(phase1_steps=14, phase2_steps=6, refinement_steps=4, num_class_images=2,
                                    checkpoint_every=4)
    gate = tmp_path / "gate"  # the job's 6th step waits at a gate (tests/reliability/gated.py): killed there
    gate.mkdir()
    (gate / "closed").touch()
    (gate / "hold-at").write_text("5")
    proc, stub, ops = _spawn(tiny_bundle_dir, store, log_path, gate)
    try:
        op = stub.CreateLearningJob(_request(photo_png, schedule=schedule, seed=21), timeout=60)
        job_dir = store / "jobs" / op.name.split("/")[1]
        deadline = time.monotonic() + PATIENCE
        while not (gate / "held-5").exists():
            assert proc.proc.poll() is None and time.monotonic() < deadline, "the job did not reach its 6th step"
            time.sleep(0.05)
    finally:
        proc.kill()
    assert sorted(p.name for p in (job_dir / "checkpoints").glob("step-*")) == ["step-0000004"]
    proc, stub, ops = _spawn(tiny_bundle_dir, store, log_path)
    try:
        done = _wait(ops, op.name, timeout=PATIENCE)
        assert done.HasField("response"), done.error
        data = b"".join(c.chunk for c in stub.GetArtifacts(learner_pb2.GetArtifactsRequest(
            name=op.name, files=["learned_embeds.safetensors"]), timeout=60))
    finally:
        assert proc.stop() == 0
    assert "resuming at step 4 " in proc.log_text()
    resumed = load_safetensors(data)

    # the same job, uninterrupted, in this process
    spec = load_inputs(job_dir / "input")
    result = Trainer(tiny_bundle, spec, tmp_path / "reference", class_images_dir=store / "class-images",
                     class_image_steps=2).run()
    assert set(resumed) == set(result.embeddings)
    for token in resumed:  # bit-identical, not merely close
        assert torch.equal(resumed[token], result.embeddings[token]), (
            token, float((resumed[token] - result.embeddings[token]).abs().max()))
    assert not torch.equal(resumed["<&0>"], resumed["<*0>"])
