"""Everything the synchronous and the asyncio client share about the contract: building each request from the
SDK's options, and turning each response into the typed results of `client.types`.

`IceClient` (client/sdk.py) and `AsyncIceClient` (client/aio.py) differ only in how a call is made (a blocking
stub or an awaited `grpc.aio` one); what goes in and what comes out is written here once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.longrunning import operations_pb2

from client.errors import JobFailed, ServiceError
from client.options import GenerateOptions, LocalizeOptions, Schedule, image_bytes, mask_png
from client.types import (
    ArtifactFile,
    ClassImages,
    Concept,
    ConceptScore,
    EncoderScores,
    EvaluationResult,
    GeneratedImage,
    JobPlan,
    JobProgress,
    LearnedToken,
    LearningResult,
    LocalizeResult,
    MaskMatch,
    MaskScores,
    SetEvaluationResult,
)
from ice.common.v1 import common_pb2
from ice.evaluator.v1 import evaluator_pb2
from ice.learner.v1 import learner_pb2
from ice.localizer.v1 import localizer_pb2

# full gRPC method names, for spans
LOCALIZER = "ice.localizer.v1.LocalizerService"
LEARNER = "ice.learner.v1.LearnerService"
EVALUATOR = "ice.evaluator.v1.EvaluatorService"
OPERATIONS = "google.longrunning.Operations"
SERVICE_OF = {"localizer": LOCALIZER, "learner": LEARNER, "evaluator": EVALUATOR}


def enum_name(enum, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix)
    except ValueError:
        return str(value)


def enum_value(enum, name: str | None, prefix: str, what: str) -> int:
    if name is None:
        return 0
    key = prefix + name.upper().replace("-", "_")
    try:
        return enum.Value(key)
    except ValueError:
        known = ", ".join(n.removeprefix(prefix).lower() for n in enum.keys() if not n.endswith("UNSPECIFIED"))
        raise ValueError(f"unknown {what} {name!r}; one of: {known}") from None


def code_name(number: int) -> str:
    """google.rpc.Status.code (an int) -> "CANCELLED", ..."""
    return next((c.name for c in grpc.StatusCode if c.value[0] == number), str(number))


# --- server info ---------------------------------------------------------------------------------------------
SERVER_INFO_REQUESTS = {
    "localizer": localizer_pb2.GetServerInfoRequest,
    "learner": learner_pb2.GetServerInfoRequest,
    "evaluator": evaluator_pb2.GetServerInfoRequest,
}


def server_info_dict(response) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(response.info, preserving_proto_field_name=True)


# --- localizer -----------------------------------------------------------------------------------------------
def localize_request(image: Any, options: LocalizeOptions | None) -> localizer_pb2.LocalizeRequest:
    opts = (options or LocalizeOptions()).set_fields()
    refinement = enum_value(localizer_pb2.Refinement, opts.pop("refinement", None), "REFINEMENT_", "refinement")
    return localizer_pb2.LocalizeRequest(image=image_bytes(image),
                                         options=localizer_pb2.LocalizeOptions(refinement=refinement, **opts))


def concept(c: common_pb2.Concept) -> Concept:
    return Concept(c.concept_id, c.noun, c.area_fraction, c.round, [(w.word, w.weight) for w in c.retrieval], c.mask)


def localize_result(r: localizer_pb2.LocalizeResponse) -> LocalizeResult:
    return LocalizeResult(
        concepts=[concept(c) for c in r.concepts],
        width=r.width,
        height=r.height,
        rounds=r.rounds,
        remaining_fraction=r.remaining_fraction,
        stop_reason=enum_name(localizer_pb2.StopReason, r.stop_reason, "STOP_REASON_"),
        timings=[(t.stage, t.seconds) for t in r.timings],
        uncovered_fraction=r.uncovered_fraction,
    )


# --- learner -------------------------------------------------------------------------------------------------
def learning_request(
    image: Any,
    concepts: Sequence[Concept] | Sequence[tuple[str, Any]],
    *,
    anchors: Sequence[str] = (),
    schedule: Schedule | None = None,
    ablation: str | None = None,
    refinement_delta: str | None = None,
    lora_rank: int | None = None,
    seed: int | None = None,
    request_id: str = "",
) -> learner_pb2.CreateLearningJobRequest:
    """The CreateLearningJob request (also what `LocalIce` hands the learner's own request parser)."""
    inputs = []
    for i, c in enumerate(concepts):
        if isinstance(c, Concept):
            inputs.append(learner_pb2.ConceptInput(noun=c.noun, mask=c.mask_png, concept_id=c.concept_id))
        else:
            noun, mask = c
            inputs.append(learner_pb2.ConceptInput(noun=noun, mask=mask_png(mask), concept_id=f"c{i}"))
    request = learner_pb2.CreateLearningJobRequest(
        image=image_bytes(image),
        concepts=inputs,
        intrinsic_anchors=list(anchors),
        schedule=learner_pb2.Schedule(**(schedule or Schedule()).set_fields()),
        ablation=enum_value(learner_pb2.Ablation, ablation, "ABLATION_", "ablation"),
        refinement_delta=enum_value(learner_pb2.RefinementDelta, refinement_delta, "REFINEMENT_DELTA_",
                                    "refinement delta"),
        request_id=request_id,
    )
    if lora_rank is not None:
        request.lora_rank = lora_rank
    if seed is not None:
        request.seed = seed
    return request


def created_job_metadata(op: operations_pb2.Operation) -> learner_pb2.LearningJobMetadata:
    metadata = learner_pb2.LearningJobMetadata()
    op.metadata.Unpack(metadata)
    return metadata


def learning_result(r: learner_pb2.LearningJobResult) -> LearningResult:
    tokens = [LearnedToken(t.token, enum_name(learner_pb2.TokenRole, t.role, "TOKEN_ROLE_"), t.concept_id, t.noun,
                           t.attribute) for t in r.tokens]
    artifacts = [ArtifactFile(a.name, a.size_bytes, a.sha256) for a in r.artifacts]
    b = r.bundle
    bundle = {"name": b.name, "version": b.version, "sha256": b.sha256, "image_size": b.image_size,
              "precision": b.precision}
    return LearningResult(r.job_id, tokens, artifacts, bundle)


def class_images(c: learner_pb2.ClassImageStatus) -> ClassImages:
    return ClassImages(c.count, c.ready, c.to_generate, c.source, c.inference_steps,
                       c.seconds_each if c.HasField("seconds_each") else None)


def plan_request(job: learner_pb2.CreateLearningJobRequest) -> learner_pb2.PlanLearningJobRequest:
    return learner_pb2.PlanLearningJobRequest(job=job)


def job_plan(r: learner_pb2.PlanLearningJobResponse) -> JobPlan:
    return JobPlan(
        total_steps=r.total_steps,
        class_images=class_images(r.class_image_status) if r.HasField("class_image_status") else None,
        class_images_seconds=r.class_images_seconds if r.HasField("class_images_seconds") else None,
        training_seconds=r.training_seconds if r.HasField("training_seconds") else None,
        memory_estimate_bytes=r.memory_estimate_bytes if r.HasField("memory_estimate_bytes") else None,
        jobs_ahead=r.jobs_ahead,
    )


def progress(m: learner_pb2.LearningJobMetadata, done: bool = False, error=None, response=None) -> JobProgress:
    return JobProgress(
        job_id=m.job_id,
        state=enum_name(learner_pb2.JobState, m.state, "JOB_STATE_"),
        phase=enum_name(learner_pb2.Phase, m.phase, "PHASE_"),
        step=m.step,
        total_steps=m.total_steps,
        percent=m.percent,
        losses=dict(m.losses),
        eta_seconds=m.eta_seconds if m.HasField("eta_seconds") else None,
        queue_position=m.queue_position,
        cancel_requested=m.cancel_requested,
        done=done,
        error_code=code_name(error.code) if error is not None else None,
        error_message=error.message if error is not None else None,
        result=learning_result(response) if response is not None else None,
        class_images=class_images(m.class_image_status) if m.HasField("class_image_status") else None,
    )


def watch_progress(r: learner_pb2.WatchLearningJobResponse) -> JobProgress:
    which = r.WhichOneof("result")
    return progress(r.metadata, r.done, r.error if which == "error" else None,
                    r.response if which == "response" else None)


def operation_progress(op: operations_pb2.Operation) -> JobProgress:
    metadata = learner_pb2.LearningJobMetadata()
    if op.HasField("metadata"):
        op.metadata.Unpack(metadata)
    error = op.error if op.HasField("error") else None
    response = None
    if op.HasField("response"):
        response = learner_pb2.LearningJobResult()
        op.response.Unpack(response)
    if not metadata.job_id:
        metadata.job_id = op.name.removeprefix("operations/")
    return progress(metadata, op.done, error, response)


def list_operations_request(page_size: int, page_token: str) -> operations_pb2.ListOperationsRequest:
    return operations_pb2.ListOperationsRequest(name="operations", page_size=page_size, page_token=page_token)


def final_result(last: JobProgress) -> LearningResult:
    """The result of a job that ended, or `JobFailed`."""
    if last.state != "SUCCEEDED" or last.result is None:
        raise JobFailed(last.job_id, last.state, last.error_code or "", last.error_message or "")
    return last.result


def generate_request(job_name: str, kind: str, prompts: Sequence[str], concept_ids: Sequence[str],
                     options: GenerateOptions | None) -> tuple[learner_pb2.GenerateRequest, str]:
    """The Generate request and the kind label its images get ("OBJECT_LEVEL", "INTRINSIC", "FREE")."""
    if prompts and kind != "free":
        kind = "free"
    opts = options or GenerateOptions()
    request = learner_pb2.GenerateRequest(
        name=job_name,
        kind=enum_value(learner_pb2.PromptKind, kind, "PROMPT_KIND_", "prompt kind"),
        prompts=list(prompts),
        concept_ids=list(concept_ids),
    )
    for name in ("num_images", "seed", "num_inference_steps", "guidance_scale"):
        if getattr(opts, name) is not None:
            setattr(request, name, getattr(opts, name))
    return request, kind.upper()


def generated_image(r: learner_pb2.GenerateResponse, label: str) -> GeneratedImage:
    return GeneratedImage(r.prompt, r.index, r.concept_id, r.attribute, r.seed, label, r.image)


def safe_join(root: Path, name: str) -> Path:
    """A server-given relative name under `root`; refuses absolute paths, `..` and NUL bytes."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts or "\x00" in name:
        raise ValueError(f"refusing artifact path {name!r}")
    return root.joinpath(*parts)


class ArtifactWriter:
    """Writes the GetArtifacts stream: each file to `name.part`, checked against its sha256, then renamed."""

    def __init__(self, out_dir: str | Path, target: str):
        self.out_dir = Path(out_dir)
        self.target = target
        self.written: list[Path] = []
        self._handle = None
        self._digest = None
        self._path: Path | None = None
        self._tmp: Path | None = None

    def add(self, chunk: learner_pb2.GetArtifactsResponse) -> None:
        if self._handle is None:
            self._path = safe_join(self.out_dir, chunk.file_name)
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = self._path.with_name(self._path.name + ".part")
            self._handle, self._digest = open(self._tmp, "wb"), hashlib.sha256()
        self._handle.write(chunk.chunk)
        self._digest.update(chunk.chunk)
        if chunk.last_chunk:
            self._handle.close()
            self._handle = None
            if chunk.sha256 and self._digest.hexdigest() != chunk.sha256:
                raise ServiceError("learner", self.target, grpc.StatusCode.DATA_LOSS,
                                   f"artifact {chunk.file_name} arrived with a different sha256")
            os.replace(self._tmp, self._path)
            self.written.append(self._path)

    def close(self) -> None:
        """Drop a file left half-written by an interrupted stream."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            Path(self._tmp).unlink(missing_ok=True)


# --- evaluator -----------------------------------------------------------------------------------------------
def evaluate_options(encoders: Sequence[str] = (), background_fill: str | None = None,
                     crop: str | None = None) -> evaluator_pb2.EvaluateOptions:
    return evaluator_pb2.EvaluateOptions(
        encoders=[enum_value(common_pb2.Encoder, e, "ENCODER_", "encoder") for e in encoders],
        background_fill=enum_value(evaluator_pb2.BackgroundFill, background_fill, "BACKGROUND_FILL_",
                                   "background fill"),
        crop=enum_value(evaluator_pb2.Crop, crop, "CROP_", "crop"),
    )


def evaluate_request(
    source_image: Any,
    concepts: Sequence[tuple[str, Any, Sequence[Any]]],
    composition_images: Sequence[Any] = (),
    encoders: Sequence[str] = (),
    background_fill: str | None = None,
    crop: str | None = None,
) -> evaluator_pb2.EvaluateRequest:
    options = evaluate_options(encoders, background_fill, crop)
    return evaluator_pb2.EvaluateRequest(
        source_image=image_bytes(source_image),
        concepts=[evaluator_pb2.ConceptSamples(concept_id=cid, mask=mask_png(mask),
                                               images=[image_bytes(i) for i in images])
                  for cid, mask, images in concepts],
        composition_images=[image_bytes(i) for i in composition_images],
        options=options,
    )


def encoder_scores(s: evaluator_pb2.EncoderScores) -> EncoderScores:
    return EncoderScores(
        encoder=enum_name(common_pb2.Encoder, s.encoder, "ENCODER_"),
        sim_i=s.sim_i,
        sim_c=s.sim_c if s.HasField("sim_c") else None,
        acc1=s.acc1,
        acc3=s.acc3,
        concepts=[ConceptScore(c.concept_id, c.sim_i, c.acc1, c.acc3, c.rank) for c in s.concepts],
        accuracy_scope=enum_name(evaluator_pb2.AccuracyScope, s.accuracy_scope, "ACCURACY_SCOPE_"),
        concepts_in_scope=s.concepts_in_scope,
        sim_c_absent_reason=s.sim_c_absent_reason,
    )


def evaluation_result(r: evaluator_pb2.EvaluateResponse) -> EvaluationResult:
    return EvaluationResult([encoder_scores(s) for s in r.scores])


# an image's framing inside a message (tag and length), counted generously when a message is filled
_FRAMING = 16


def chunk_bytes(max_message_bytes: int) -> int:
    """Largest message the SDK builds for EvaluateSet: half the message limit (room for framing and options)."""
    return max(max_message_bytes // 2, 1 << 16)


def item_messages(item_id: str, one: evaluator_pb2.EvaluateRequest,
                  limit: int) -> Iterator[evaluator_pb2.EvaluateSetRequest]:
    """One source image as EvaluateSet messages of about `limit` bytes at most: the item with its masks and as
    many images as fit, then `continuation` messages with the rest, in order (an image larger than `limit` goes
    alone in its message)."""
    item = evaluator_pb2.EvaluateSetItem(item_id=item_id, source_image=one.source_image)
    for c in one.concepts:
        item.concepts.add(concept_id=c.concept_id, mask=c.mask)
    size, rest = item.ByteSize(), []
    images = [(k, c.concept_id, img) for k, c in enumerate(one.concepts) for img in c.images]
    images += [(None, "", img) for img in one.composition_images]
    for k, concept_id, img in images:
        if not rest and size + len(img) + _FRAMING <= limit:
            (item.concepts[k].images if k is not None else item.composition_images).append(img)
            size += len(img) + _FRAMING
        else:  # once one image does not fit, every later one follows in order
            rest.append((concept_id, img))
    yield evaluator_pb2.EvaluateSetRequest(item=item)
    part, size = None, 0
    for concept_id, img in rest:
        if part is None or part.concept_id != concept_id or size + len(img) + _FRAMING > limit:
            if part is not None:
                yield evaluator_pb2.EvaluateSetRequest(continuation=part)
            part, size = evaluator_pb2.EvaluateSetImages(concept_id=concept_id), len(concept_id) + _FRAMING
        part.images.append(img)
        size += len(img) + _FRAMING
    if part is not None:
        yield evaluator_pb2.EvaluateSetRequest(continuation=part)


def evaluate_set_requests(
    items: Iterable[tuple[str, Any, Sequence[tuple[str, Any, Sequence[Any]]], Sequence[Any]]],
    encoders: Sequence[str] = (),
    background_fill: str | None = None,
    crop: str | None = None,
    limit: int = 32 << 20,
) -> Iterator[evaluator_pb2.EvaluateSetRequest]:
    """The EvaluateSet stream: the options, then each (item_id, source image, concepts, composition images) in
    messages of at most about `limit` bytes (`item_messages`), each item encoded only when the stream reaches it."""
    yield evaluator_pb2.EvaluateSetRequest(options=evaluate_options(encoders, background_fill, crop))
    for item_id, source, concepts, composition in items:
        yield from item_messages(item_id, evaluate_request(source, concepts, composition), limit)


def image_count(request: evaluator_pb2.EvaluateRequest) -> int:
    return sum(len(c.images) for c in request.concepts) + len(request.composition_images)


def set_image_count(items) -> int | None:
    """Images of every item of an `evaluate_set` call, when `items` is a sequence (None for a one-pass iterable)."""
    if not isinstance(items, Sequence):
        return None
    return sum(sum(len(images) for _, _, images in concepts) + len(composition)
               for _, _, concepts, composition in items)


def evaluate_as_set(request: evaluator_pb2.EvaluateRequest, limit: int) -> Iterator[evaluator_pb2.EvaluateSetRequest]:
    """An Evaluate request too large for one message, as an EvaluateSet of one item split over messages."""
    yield evaluator_pb2.EvaluateSetRequest(options=request.options)
    yield from item_messages("0", request, limit)


def evaluation_result_of_set(r: evaluator_pb2.EvaluateSetResponse) -> EvaluationResult:
    """What Evaluate answers, from the EvaluateSet of its one item: a set of one image ranks its concepts among
    that image's own, as Evaluate does (ACCURACY_SCOPE_REQUEST)."""
    scores = []
    for s in r.scores:
        one = evaluator_pb2.EncoderScores()
        one.CopyFrom(s)
        one.accuracy_scope = evaluator_pb2.ACCURACY_SCOPE_REQUEST
        scores.append(encoder_scores(one))
    return EvaluationResult(scores)


def set_evaluation_result(r: evaluator_pb2.EvaluateSetResponse) -> SetEvaluationResult:
    return SetEvaluationResult([encoder_scores(s) for s in r.scores], r.item_count, r.concept_count,
                               [(i.item_id, [encoder_scores(s) for s in i.scores]) for i in r.item_scores])


def score_masks_request(predicted: Sequence[Any], ground_truth: Sequence[Any]) -> evaluator_pb2.ScoreMasksRequest:
    return evaluator_pb2.ScoreMasksRequest(predicted=[mask_png(m) for m in predicted],
                                           ground_truth=[mask_png(m) for m in ground_truth])


def mask_scores(r: evaluator_pb2.ScoreMasksResponse) -> MaskScores:
    return MaskScores(r.miou, r.recall, r.precision,
                      [MaskMatch(m.predicted_index, m.ground_truth_index, m.iou) for m in r.matches])


def extraction_set_item(extraction, item_id: str):
    """An `evaluate_set` item from an extraction (e.g. `client.report.load_extraction(folder)`): its image, each
    concept's mask and object-level images, and its composition images."""
    composition = [g.image_png for g in extraction.generated if g.kind == "FREE"]
    return (item_id, extraction.image_png, evaluation_inputs(extraction.localization.concepts, extraction.generated),
            composition)


def evaluation_inputs(extraction_concepts: Iterable[Concept], generated: Sequence[GeneratedImage]):
    """(concept_id, mask, images) per concept: its object-level images are the samples of SIM^I and ACC."""
    out = []
    for c in extraction_concepts:
        images = [g.image_png for g in generated if g.concept_id == c.concept_id and g.kind == "OBJECT_LEVEL"]
        if images:
            out.append((c.concept_id, c.mask_png, images))
    return out
