"""The bad-input corpus against the real LearnerService (tiny bundle, one server and one short trained job for the
module): CreateLearningJob, Generate, GetArtifacts and WatchLearningJob get hostile images, masks, strings,
numbers, enums, names and oversized messages. Answers are INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the field,
NOT_FOUND for unknown jobs and files, FAILED_PRECONDITION for a job that did not succeed (as learner.proto
documents) — never INTERNAL or UNKNOWN — and the same RPC's good request succeeds right after. A hostile request
the server accepts (the contract allows it) must not leave a job behind: it is cancelled at once."""

from __future__ import annotations

import math
import time
import uuid

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

from ice.learner.v1 import learner_pb2 as pb
from ice.learner.v1 import learner_pb2_grpc
from tests.reliability.corpus import (
    INVALID,
    LENIENT,
    LONG_STRING,
    NON_UTF8,
    TRAVERSAL_NAMES,
    bad_images,
    bad_masks,
    corrupt_utf8,
    encode,
    mask_png,
    photo,
)
from tests.reliability.harness import (
    TEST_MAX_MESSAGE_BYTES,
    assert_refused_well,
    outcome,
    raw_unary,
    raw_unary_stream,
    start_inprocess,
)

SIZE = (96, 64)
IMAGE = encode(photo(*SIZE), "PNG")
MASK = mask_png(SIZE)
REQUEST_ID = str(uuid.UUID(int=0x1CE))
TINY = pb.Schedule(phase1_steps=1, phase2_steps=0, refinement_steps=0, num_class_images=0)
SERVICE = "/ice.learner.v1.LearnerService/"
NOT_FOUND = frozenset({"NOT_FOUND"})
PRECONDITION = frozenset({"FAILED_PRECONDITION"})
EXHAUSTED = frozenset({"RESOURCE_EXHAUSTED"})
ACCEPTED_OR_INVALID = LENIENT  # accepted jobs are cancelled by the test


def create(image=IMAGE, concepts=None, schedule=TINY, **kw) -> pb.CreateLearningJobRequest:
    concepts = [pb.ConceptInput(noun="cup", mask=MASK)] if concepts is None else concepts
    return pb.CreateLearningJobRequest(image=image, concepts=concepts, schedule=schedule, **kw)


GOOD_CREATE = create(seed=5, request_id=REQUEST_ID)  # the trained job's own request: idempotent, no new job


def _schedule(**fields) -> pb.Schedule:
    s = pb.Schedule()
    s.CopyFrom(TINY)
    for k, v in fields.items():
        setattr(s, k, v)
    return s


