"""The learner's gRPC servicers: `ice.learner.v1.LearnerService` and `google.longrunning.Operations`.

Decode and validate requests, estimate each job's memory (`memory.MemoryEstimator`) and refuse one that cannot
fit, hand jobs to `JobManager`, encode records as operations. No training math here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import secrets
import threading
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2
from google.rpc import code_pb2, status_pb2

from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from services.common.bundle import Bundle
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.images import (
    center_crop_box,
    center_crop_resize,
    decode_image,
    decode_mask,
    encode_png,
    resize_mask,
)
from services.common.interceptors import call_active, iter_with_context_check
from services.common.server import ServiceSpec
from services.common.service import (
    bundle_info,
    compute_dtype,
    precision_name,
    resolve_device,
    server_info,
    server_version,
)
from services.common.settings import LearnerSettings
from services.common.tracing import tracer
from services.learner import generate as G
from services.learner import library_rpc
from services.learner.artifacts import ArtifactFile, read_manifest
from services.learner.jobs import (
    CANCELLED,
    FAILED,
    QUEUED,
    SUCCEEDED,
    JobManager,
    JobRecord,
    artifact_files,
    class_images_info,
)
from services.learner.library import Library, Publisher
from services.learner.memory import MemoryEstimate, MemoryEstimator, gib, memory_for_jobs
from services.learner.tokens import DEFAULT_ANCHORS, by_concept
from services.learner.trainer import (
    FINISHING,
    INTRINSIC_PHASE,
    OBJECT_LEVEL,
    PREPARING,
    REFINEMENT,
    Concept,
    LearningSpec,
    Schedule,
)

log = logging.getLogger("ice.learner")

SERVICE = "ice.learner.v1.LearnerService"
TRACER = tracer("learner")
OPERATIONS = "google.longrunning.Operations"
CHUNK = 1 << 20
_CONCEPT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STATE = {QUEUED: learner_pb2.JOB_STATE_QUEUED, "running": learner_pb2.JOB_STATE_RUNNING,
          SUCCEEDED: learner_pb2.JOB_STATE_SUCCEEDED, FAILED: learner_pb2.JOB_STATE_FAILED,
          CANCELLED: learner_pb2.JOB_STATE_CANCELLED}
_PHASE = {"": learner_pb2.PHASE_UNSPECIFIED, PREPARING: learner_pb2.PHASE_PREPARING,
          OBJECT_LEVEL: learner_pb2.PHASE_OBJECT_LEVEL, INTRINSIC_PHASE: learner_pb2.PHASE_INTRINSIC,
          REFINEMENT: learner_pb2.PHASE_REFINEMENT, FINISHING: learner_pb2.PHASE_FINISHING}
_ROLE = {"instance": learner_pb2.TOKEN_ROLE_INSTANCE, "concept": learner_pb2.TOKEN_ROLE_CONCEPT,
         "intrinsic": learner_pb2.TOKEN_ROLE_INTRINSIC}
_ABLATION = {learner_pb2.ABLATION_UNSPECIFIED: "none", learner_pb2.ABLATION_NONE: "none",
             learner_pb2.ABLATION_MASK_ONLY: "mask_only",
             learner_pb2.ABLATION_WITHOUT_STAGE_TWO: "without_stage_two",
             learner_pb2.ABLATION_WITHOUT_TEXT_INIT: "without_text_init"}
_DELTA = {learner_pb2.REFINEMENT_DELTA_UNSPECIFIED: "full", learner_pb2.REFINEMENT_DELTA_FULL: "full",
          learner_pb2.REFINEMENT_DELTA_LORA: "lora"}
# Schedule fields: (low, high, low inclusive, high inclusive)
_RANGES = {
    "phase1_steps": (1, 10_000, True, True), "phase2_steps": (0, 10_000, True, True),
    "refinement_steps": (0, 10_000, True, True), "embedding_learning_rate": (0, 1, False, True),
    "unet_learning_rate": (0, 1, False, True), "checkpoint_every": (0, 10_000, True, True),
    "num_class_images": (0, 5000, True, True), "prior_loss_weight": (0, 100, True, True),
    "lambda_attention": (0, 100, True, True), "noise_offset": (0, 1, True, True), "t_dist": (0, 1, True, False),
    "reg_weight": (0, 100, True, True), "reg_intrinsic_weight": (0, 100, True, True),
    "pos_neg_margin": (0, 10, True, True),
}


def _in_range(value, low, high, low_inc, high_inc) -> bool:
    return (value >= low if low_inc else value > low) and (value <= high if high_inc else value < high)


def _enum(value: int, mapping: dict, field: str):
    if value not in mapping:
        raise InvalidArgument(f"unknown value {value}", field=field)
    return mapping[value]


def job_id_from_name(name: str, field: str = "name") -> str:
    prefix = "operations/"
    if not name.startswith(prefix) or not re.fullmatch(r"[0-9a-f]{32}", name[len(prefix):]):
        raise InvalidArgument(f"expected 'operations/{{job_id}}', got {name!r}", field=field)
    return name[len(prefix):]


def request_digest(request: learner_pb2.CreateLearningJobRequest) -> str:
    """SHA-256 of the request without its request_id: what a repeated request_id must match."""
    copy = learner_pb2.CreateLearningJobRequest()
    copy.CopyFrom(request)
    copy.request_id = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def parse_schedule(msg: learner_pb2.Schedule, settings: LearnerSettings, tokenizer,
                   defaults: Schedule | None = None) -> Schedule:
    """Validate the set fields; the unset ones come from `defaults` (the published schedule, or the bundle's)."""
    values = {}
    defaults = defaults or Schedule(checkpoint_every=settings.checkpoint_every)
    for f in fields(Schedule):
        if not msg.HasField(f.name):
            values[f.name] = getattr(defaults, f.name)
            continue
        value = getattr(msg, f.name)
        if f.name in _RANGES and not _in_range(value, *_RANGES[f.name]):
            low, high, li, hi = _RANGES[f.name]
            raise InvalidArgument(f"{value} is outside {'[' if li else '('}{low}, {high}{']' if hi else ')'}",
                                  field=f"schedule.{f.name}")
        values[f.name] = value
    if _token_count(tokenizer, values["class_prompt"]) > tokenizer.model_max_length:
        raise InvalidArgument(f"longer than {tokenizer.model_max_length} tokens", field="schedule.class_prompt")
    return Schedule(**values)


def parse_request(request: learner_pb2.CreateLearningJobRequest, bundle, settings: LearnerSettings) -> LearningSpec:
    """The request as a `LearningSpec` on the training square; InvalidArgument naming the field otherwise."""
    if request.request_id:
        try:
            uuid.UUID(request.request_id)
        except ValueError:
            raise InvalidArgument("must be a UUID", field="request_id") from None
    ablation = _enum(request.ablation, _ABLATION, "ablation")
    delta = _enum(request.refinement_delta, _DELTA, "refinement_delta")
    lora_rank = 4
    if request.HasField("lora_rank"):
        if delta != "lora":
            raise InvalidArgument("only allowed with REFINEMENT_DELTA_LORA", field="lora_rank")
        if not 1 <= request.lora_rank <= 128:
            raise InvalidArgument(f"{request.lora_rank} is outside [1, 128]", field="lora_rank")
        lora_rank = request.lora_rank
    if not request.concepts:
        raise InvalidArgument("at least one concept is required", field="concepts")
    if len(request.concepts) > settings.max_concepts:
        raise ResourceExhausted(f"{len(request.concepts)} concepts exceed the limit of {settings.max_concepts}",
                                field="concepts")
    tokenizer = bundle.tokenizer()
    schedule = parse_schedule(request.schedule, settings, tokenizer, bundle.recommended_defaults(
        "schedule", Schedule(checkpoint_every=settings.checkpoint_every)))
    if schedule.for_ablation(ablation).total_steps > settings.max_total_steps:
        raise InvalidArgument(f"{schedule.total_steps} steps in all exceed the server's limit of "
                              f"{settings.max_total_steps}", field="schedule")
    anchors = ([a.strip() for a in request.intrinsic_anchors]
               or list(bundle.recommended("learn").get("anchors") or DEFAULT_ANCHORS))
    if not 1 <= len(anchors) <= 4 or any(not a for a in anchors) or len(set(anchors)) != len(anchors):
        raise InvalidArgument("1 to 4 distinct, non-empty words", field="intrinsic_anchors")

    image = decode_image(request.image, "image")
    width, height = image.size
    size = bundle.image_size
    box = center_crop_box(width, height)
    concepts, seen = [], set()
    for i, c in enumerate(request.concepts):
        cid = c.concept_id if c.HasField("concept_id") else f"c{i}"
        if not _CONCEPT_ID.match(cid) or cid in seen:
            raise InvalidArgument("at most 64 characters from [A-Za-z0-9_-], unique in the request",
                                  field=f"concepts[{i}].concept_id")
        seen.add(cid)
        noun = c.noun.strip()
        if not noun and ablation != "mask_only":
            raise InvalidArgument("a noun is required", field=f"concepts[{i}].noun")
        if noun and not tokenizer(noun, add_special_tokens=False)["input_ids"]:
            raise InvalidArgument("has no token", field=f"concepts[{i}].noun")
        mask = decode_mask(c.mask, f"concepts[{i}].mask", expected_size=(width, height))
        if not mask.any():
            raise InvalidArgument("has no pixel inside", field=f"concepts[{i}].mask")
        left, top, right, bottom = box
        square = resize_mask(mask[top:bottom, left:right], (size, size))
        if not square.any():
            raise InvalidArgument("has no pixel inside the centre square used for training",
                                  field=f"concepts[{i}].mask")
        concepts.append(Concept(cid, noun, square))
    seed = request.seed if request.HasField("seed") else secrets.randbits(63)
    return LearningSpec(center_crop_resize(image, size), concepts, anchors, schedule, ablation, delta, lora_rank, seed)


# -- encoding records ----------------------------------------------------------------------------------------------


def _timestamp(field, value: float | None) -> None:
    if value is not None:
        field.FromNanoseconds(int(value * 1e9))


def job_metadata(manager: JobManager, r: JobRecord) -> learner_pb2.LearningJobMetadata:
    percent = 100.0 if r.state == SUCCEEDED else min(99.9, 100.0 * r.step / max(r.total_steps, 1))
    md = learner_pb2.LearningJobMetadata(
        job_id=r.id, state=_STATE[r.state], phase=_PHASE.get(r.phase, learner_pb2.PHASE_UNSPECIFIED),
        step=r.step, total_steps=r.total_steps, percent=percent, losses=r.losses,
        queue_position=manager.queue_position(r.id) if r.state == QUEUED else 0,
        cancel_requested=r.cancel_requested, replica_address=manager.advertise_address)
    for name in ("create_time", "start_time", "update_time", "end_time"):
        _timestamp(getattr(md, name), getattr(r, name))
    eta = manager.eta_seconds(r)
    if eta is not None:
        md.eta_seconds = eta
    if r.memory_estimate:
        md.memory_estimate_bytes = r.memory_estimate
    if r.class_images is not None:
        md.class_image_status.CopyFrom(class_images_message(manager, r.class_images))
    return md


def class_images_message(manager: JobManager, info: dict) -> learner_pb2.ClassImageStatus:
    msg = learner_pb2.ClassImageStatus(count=info["count"], ready=info["ready"], to_generate=info["to_generate"],
                                  source=info["source"], inference_steps=info["steps"])
    seconds = manager.seconds_per_class_image()
    if seconds is not None:
        msg.seconds_each = seconds
    return msg


def job_result(r: JobRecord, bundle_info) -> learner_pb2.LearningJobResult:
    tokens = [learner_pb2.LearnedToken(token=t["token"], role=_ROLE[t["role"]], concept_id=t["concept_id"],
                                       noun=t["noun"], attribute=t["attribute"]) for t in by_concept(r.result["tokens"])]
    files = [learner_pb2.ArtifactFile(name=f.name, size_bytes=f.size_bytes, sha256=f.sha256)
             for f in artifact_files(r)]
    return learner_pb2.LearningJobResult(job_id=r.id, tokens=tokens, artifacts=files, bundle=bundle_info)


def job_error(r: JobRecord) -> status_pb2.Status:
    return status_pb2.Status(code=getattr(code_pb2, r.error_code or "UNKNOWN", code_pb2.UNKNOWN),
                             message=r.error_message)


class GenerationPipeline:
    """The generation pipeline of the last job that `Generate` served (its artifacts applied), kept for the next
    call about the same job and dropped when another job starts training (`release`), so that the two never
    hold memory together. A release during a `Generate` call takes effect when the call ends."""

    def __init__(self):
        self.lock = threading.Lock()
        self._pipe: tuple[str, object] | None = None
        self._release_pending = False

    @contextlib.contextmanager
    def held(self):
        """One Generate call at a time; a release that came during the call takes effect at its end."""
        with self.lock:
            try:
                yield
            finally:
                if self._release_pending:
                    self._pipe, self._release_pending = None, False

    def get(self, job_id: str, load):
        """Inside `held()`: the pipeline of `job_id`, loaded by `load()` unless it is the one held."""
        if self._pipe is None or self._pipe[0] != job_id:
            self._pipe = None  # the previous job's pipeline goes before the next one loads
            self._pipe = (job_id, load())
        return self._pipe[1]

    def release(self) -> None:
        if self.lock.acquire(blocking=False):
            try:
                self._pipe = None
            finally:
                self.lock.release()
        else:
            self._release_pending = True


@dataclass
class LearnerState:
    settings: LearnerSettings
    bundle: Bundle | None = None
    manager: JobManager | None = None
    device: str = "cpu"
    precision: str = "fp32"
    estimator: MemoryEstimator | None = None
    memory_limit: int = -1  # bytes a job may need; -1 = no limit
    memory_limit_source: str = ""
    generation: GenerationPipeline = field(default_factory=GenerationPipeline)
    warming: threading.Thread | None = None  # the start-up memory trace
    library: Library | None = None  # the concept library (services/learner/library.py)
    publisher: Publisher | None = None

    def check_memory(self, spec: LearningSpec, generates_class_images: bool = True) -> MemoryEstimate | None:
        """The job's memory estimate; RESOURCE_EXHAUSTED with the figures when it exceeds the limit.
        `generates_class_images`: some of its class images are neither carried by the bundle nor cached."""
        if self.estimator is None:
            return None
        estimate = self.estimator.estimate_spec(spec, generates_class_images)
        if 0 <= self.memory_limit < estimate.total:
            message = (f"this job needs about {estimate.describe()} at its peak; a job may use at most "
                       f"{gib(self.memory_limit)} on this learner ({self.memory_limit_source})")
            field_name = None
            if spec.refinement == "full" and spec.schedule.refinement_steps > 0:
                lora = self.estimator.estimate_spec(replace(spec, refinement="lora"), generates_class_images)
                message += f"; with REFINEMENT_DELTA_LORA it would need about {gib(lora.total)}"
                field_name = "refinement_delta"
            raise ResourceExhausted(message, field=field_name)
        return estimate

    def operation(self, r: JobRecord) -> operations_pb2.Operation:
        op = operations_pb2.Operation(name=f"operations/{r.id}", done=r.done)
        op.metadata.Pack(job_metadata(self.manager, r))
        if r.state == SUCCEEDED:
            op.response.Pack(job_result(r, self.bundle_info()))
        elif r.done:
            op.error.CopyFrom(job_error(r))
        return op

    def bundle_info(self):
        return bundle_info(self.bundle, self.precision)

    def succeeded(self, name: str) -> JobRecord:
        r = self.manager.get(job_id_from_name(name))
        if r.state != SUCCEEDED:
            raise FailedPrecondition(f"job {r.id} is {r.state}, not succeeded")
        return r


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, state: LearnerState):
        self.state = state

    def CreateLearningJob(self, request, context):
        s = self.state
        spec = parse_request(request, s.bundle, s.settings)
        plan = s.manager.class_image_plan(spec)
        estimate = s.check_memory(spec, plan is not None and plan.to_generate > 0)
        record = s.manager.submit(spec, request.request_id, request_digest(request),
                                  memory_estimate=estimate.total if estimate else 0,
                                  source_sha256=hashlib.sha256(request.image).hexdigest())
        if estimate is not None and record.memory_estimate == estimate.total:
            log.info("job %s: estimated peak memory %s", record.id, estimate.describe())
        return s.operation(record)

    def PlanLearningJob(self, request, context):
        s = self.state
        spec = parse_request(request.job, s.bundle, s.settings)
        plan = s.manager.class_image_plan(spec)
        generates = plan is not None and plan.to_generate > 0
        estimate = s.check_memory(spec, generates)
        response = learner_pb2.PlanLearningJobResponse(total_steps=spec.schedule.total_steps,
                                                       jobs_ahead=s.manager.active_jobs())
        per_image = s.manager.seconds_per_class_image()
        if plan is not None:
            response.class_image_status.CopyFrom(class_images_message(s.manager, class_images_info(plan)))
            if not generates:
                response.class_images_seconds = 0.0
            elif per_image is not None:
                response.class_images_seconds = plan.to_generate * per_image
        step = s.manager.step_seconds()
        if step is not None:
            response.training_seconds = spec.schedule.total_steps * step
        if estimate is not None:
            response.memory_estimate_bytes = estimate.total
        return response

    def WatchLearningJob(self, request, context):
        s = self.state
        job_id = job_id_from_name(request.name)
        s.manager.get(job_id)
        for r in s.manager.watch(job_id, context.is_active):
            msg = learner_pb2.WatchLearningJobResponse(metadata=job_metadata(s.manager, r), done=r.done)
            if r.state == SUCCEEDED:
                msg.response.CopyFrom(job_result(r, s.bundle_info()))
            elif r.done:
                msg.error.CopyFrom(job_error(r))
            yield msg

    def GetArtifacts(self, request, context):
        r = self.state.succeeded(request.name)
        files: dict[str, ArtifactFile] = {f.name: f for f in artifact_files(r)}
        names = list(request.files) or list(files)
        for n in names:
            if n not in files:
                raise NotFound(f"job {r.id} has no artifact {n!r}")
        folder = self.state.manager.job_dir(r.id) / "artifacts"
        return iter_with_context_check(self._chunks(folder, [files[n] for n in names]), context)

    @staticmethod
    def _chunks(folder, files: list[ArtifactFile], message=learner_pb2.GetArtifactsResponse):
        for f in files:
            with open(folder / f.name, "rb") as fh:
                offset = 0
                while True:
                    chunk = fh.read(CHUNK)
                    last = offset + len(chunk) >= f.size_bytes
                    yield message(file_name=f.name, offset=offset, chunk=chunk, last_chunk=last,
                                  sha256=f.sha256 if last else "", size_bytes=f.size_bytes)
                    offset += len(chunk)
                    if last:
                        break

    def _pipeline(self, job_id: str):
        folder = self.state.manager.job_dir(job_id) / "artifacts"
        return self.state.generation.get(job_id, lambda: G.load_pipeline(self.state.bundle, folder,
                                                                          self.state.device))

    def Generate(self, request, context):
        s = self.state
        r = s.succeeded(request.name)
        kind = request.kind or (learner_pb2.PROMPT_KIND_FREE if request.prompts else learner_pb2.PROMPT_KIND_OBJECT_LEVEL)
        if kind not in learner_pb2.PromptKind.values():
            raise InvalidArgument(f"unknown value {kind}", field="kind")
        if kind == learner_pb2.PROMPT_KIND_FREE and not request.prompts:
            raise InvalidArgument("PROMPT_KIND_FREE needs at least one prompt", field="prompts")
        if kind != learner_pb2.PROMPT_KIND_FREE and request.prompts:
            raise InvalidArgument("must be empty unless kind is PROMPT_KIND_FREE", field="prompts")
        if len(request.prompts) > 16:
            raise InvalidArgument("at most 16 prompts", field="prompts")
        num_images, steps, guidance, seed = G.request_options(s.bundle, request)
        token_ids = {t["concept_id"] for t in r.result["tokens"]}
        concept_ids = list(request.concept_ids) or list(dict.fromkeys(t["concept_id"] for t in r.result["tokens"]))
        for cid in concept_ids:
            if cid not in token_ids:
                raise InvalidArgument(f"job {r.id} has no concept {cid!r}", field="concept_ids")
        with s.generation.held():
            pipe = self._pipeline(r.id)
            for i, p in enumerate(request.prompts):
                if _token_count(pipe.tokenizer, p) > pipe.tokenizer.model_max_length:
                    raise InvalidArgument(f"longer than {pipe.tokenizer.model_max_length} tokens",
                                          field=f"prompts[{i}]")
            manifest = read_manifest(s.manager.job_dir(r.id) / "artifacts")
            if kind == learner_pb2.PROMPT_KIND_FREE:
                prompts = [G.Prompt(p) for p in request.prompts]
            elif kind == learner_pb2.PROMPT_KIND_OBJECT_LEVEL:
                prompts = G.object_level_prompts(manifest, concept_ids)
            else:
                prompts = G.intrinsic_prompts(manifest, concept_ids)
            span = TRACER.start_span("generate", attributes={  # ends with the stream (never made current)
                "ice.job_id": r.id, "ice.prompt_kind": learner_pb2.PromptKind.Name(kind), "ice.prompts": len(prompts),
                "ice.images_per_prompt": num_images, "ice.inference_steps": steps})
            try:
                for prompt, index, image_seed, image in G.generate(pipe, prompts, num_images, seed, steps, guidance):
                    if not call_active(context):
                        return
                    yield learner_pb2.GenerateResponse(prompt=prompt.text, index=index, image=encode_png(image),
                                                       concept_id=prompt.concept_id, attribute=prompt.attribute,
                                                       seed=image_seed)
            finally:
                span.end()

    def GetServerInfo(self, request, context):
        s = self.state
        return learner_pb2.GetServerInfoResponse(info=server_info(SERVICE, s.bundle, s.settings, s.device, s.precision))

    def ListConcepts(self, request, context):
        return library_rpc.list_concepts(self.state, request)

    def GetConcept(self, request, context):
        return library_rpc.get_concept(self.state, request)

    def GenerateComposition(self, request, context):
        return library_rpc.generate_composition(self.state, request, context)

    def ExportConcepts(self, request, context):
        return library_rpc.export_concepts(self.state, request, context, self._chunks)


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    """The standard long-running operations API over the learner's jobs."""

    def __init__(self, state: LearnerState):
        self.state = state

    def GetOperation(self, request, context):
        return self.state.operation(self.state.manager.get(job_id_from_name(request.name)))

    def ListOperations(self, request, context):
        if request.filter:
            raise InvalidArgument("filters are not supported; leave it empty", field="filter")
        if request.name not in ("", "operations"):
            raise InvalidArgument("must be 'operations' or empty", field="name")
        try:
            offset = int(request.page_token or 0)
        except ValueError:
            raise InvalidArgument("not a page token from this server", field="page_token") from None
        if request.page_size < 0:
            raise InvalidArgument("must not be negative", field="page_size")
        size = min(request.page_size or 50, 1000)
        records = self.state.manager.list()
        page = records[offset : offset + size]
        more = offset + size < len(records)
        return operations_pb2.ListOperationsResponse(operations=[self.state.operation(r) for r in page],
                                                     next_page_token=str(offset + size) if more else "")

    def CancelOperation(self, request, context):
        self.state.manager.cancel(job_id_from_name(request.name))
        return empty_pb2.Empty()

    def DeleteOperation(self, request, context):
        job_id = job_id_from_name(request.name)
        self.state.manager.get(job_id)  # NOT_FOUND before the library is touched: another replica's job stays
        # its concepts leave the library first; nothing is deleted when the library cannot be written
        self.state.publisher.delete(job_id, lambda: self.state.manager.delete(job_id))
        return empty_pb2.Empty()

    def WaitOperation(self, request, context):
        job_id = job_id_from_name(request.name)
        timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 60.0
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining - 0.1, 0.0))
        return self.state.operation(self.state.manager.wait(job_id, timeout))


