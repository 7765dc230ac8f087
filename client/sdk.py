"""`IceClient`: the synchronous Python SDK of the three ICE services.

    from client import IceClient
    with IceClient(localizer="localhost:50051", learner="localhost:50052", evaluator="localhost:50053") as ice:
        result = ice.extract("photo.jpg", out_dir="result/")

Every method returns typed dataclasses (`client.types`) and raises `client.errors.ServiceError` (with the
service, its address, the status code and any field violations) instead of a bare `grpc.RpcError`.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc

from client.channel import DEFAULT_TARGETS, ChannelConfig, display_target, open_channel
from client.errors import JobFailed, ServiceError, from_rpc_error
from client.options import (
    ExtractOptions,
    GenerateOptions,
    LocalizeOptions,
    Schedule,
    image_bytes,
    mask_png,
)
from client.types import (
    ArtifactFile,
    Concept,
    ConceptScore,
    EncoderScores,
    EvaluationResult,
    Extraction,
    GeneratedImage,
    Job,
    JobProgress,
    LearnedToken,
    LearningResult,
    LocalizeResult,
    MaskMatch,
    MaskScores,
)
from ice.common.v1 import common_pb2
from ice.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc


def _enum_name(enum, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix)
    except ValueError:
        return str(value)


def _enum_value(enum, name: str | None, prefix: str, what: str) -> int:
    if name is None:
        return 0
    key = prefix + name.upper().replace("-", "_")
    try:
        return enum.Value(key)
    except ValueError:
        known = ", ".join(n.removeprefix(prefix).lower() for n in enum.keys() if not n.endswith("UNSPECIFIED"))
        raise ValueError(f"unknown {what} {name!r}; one of: {known}") from None


# --- protobuf -> dataclasses -------------------------------------------------------------------------------
def _concept(c: common_pb2.Concept) -> Concept:
    return Concept(c.concept_id, c.noun, c.area_fraction, c.round, [(w.word, w.weight) for w in c.retrieval], c.mask)


def _learning_result(r: learner_pb2.LearningJobResult) -> LearningResult:
    tokens = [LearnedToken(t.token, _enum_name(learner_pb2.TokenRole, t.role, "TOKEN_ROLE_"), t.concept_id, t.noun,
                           t.attribute) for t in r.tokens]
    artifacts = [ArtifactFile(a.name, a.size_bytes, a.sha256) for a in r.artifacts]
    b = r.bundle
    bundle = {"name": b.name, "version": b.version, "sha256": b.sha256, "image_size": b.image_size,
              "precision": b.precision}
    return LearningResult(r.job_id, tokens, artifacts, bundle)


def _progress(m: learner_pb2.LearningJobMetadata, done: bool = False, error=None, response=None) -> JobProgress:
    return JobProgress(
        job_id=m.job_id,
        state=_enum_name(learner_pb2.JobState, m.state, "JOB_STATE_"),
        phase=_enum_name(learner_pb2.Phase, m.phase, "PHASE_"),
        step=m.step,
        total_steps=m.total_steps,
        percent=m.percent,
        losses=dict(m.losses),
        eta_seconds=m.eta_seconds if m.HasField("eta_seconds") else None,
        queue_position=m.queue_position,
        cancel_requested=m.cancel_requested,
        done=done,
        error_code=_code_name(error.code) if error is not None else None,
        error_message=error.message if error is not None else None,
        result=_learning_result(response) if response is not None else None,
    )


def _code_name(number: int) -> str:
    """google.rpc.Status.code (an int) -> "CANCELLED", ..."""
    return next((c.name for c in grpc.StatusCode if c.value[0] == number), str(number))


def _operation_progress(op: operations_pb2.Operation) -> JobProgress:
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
    return _progress(metadata, op.done, error, response)


def _scores(s: evaluator_pb2.EncoderScores) -> EncoderScores:
    return EncoderScores(
        encoder=_enum_name(common_pb2.Encoder, s.encoder, "ENCODER_"),
        sim_i=s.sim_i,
        sim_c=s.sim_c if s.HasField("sim_c") else None,
        acc1=s.acc1,
        acc3=s.acc3,
        concepts=[ConceptScore(c.concept_id, c.sim_i, c.acc1, c.acc3, c.rank) for c in s.concepts],
    )


class IceClient:
    """Channels to the localizer, learner and evaluator, and one typed method per RPC.

    `localizer`, `learner`, `evaluator`: targets such as "host:port" or "dns:///svc.namespace:50051" (None =
    localhost and the service's default port). `token`, `tls` and the rest of the channel set-up come from
    `config` (a `ChannelConfig`) or the keyword arguments that mirror it. `timeout` is the deadline of each
    unary call in seconds.
    """

    def __init__(
        self,
        localizer: str | None = None,
        learner: str | None = None,
        evaluator: str | None = None,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: str | Path | None = None,
        client_certificate: str | Path | None = None,
        client_key: str | Path | None = None,
        timeout: float = 600.0,
        config: ChannelConfig | None = None,
    ):
        self.config = config or ChannelConfig(
            tls=tls,
            root_certificates=Path(root_certificates) if root_certificates else None,
            client_certificate=Path(client_certificate) if client_certificate else None,
            client_key=Path(client_key) if client_key else None,
            token=token,
            timeout=timeout,
        )
        self.targets = {
            "localizer": localizer or DEFAULT_TARGETS["localizer"],
            "learner": learner or DEFAULT_TARGETS["learner"],
            "evaluator": evaluator or DEFAULT_TARGETS["evaluator"],
        }
        self._channels: dict[str, grpc.Channel] = {}
        # operation name -> the learner replica that owns the job (from its metadata's replica_address)
        self._owners: dict[str, str] = {}

    # --- plumbing ------------------------------------------------------------------------------------------
    def _channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            self._channels[service] = open_channel(self.targets[service], self.config)
        return self._channels[service]

    def _error(self, error: grpc.RpcError, service: str) -> ServiceError:
        return from_rpc_error(error, service, display_target(self.targets[service]))

    def _call(self, service: str, fn: Callable, request, timeout: float | None | str = "default"):
        try:
            return fn(request, timeout=self.config.timeout if timeout == "default" else timeout)
        except grpc.RpcError as error:
            raise self._error(error, service) from None

    def _stream(self, service: str, fn: Callable, request, timeout: float | None = None) -> Iterator:
        try:
            yield from fn(request, timeout=timeout)
        except grpc.RpcError as error:
            raise self._error(error, service) from None

    @property
    def _localizer(self):
        return localizer_pb2_grpc.LocalizerServiceStub(self._channel("localizer"))

    @property
    def _learner(self):
        return learner_pb2_grpc.LearnerServiceStub(self._channel("learner"))

    @property
    def _operations(self):
        return operations_pb2_grpc.OperationsStub(self._channel("learner"))

    def _job_channel(self, job: Job) -> grpc.Channel:
        """The channel for calls about `job`: straight to the replica that owns it when known (a job lives on
        one learner replica; a load-balanced target could reach another), else the learner target."""
        address = job.replica or self._owners.get(job.name)
        if not address:
            return self._channel("learner")
        key = f"learner@{address}"
        if key not in self._channels:
            self._channels[key] = open_channel(address, self.config)
        return self._channels[key]

    def _job_stubs(self, job: Job | str):
        job = Job.of(job)
        channel = self._job_channel(job)
        return job, learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)

    def _remember(self, name: str, metadata: learner_pb2.LearningJobMetadata) -> None:
        if metadata.replica_address:
            self._owners[name] = metadata.replica_address

    @property
    def _evaluator(self):
        return evaluator_pb2_grpc.EvaluatorServiceStub(self._channel("evaluator"))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> IceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def server_info(self, service: str) -> dict[str, Any]:
        """GetServerInfo of "localizer", "learner" or "evaluator", as a dict."""
        from google.protobuf.json_format import MessageToDict

        stub_request = {
            "localizer": (lambda: self._localizer.GetServerInfo, localizer_pb2.GetServerInfoRequest()),
            "learner": (lambda: self._learner.GetServerInfo, learner_pb2.GetServerInfoRequest()),
            "evaluator": (lambda: self._evaluator.GetServerInfo, evaluator_pb2.GetServerInfoRequest()),
        }[service]
        response = self._call(service, stub_request[0](), stub_request[1])
        return MessageToDict(response.info, preserving_proto_field_name=True)

    # --- localizer -----------------------------------------------------------------------------------------
    def localize(self, image: Any, options: LocalizeOptions | None = None) -> LocalizeResult:
        """Stage 1: the object-level concepts of one image (nouns and masks)."""
        opts = (options or LocalizeOptions()).set_fields()
        refinement = _enum_value(localizer_pb2.Refinement, opts.pop("refinement", None), "REFINEMENT_", "refinement")
        request = localizer_pb2.LocalizeRequest(
            image=image_bytes(image), options=localizer_pb2.LocalizeOptions(refinement=refinement, **opts)
        )
        r = self._call("localizer", self._localizer.Localize, request)
        return LocalizeResult(
            concepts=[_concept(c) for c in r.concepts],
            width=r.width,
            height=r.height,
            rounds=r.rounds,
            remaining_fraction=r.remaining_fraction,
            stop_reason=_enum_name(localizer_pb2.StopReason, r.stop_reason, "STOP_REASON_"),
            timings=[(t.stage, t.seconds) for t in r.timings],
        )

    # --- learner -------------------------------------------------------------------------------------------
    def create_job(
        self,
        image: Any,
        concepts: Sequence[Concept] | Sequence[tuple[str, Any]],
        *,
        anchors: Sequence[str] = (),
        schedule: Schedule | None = None,
        ablation: str | None = None,
        refinement_delta: str | None = None,
        lora_rank: int | None = None,
        seed: int | None = None,
        request_id: str | None = None,
    ) -> Job:
        """Queue a learning job. `concepts`: localizer `Concept`s or (noun, mask) pairs (mask: PNG/path/array).

        A `request_id` (a fresh UUID unless given) makes the call safe to retry: a repeat returns the same job.
        """
        request = learning_request(image, concepts, anchors=anchors, schedule=schedule, ablation=ablation,
                                   refinement_delta=refinement_delta, lora_rank=lora_rank, seed=seed,
                                   request_id=request_id or str(uuid.uuid4()))
        op = self._call("learner", self._learner.CreateLearningJob, request)
        metadata = learner_pb2.LearningJobMetadata()
        if op.metadata.Unpack(metadata):
            self._remember(op.name, metadata)
        return Job(op.name, metadata.replica_address)

    def job(self, job: Job | str) -> JobProgress:
        """The job's current progress (google.longrunning GetOperation)."""
        job, _, operations = self._job_stubs(job)
        op = self._call("learner", operations.GetOperation, operations_pb2.GetOperationRequest(name=job.name))
        return _operation_progress(op)

    def jobs(self, page_size: int = 100) -> list[JobProgress]:
        """Every job the learner knows (ListOperations, all pages)."""
        out, token = [], ""
        while True:
            r = self._call("learner", self._operations.ListOperations,
                           operations_pb2.ListOperationsRequest(name="operations", page_size=page_size,
                                                                page_token=token))
            out += [_operation_progress(op) for op in r.operations]
            token = r.next_page_token
            if not token:
                return out

    def watch(self, job: Job | str, timeout: float | None = None) -> Iterator[JobProgress]:
        """Progress of a job as it changes; the last item has `done` = True (WatchLearningJob)."""
        job, learner, _ = self._job_stubs(job)
        request = learner_pb2.WatchLearningJobRequest(name=job.name)
        for r in self._stream("learner", learner.WatchLearningJob, request, timeout):
            self._remember(job.name, r.metadata)
            which = r.WhichOneof("result")
            yield _progress(r.metadata, r.done, r.error if which == "error" else None,
                            r.response if which == "response" else None)

    def wait(self, job: Job | str, progress: bool | Callable[[JobProgress], None] = False,
             timeout: float | None = None) -> LearningResult:
        """Follow the job to its end; return its result or raise `JobFailed`. `progress`: True = a progress bar
        on stderr, or a callable receiving every `JobProgress`."""
        from client.progress import progress_reporter

        last = None
        with progress_reporter(progress) as report:
            for last in self.watch(job, timeout):
                report(last)
        if last is None or not last.done:  # the stream ended early: ask once more
            last = self.job(job)
        if last.state != "SUCCEEDED" or last.result is None:
            raise JobFailed(last.job_id, last.state, last.error_code or "", last.error_message or "")
        return last.result

    def cancel(self, job: Job | str) -> None:
        """Ask the job to stop; it ends CANCELLED within one training step."""
        job, _, operations = self._job_stubs(job)
        self._call("learner", operations.CancelOperation, operations_pb2.CancelOperationRequest(name=job.name))

    def delete(self, job: Job | str) -> None:
        """Forget a finished job and its artifacts."""
        job, _, operations = self._job_stubs(job)
        self._call("learner", operations.DeleteOperation, operations_pb2.DeleteOperationRequest(name=job.name))

    def artifacts(self, job: Job | str, out_dir: str | Path, files: Sequence[str] = ()) -> list[Path]:
        """Download the job's artifact files into `out_dir` (checked against their sha256, written atomically)."""
        out_dir = Path(out_dir)
        job, learner, _ = self._job_stubs(job)
        request = learner_pb2.GetArtifactsRequest(name=job.name, files=list(files))
        written: list[Path] = []
        handle, digest, path, tmp = None, None, None, None
        try:
            for chunk in self._stream("learner", learner.GetArtifacts, request):
                if handle is None:
                    path = _safe_join(out_dir, chunk.file_name)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(path.name + ".part")
                    handle, digest = open(tmp, "wb"), hashlib.sha256()
                handle.write(chunk.chunk)
                digest.update(chunk.chunk)
                if chunk.last_chunk:
                    handle.close()
                    handle = None
                    if chunk.sha256 and digest.hexdigest() != chunk.sha256:
                        raise ServiceError("learner", self.targets["learner"], grpc.StatusCode.DATA_LOSS,
                                           f"artifact {chunk.file_name} arrived with a different sha256")
                    os.replace(tmp, path)
                    written.append(path)
        finally:
            if handle is not None:
                handle.close()
                Path(tmp).unlink(missing_ok=True)
        return written

    def iter_generate(
        self,
        job: Job | str,
        kind: str = "object_level",
        prompts: Sequence[str] = (),
        concept_ids: Sequence[str] = (),
        options: GenerateOptions | None = None,
    ) -> Iterator[GeneratedImage]:
        """Images from the job's learned tokens, as the server streams them. `kind`: "object_level" (one
        prompt per concept, "a photo of <&i><#i><%i><$i>"), "intrinsic" ("a <#i> texture", ..., "a <&i>") or
        "free" (`prompts`, verbatim)."""
        if prompts and kind != "free":
            kind = "free"
        opts = options or GenerateOptions()
        job, learner, _ = self._job_stubs(job)
        request = learner_pb2.GenerateRequest(
            name=job.name,
            kind=_enum_value(learner_pb2.PromptKind, kind, "PROMPT_KIND_", "prompt kind"),
            prompts=list(prompts),
            concept_ids=list(concept_ids),
        )
        for name in ("num_images", "seed", "num_inference_steps", "guidance_scale"):
            if getattr(opts, name) is not None:
                setattr(request, name, getattr(opts, name))
        label = kind.upper()
        for r in self._stream("learner", learner.Generate, request):
            yield GeneratedImage(r.prompt, r.index, r.concept_id, r.attribute, r.seed, label, r.image)

    def generate(self, job: Job | str, kind: str = "object_level", prompts: Sequence[str] = (),
                 concept_ids: Sequence[str] = (), options: GenerateOptions | None = None) -> list[GeneratedImage]:
        return list(self.iter_generate(job, kind, prompts, concept_ids, options))

    # --- evaluator -----------------------------------------------------------------------------------------
    def evaluate(
        self,
        source_image: Any,
        concepts: Sequence[tuple[str, Any, Sequence[Any]]],
        composition_images: Sequence[Any] = (),
        encoders: Sequence[str] = (),
        background_fill: str | None = None,
        crop: str | None = None,
    ) -> EvaluationResult:
        """UCE metrics of one source image. `concepts`: (concept_id, mask, generated images) per concept."""
        options = evaluator_pb2.EvaluateOptions(
            encoders=[_enum_value(common_pb2.Encoder, e, "ENCODER_", "encoder") for e in encoders],
            background_fill=_enum_value(evaluator_pb2.BackgroundFill, background_fill, "BACKGROUND_FILL_",
                                        "background fill"),
            crop=_enum_value(evaluator_pb2.Crop, crop, "CROP_", "crop"),
        )
        request = evaluator_pb2.EvaluateRequest(
            source_image=image_bytes(source_image),
            concepts=[evaluator_pb2.ConceptSamples(concept_id=cid, mask=mask_png(mask),
                                                   images=[image_bytes(i) for i in images])
                      for cid, mask, images in concepts],
            composition_images=[image_bytes(i) for i in composition_images],
            options=options,
        )
        r = self._call("evaluator", self._evaluator.Evaluate, request)
        return EvaluationResult([_scores(s) for s in r.scores])

    def score_masks(self, predicted: Sequence[Any], ground_truth: Sequence[Any]) -> MaskScores:
        """mIoU, recall and precision of predicted masks against ground truth, after Hungarian matching."""
        request = evaluator_pb2.ScoreMasksRequest(predicted=[mask_png(m) for m in predicted],
                                                  ground_truth=[mask_png(m) for m in ground_truth])
        r = self._call("evaluator", self._evaluator.ScoreMasks, request)
        return MaskScores(r.miou, r.recall, r.precision,
                          [MaskMatch(m.predicted_index, m.ground_truth_index, m.iou) for m in r.matches])

    # --- the whole pipeline --------------------------------------------------------------------------------
    def learn(self, image: bytes, concepts: Sequence[Concept], options: ExtractOptions,
              progress: bool | Callable[[JobProgress], None], on_job: Callable[[str], None]) -> LearningResult:
        job = self.create_job(image, concepts, anchors=options.anchors, schedule=options.schedule, seed=options.seed)
        on_job(job.name)
        return self.wait(job, progress=progress)

    def extract(
        self,
        image: Any,
        out_dir: str | Path | None = None,
        schedule: Schedule | None = None,
        progress: bool | Callable[[JobProgress], None] = True,
        options: ExtractOptions | None = None,
    ) -> Extraction:
        """localize -> learn (with a progress bar) -> generate (object-level and intrinsic prompts) -> evaluate.

        With `out_dir`, writes the masks, generated images, metrics and `report.html` there."""
        from client.pipeline import run_extraction

        options = options or ExtractOptions()
        if schedule is not None:
            options = _replace(options, schedule=schedule)
        return run_extraction(self, image_bytes(image), options, out_dir=out_dir, progress=progress)

    # the interface `client.pipeline.run_extraction` drives (shared with `client.local.LocalIce`)
    def generate_for(self, job_id: str, kind: str, options: GenerateOptions, prompts: Sequence[str] = ()):
        return self.generate(job_id, kind, prompts=prompts, options=options)

    def cancel_job(self, job_id: str) -> None:
        self.cancel(job_id)


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
        ablation=_enum_value(learner_pb2.Ablation, ablation, "ABLATION_", "ablation"),
        refinement_delta=_enum_value(learner_pb2.RefinementDelta, refinement_delta, "REFINEMENT_DELTA_",
                                     "refinement delta"),
        request_id=request_id,
    )
    if lora_rank is not None:
        request.lora_rank = lora_rank
    if seed is not None:
        request.seed = seed
    return request


def _replace(obj, **changes):
    from dataclasses import replace

    return replace(obj, **changes)


def _safe_join(root: Path, name: str) -> Path:
    """A server-given relative name under `root`; refuses absolute paths, `..` and NUL bytes."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts or "\x00" in name:
        raise ValueError(f"refusing artifact path {name!r}")
    return root.joinpath(*parts)


def evaluation_inputs(extraction_concepts: Iterable[Concept], generated: Sequence[GeneratedImage]):
    """(concept_id, mask, images) per concept: its object-level images are the samples of SIM^I and ACC."""
    out = []
    for c in extraction_concepts:
        images = [g.image_png for g in generated if g.concept_id == c.concept_id and g.kind == "OBJECT_LEVEL"]
        if images:
            out.append((c.concept_id, c.mask_png, images))
    return out