def _create_cases():
    cases = []
    for c in bad_images():
        cases.append((f"image/{c.name}", create(image=c.data), c.expect, "image"))
    for m in bad_masks(SIZE):
        cases.append((f"concepts[0].mask/{m.name}", create(concepts=[pb.ConceptInput(noun="cup", mask=m.data)]),
                      m.expect, "concepts[0].mask"))
    ranged = {"phase1_steps": (0, -1, 10_001, 2**31 - 1), "phase2_steps": (-1, 10_001),
              "refinement_steps": (-5, 10_001), "checkpoint_every": (-1, 10_001), "num_class_images": (-1, 5001),
              "embedding_learning_rate": (0.0, -1e-3, 1.5, math.nan, math.inf), "unet_learning_rate": (0.0, 2.0),
              "prior_loss_weight": (-1.0, 101.0, math.nan), "lambda_attention": (-1e-9, 1e9),
              "noise_offset": (-0.1, 1.01), "t_dist": (1.0, -0.5, math.nan), "reg_weight": (-1.0, math.inf),
              "reg_intrinsic_weight": (101.0,), "pos_neg_margin": (-1.0, 11.0)}
    for name, values in ranged.items():
        for v in values:
            cases.append((f"schedule.{name}={v}", create(schedule=_schedule(**{name: v})), INVALID,
                          f"schedule.{name}"))
    cases += [
        ("schedule.class_prompt/100_tokens", create(schedule=_schedule(class_prompt="cup " * 100)), INVALID,
         "schedule.class_prompt"),
        ("schedule/over_max_total_steps", create(schedule=_schedule(phase1_steps=10_000, phase2_steps=10_000,
                                                                     refinement_steps=10_000)), INVALID, "schedule"),
        ("ablation=99", create(ablation=99), INVALID, "ablation"),
        ("ablation=-1", create(ablation=-1), INVALID, "ablation"),
        ("refinement_delta=99", create(refinement_delta=99), INVALID, "refinement_delta"),
        ("lora_rank_without_lora", create(lora_rank=4), INVALID, "lora_rank"),
        ("lora_rank=0", create(lora_rank=0, refinement_delta=pb.REFINEMENT_DELTA_LORA), INVALID, "lora_rank"),
        ("lora_rank=129", create(lora_rank=129, refinement_delta=pb.REFINEMENT_DELTA_LORA), INVALID, "lora_rank"),
        ("request_id/not_a_uuid", create(request_id="../../jobs.sqlite"), INVALID, "request_id"),
        ("request_id/reused_for_another_request", create(seed=6, request_id=REQUEST_ID), {"ABORTED"}, None),
        ("no_concepts", create(concepts=[]), INVALID, "concepts"),
        ("17_concepts", create(concepts=[pb.ConceptInput(noun="cup", mask=MASK)] * 17), EXHAUSTED, None),
        ("noun/empty", create(concepts=[pb.ConceptInput(noun="  ", mask=MASK)]), INVALID, "concepts[0].noun"),
        ("noun/200k_chars", create(concepts=[pb.ConceptInput(noun=LONG_STRING, mask=MASK)]), ACCEPTED_OR_INVALID,
         "concepts[0].noun"),
        ("concept_id/200k_chars", create(concepts=[pb.ConceptInput(noun="cup", mask=MASK, concept_id=LONG_STRING)]),
         INVALID, "concepts[0].concept_id"),
        ("concept_id/traversal", create(concepts=[pb.ConceptInput(noun="cup", mask=MASK, concept_id="../../x")]),
         INVALID, "concepts[0].concept_id"),
        ("concept_id/nul", create(concepts=[pb.ConceptInput(noun="cup", mask=MASK, concept_id="c\x000")]),
         INVALID, "concepts[0].concept_id"),
        ("concept_id/repeated", create(concepts=[pb.ConceptInput(noun="cup", mask=MASK, concept_id="a")] * 2),
         INVALID, "concepts[1].concept_id"),
        ("intrinsic_anchors/5", create(intrinsic_anchors=["a", "b", "c", "d", "e"]), INVALID, "intrinsic_anchors"),
        ("intrinsic_anchors/empty_word", create(intrinsic_anchors=["texture", " "]), INVALID, "intrinsic_anchors"),
        ("intrinsic_anchors/repeated", create(intrinsic_anchors=["color", "color"]), INVALID, "intrinsic_anchors"),
        ("oversized_message", create(image=b"\0" * (TEST_MAX_MESSAGE_BYTES + 1024)), EXHAUSTED, None),
    ]
    return cases


def _raw_create_cases():
    return [
        ("noun/non_utf8", create(concepts=[pb.ConceptInput(noun=NON_UTF8, mask=MASK)])),
        ("concept_id/non_utf8", create(concepts=[pb.ConceptInput(noun="cup", mask=MASK, concept_id=NON_UTF8)])),
        ("intrinsic_anchors/non_utf8", create(intrinsic_anchors=[NON_UTF8])),
        ("request_id/non_utf8", create(request_id=NON_UTF8)),
        ("class_prompt/non_utf8", create(schedule=_schedule(class_prompt=NON_UTF8))),
    ]


CREATE_CASES = _create_cases()
RAW_CREATE_CASES = _raw_create_cases()