def _warm_estimator(estimator: MemoryEstimator) -> None:
    try:
        estimator.warm()
    except Exception:  # noqa: BLE001 - CreateLearningJob traces again, and reports a failure there
        log.warning("tracing the default job's memory failed", exc_info=True)


def build_spec(settings: LearnerSettings) -> ServiceSpec:
    state = LearnerState(settings)

    def register(server: grpc.Server) -> None:
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(LearnerServicer(state), server)
        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(state), server)

    def load() -> None:
        if settings.max_job_crashes < 1:
            raise SystemExit("--max-job-crashes must be at least 1")
        state.device = resolve_device(settings.device)
        if settings.adam_8bit:
            if not state.device.startswith("cuda"):
                raise SystemExit(f"--adam-8bit needs a CUDA device (the learner runs on {state.device})")
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise SystemExit("--adam-8bit needs bitsandbytes: pip install bitsandbytes") from None
        state.precision = precision_name(compute_dtype(state.device))
        state.bundle = Bundle.open(settings.bundle, verify_hashes=settings.verify_bundle_hashes)
        # a bundle whose recommended options do not parse fails here, at start-up, not in a request
        state.bundle.recommended_defaults("schedule", Schedule())
        G.generation_defaults(state.bundle)
        from ice.wire import is_configured
        from services.learner.tracing import TracedJobManager

        manager = TracedJobManager if is_configured() else JobManager  # a `learn` span per job, in its creator's trace
        state.manager = manager(settings.job_store, state.bundle, device=state.device,
                                queue_size=settings.queue_size, class_images_dir=settings.class_images_dir,
                                class_image_steps=settings.class_image_steps, resume_jobs=settings.resume_jobs,
                                advertise_address=settings.advertise_address, max_crashes=settings.max_job_crashes,
                                gradient_checkpointing=settings.gradient_checkpointing,
                                adam_8bit=settings.adam_8bit, before_job=state.generation.release,
                                on_succeeded=lambda r: state.publisher.publish(r.id, state.manager.job_dir(r.id),
                                                                               r.create_time))
        store = Path(settings.job_store)
        state.library = Library(settings.concept_library or store / "library", store / "library-cache")
        state.publisher = Publisher(state.library, lambda: [
            (r.id, state.manager.job_dir(r.id), r.create_time) for r in state.manager.list() if r.state == SUCCEEDED],
            settings.advertise_address)
        state.estimator = MemoryEstimator(state.bundle, state.device,
                                          gradient_checkpointing=settings.gradient_checkpointing,
                                          adam_8bit=settings.adam_8bit,
                                          cache_file=Path(settings.job_store) / "memory-traces.json")
        if settings.max_job_memory_bytes > 0:
            state.memory_limit, state.memory_limit_source = settings.max_job_memory_bytes, "--max-job-memory-bytes"
        elif settings.max_job_memory_bytes == 0:
            state.memory_limit, state.memory_limit_source = memory_for_jobs(state.device)
        log.info("learner: a job may use %s (%s)", gib(state.memory_limit) if state.memory_limit >= 0 else "any memory",
                 state.memory_limit_source or "--max-job-memory-bytes -1")
        # trace the default job's memory now, so the first CreateLearningJob does not wait for it
        state.warming = threading.Thread(target=_warm_estimator, args=(state.estimator,), name="memory-trace",
                                         daemon=True)
        state.warming.start()
        state.manager.start()
        state.publisher.start()

    def on_shutdown() -> None:
        if state.publisher is not None:
            state.publisher.stop()
        if state.manager is not None:  # the running job stops at its next step or denoising step
            state.manager.close(settings.grace_seconds)
        if state.warming is not None:  # a trace in progress ends in seconds: never exit under it (see close)
            state.warming.join()

    return ServiceSpec(name="learner", service_names=[SERVICE, OPERATIONS], register=register, load=load,
                       on_shutdown=on_shutdown, version=server_version(),
                       bundle_digest=lambda: state.bundle.digest if state.bundle else "",
                       ready_check=lambda: state.manager is None or state.manager.ready())