@pytest.fixture(scope="module")
def learner(tiny_bundle_dir, tmp_path_factory):
    running = start_inprocess("learner", tiny_bundle_dir, job_store=tmp_path_factory.mktemp("jobs"),
                              class_image_steps=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub, ops = learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
    trained = stub.CreateLearningJob(GOOD_CREATE, timeout=60)
    deadline = time.monotonic() + 240
    while not trained.done:
        assert time.monotonic() < deadline, "the tiny job did not finish"
        trained = ops.WaitOperation(operations_pb2.WaitOperationRequest(
            name=trained.name, timeout=duration_pb2.Duration(seconds=20)), timeout=30)
    assert trained.HasField("response"), trained.error
    cancelled = stub.CreateLearningJob(create(schedule=_schedule(phase1_steps=5000)), timeout=60)
    ops.CancelOperation(operations_pb2.CancelOperationRequest(name=cancelled.name), timeout=10)
    cancelled = ops.WaitOperation(operations_pb2.WaitOperationRequest(
        name=cancelled.name, timeout=duration_pb2.Duration(seconds=30)), timeout=40)
    assert cancelled.done and not cancelled.HasField("response")
    yield {"stub": stub, "ops": ops, "channel": channel, "job": trained.name, "cancelled": cancelled.name,
           "running": running}
    channel.close()
    running.stop(grace=0)


def _no_job_left_behind(env, result) -> None:
    """An accepted hostile request must not occupy the runner: cancel what it created."""
    if result.code == "OK" and result.value is not None and result.value.name != env["job"]:
        env["ops"].CancelOperation(operations_pb2.CancelOperationRequest(name=result.value.name), timeout=10)


def _good(env, rpc: str):
    stub, job = env["stub"], env["job"]
    calls = {
        "CreateLearningJob": lambda: stub.CreateLearningJob(GOOD_CREATE, timeout=60),
        "Generate": lambda: stub.Generate(pb.GenerateRequest(name=job, num_images=1, num_inference_steps=1, seed=1),
                                          timeout=60),
        "GetArtifacts": lambda: stub.GetArtifacts(pb.GetArtifactsRequest(name=job), timeout=60),
        "WatchLearningJob": lambda: stub.WatchLearningJob(pb.WatchLearningJobRequest(name=job), timeout=60),
    }
    result = outcome(calls[rpc])
    assert result.code == "OK", f"the good {rpc} request failed: {result}"
    if rpc == "CreateLearningJob":
        assert result.value.name == job  # idempotent: no second job


@pytest.mark.parametrize("name,request_,expect,field", CREATE_CASES, ids=[c[0] for c in CREATE_CASES])
def test_create_refuses_bad_input(learner, name, request_, expect, field):
    result = outcome(lambda: learner["stub"].CreateLearningJob(request_, timeout=60))
    _no_job_left_behind(learner, result)
    assert_refused_well(result, expect, field)
    _good(learner, "CreateLearningJob")


@pytest.mark.parametrize("name,request_", RAW_CREATE_CASES, ids=[c[0] for c in RAW_CREATE_CASES])
def test_create_refuses_strings_that_are_not_utf8(learner, name, request_):
    wire = corrupt_utf8(request_.SerializeToString())
    result = outcome(lambda: raw_unary(learner["channel"], SERVICE + "CreateLearningJob")(wire, timeout=60))
    assert_refused_well(result, INVALID)
    _good(learner, "CreateLearningJob")


def _generate_cases(job: str):
    g = pb.GenerateRequest
    free = pb.PROMPT_KIND_FREE
    return [
        ("kind=99", g(name=job, kind=99), INVALID, "kind"),
        ("kind=-3", g(name=job, kind=-3), INVALID, "kind"),
        ("free_without_prompts", g(name=job, kind=free), INVALID, "prompts"),
        ("prompts_with_object_level", g(name=job, kind=pb.PROMPT_KIND_OBJECT_LEVEL, prompts=["a"]), INVALID,
         "prompts"),
        ("17_prompts", g(name=job, kind=free, prompts=["a photo"] * 17, num_images=1), INVALID, "prompts"),
        ("prompt_over_77_tokens", g(name=job, kind=free, prompts=["cup " * 100], num_images=1), INVALID,
         "prompts[0]"),
        ("prompt_200k_chars", g(name=job, kind=free, prompts=[LONG_STRING], num_images=1), INVALID, "prompts[0]"),
        ("concept_ids_unknown", g(name=job, concept_ids=["c9"]), INVALID, "concept_ids"),
        ("concept_ids_traversal", g(name=job, concept_ids=["../c0"]), INVALID, "concept_ids"),
        *[(f"num_images={v}", g(name=job, num_images=v), INVALID, "num_images") for v in (0, -1, 65, 2**31 - 1)],
        *[(f"num_inference_steps={v}", g(name=job, num_inference_steps=v), INVALID, "num_inference_steps")
          for v in (0, -10, 201)],
        *[(f"guidance_scale={v}", g(name=job, guidance_scale=v), INVALID, "guidance_scale")
          for v in (-0.5, 50.5, math.nan, math.inf, -math.inf)],
        ("unknown_job", g(name="operations/" + "0" * 32), NOT_FOUND, None),
        ("malformed_name", g(name="jobs/1"), INVALID, "name"),
    ]


def _artifact_cases(job: str):
    a = pb.GetArtifactsRequest
    return [
        *[(f"files={n!r}", a(name=job, files=[n]), NOT_FOUND, None) for n in TRAVERSAL_NAMES],
        ("files=absolute_path_of_a_real_artifact", a(name=job, files=["/learned_embeds.safetensors"]), NOT_FOUND,
         None),
        ("files=jobs.sqlite", a(name=job, files=["../../../jobs.sqlite"]), NOT_FOUND, None),
        ("files=input_image", a(name=job, files=["../input/image.png"]), NOT_FOUND, None),
        ("files=200k_chars", a(name=job, files=[LONG_STRING]), NOT_FOUND, None),
        ("unknown_job", a(name="operations/" + "f" * 32), NOT_FOUND, None),
        ("malformed_name", a(name="operations/../../etc"), INVALID, "name"),
    ]


def _watch_cases():
    w = pb.WatchLearningJobRequest
    return [
        ("unknown_job", w(name="operations/" + "e" * 32), NOT_FOUND, None),
        ("empty_name", w(name=""), INVALID, "name"),
        ("malformed_name", w(name="operations/" + "z" * 32), INVALID, "name"),
        ("200k_name", w(name=LONG_STRING), INVALID, "name"),
    ]


STREAM_CASES = (
    [("Generate", *c) for c in _generate_cases("{job}")]
    + [("GetArtifacts", *c) for c in _artifact_cases("{job}")]
    + [("WatchLearningJob", *c) for c in _watch_cases()]
)


def _with_job(request, job: str):
    if "{job}" in request.name:
        request = type(request).FromString(request.SerializeToString())
        request.name = job
    return request


@pytest.mark.parametrize("rpc,name,request_,expect,field", STREAM_CASES,
                         ids=[f"{c[0]}:{c[1]}" for c in STREAM_CASES])
def test_streaming_rpcs_refuse_bad_input(learner, rpc, name, request_, expect, field):
    request_ = _with_job(request_, learner["job"])
    result = outcome(lambda: getattr(learner["stub"], rpc)(request_, timeout=60))
    assert_refused_well(result, expect, field)
    _good(learner, rpc)


@pytest.mark.parametrize("rpc", ["Generate", "GetArtifacts"])
def test_a_job_that_did_not_succeed_is_failed_precondition(learner, rpc):
    request_ = (pb.GenerateRequest(name=learner["cancelled"], num_images=1) if rpc == "Generate"
                else pb.GetArtifactsRequest(name=learner["cancelled"]))
    assert_refused_well(outcome(lambda: getattr(learner["stub"], rpc)(request_, timeout=60)), PRECONDITION)
    _good(learner, rpc)


@pytest.mark.parametrize("rpc,message", [
    ("Generate", lambda job: pb.GenerateRequest(name=job, kind=pb.PROMPT_KIND_FREE, prompts=[NON_UTF8])),
    ("Generate", lambda job: pb.GenerateRequest(name=job, concept_ids=[NON_UTF8])),
    ("GetArtifacts", lambda job: pb.GetArtifactsRequest(name=job, files=[NON_UTF8])),
    ("WatchLearningJob", lambda job: pb.WatchLearningJobRequest(name="operations/" + NON_UTF8)),
], ids=["Generate:prompts", "Generate:concept_ids", "GetArtifacts:files", "WatchLearningJob:name"])
def test_streaming_rpcs_refuse_strings_that_are_not_utf8(learner, rpc, message):
    wire = corrupt_utf8(message(learner["job"]).SerializeToString())
    result = outcome(lambda: raw_unary_stream(learner["channel"], SERVICE + rpc)(wire, timeout=60))
    assert_refused_well(result, INVALID)
    _good(learner, rpc)


def test_no_hostile_request_left_a_job_running(learner):
    ops = learner["ops"]
    listed = ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations", page_size=1000), timeout=10)
    pending = [op.name for op in listed.operations if not op.done]
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:  # cancellations take effect within a step
        time.sleep(0.5)
        listed = ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations", page_size=1000),
                                    timeout=10)
        pending = [op.name for op in listed.operations if not op.done]
    assert not pending, pending
