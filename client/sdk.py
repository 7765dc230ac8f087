"""`IceClient`: the synchronous Python SDK of the three ICE services.

    from client import IceClient
    with IceClient(localizer="localhost:50051", learner="localhost:50052", evaluator="localhost:50053") as ice:
        result = ice.extract("photo.jpg", out_dir="result/")

Every method returns typed dataclasses (`client.types`) and raises `client.errors.ServiceError` (with the
service, its address, the status code and any field violations) instead of a bare `grpc.RpcError`. Requests and
results are built by `client.messages`, shared with the asyncio client (`client.aio.AsyncIceClient`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.longrunning import operations_pb2

from client import compose as C
from client import messages as M
from client import tracing
from client.channel import open_channel
from client.compose import LibraryConcept
from client.core import ClientCore, JobWatch, scaled_schedule
from client.errors import ServiceError
from client.longcalls import evaluate_timeout, localize_timeout
from client.messages import (  # noqa: F401  (re-exported: the names this module always had)
    EVALUATOR,
    LEARNER,
    LOCALIZER,
    OPERATIONS,
    evaluation_inputs,
    learning_request,
)
from client.messages import operation_progress as _operation_progress  # noqa: F401
from client.messages import safe_join as _safe_join  # noqa: F401
from client.options import ExtractOptions, GenerateOptions, LocalizeOptions, Schedule, image_bytes
from client.types import (
    Concept,
    EvaluationResult,
    Extraction,
    GeneratedImage,
    Job,
    JobPlan,
    JobProgress,
    LearningResult,
    LocalizeResult,
    MaskScores,
    SetEvaluationResult,
)
from ice.learner.v1 import learner_pb2


class IceClient(ClientCore):
    """Channels to the localizer, learner and evaluator, and one typed method per RPC.

    `localizer`, `learner`, `evaluator`: targets such as "host:port" or "dns:///svc.namespace:50051" (None =
    localhost and the service's default port). `token`, `tls` and the rest of the channel set-up come from
    `config` (a `ChannelConfig`) or the keyword arguments that mirror it. `timeout` is the deadline of each
    unary call in seconds.
    """

    # --- plumbing ------------------------------------------------------------------------------------------
    def _open(self, target: str) -> grpc.Channel:
        return open_channel(target, self.config)

    def _call(self, service: str, grpc_service: str, method: str, request, timeout: float | None | str = "default",
              channel=None, address: str | None = None):
        channel, address = self._route(service, channel, address)
        rpc = tracing.ClientRpc(f"{grpc_service}/{method}", address)
        try:
            response = self._method(channel, grpc_service, method)(request, timeout=self._deadline(timeout),
                                                                   metadata=rpc.metadata or None)
        except grpc.RpcError as error:
            failure = self._error(error, service)
            rpc.finish(failure.code, failure.details)
            raise failure from None
        rpc.finish()
        return response

    def _stream(self, service: str, grpc_service: str, method: str, request, timeout: float | None = None,
                channel=None, address: str | None = None) -> Iterator:
        channel, address = self._route(service, channel, address)
        rpc = tracing.ClientRpc(f"{grpc_service}/{method}", address)
        code, details = None, ""
        try:
            yield from self._method(channel, grpc_service, method)(request, timeout=timeout,
                                                                   metadata=rpc.metadata or None)
        except grpc.RpcError as error:
            failure = self._error(error, service)
            code, details = failure.code, failure.details
            raise failure from None
        except GeneratorExit:  # the caller stopped reading (the call is cancelled with the iterator)
            code, details = grpc.StatusCode.CANCELLED, "the caller stopped reading"
            raise
        finally:
            rpc.finish(code, details)

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
        request = M.SERVER_INFO_REQUESTS[service]()
        return M.server_info_dict(self._call(service, M.SERVICE_OF[service], "GetServerInfo", request))

    # --- localizer -----------------------------------------------------------------------------------------
    def localize(self, image: Any, options: LocalizeOptions | None = None) -> LocalizeResult:
        """Stage 1: the object-level concepts of one image (nouns and masks)."""
        r = self._call("localizer", LOCALIZER, "Localize", M.localize_request(image, options),
                       localize_timeout(self.config, options.max_rounds if options else None))
        return M.localize_result(r)

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
        op = self._call("learner", LEARNER, "CreateLearningJob", request)
        metadata = M.created_job_metadata(op)
        self._remember(op.name, metadata)
        return Job(op.name, metadata.replica_address)

    def plan_job(self, image: Any, concepts: Sequence[Concept] | Sequence[tuple[str, Any]], **options) -> JobPlan:
        """What `create_job` with the same arguments (`anchors`, `schedule`, `ablation`, ... as keywords) would do
        on the learner, without queuing anything: its steps, its class images (how many it uses, how many must be
        generated first and what that costs there), its memory estimate (PlanLearningJob). Refused exactly as
        `create_job` would be."""
        request = learning_request(image, concepts, **options)
        return M.job_plan(self._call("learner", LEARNER, "PlanLearningJob", M.plan_request(request)))

    def plan_or_none(self, *args, **kwargs) -> JobPlan | None:
        """`plan_job`, or None from a learner too old to plan (UNIMPLEMENTED)."""
        try:
            return self.plan_job(*args, **kwargs)
        except ServiceError as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise

    def job(self, job: Job | str) -> JobProgress:
        """The job's current progress (google.longrunning GetOperation)."""
        job, channel, address = self._job_route(job)
        op = self._call("learner", OPERATIONS, "GetOperation", operations_pb2.GetOperationRequest(name=job.name),
                        channel=channel, address=address)
        return M.operation_progress(op)

    def jobs(self, page_size: int = 100) -> list[JobProgress]:
        """Every job the learner knows (ListOperations, all pages)."""
        out, token = [], ""
        while True:
            r = self._call("learner", OPERATIONS, "ListOperations", M.list_operations_request(page_size, token))
            out += [M.operation_progress(op) for op in r.operations]
            token = r.next_page_token
            if not token:
                return out

    def watch(self, job: Job | str, timeout: float | None = None) -> Iterator[JobProgress]:
        """Progress of a job as it changes; the last item has `done` = True (WatchLearningJob). When the server
        closes the stream (UNAVAILABLE: a connection at its maximum age, a restart) it is re-opened, for as
        long as the job runs, and updates already seen are skipped (`client.longcalls.Resume`)."""
        watch = JobWatch(self, job, timeout)
        while True:
            try:
                for response in self._stream(*watch.stream()):
                    progress = watch.take(response)
                    if progress is not None:
                        yield progress
            except ServiceError as error:
                time.sleep(watch.after_error(error))
                continue
            delay = watch.after_end()
            if delay is None:
                return
            time.sleep(delay)

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
        return M.final_result(last)

    def cancel(self, job: Job | str) -> None:
        """Ask the job to stop; it ends CANCELLED within one training step."""
        job, channel, address = self._job_route(job)
        self._call("learner", OPERATIONS, "CancelOperation", operations_pb2.CancelOperationRequest(name=job.name),
                   channel=channel, address=address)

    def delete(self, job: Job | str) -> None:
        """Forget a finished job and its artifacts."""
        job, channel, address = self._job_route(job)
        self._call("learner", OPERATIONS, "DeleteOperation", operations_pb2.DeleteOperationRequest(name=job.name),
                   channel=channel, address=address)

    def artifacts(self, job: Job | str, out_dir: str | Path, files: Sequence[str] = ()) -> list[Path]:
        """Download the job's artifact files into `out_dir` (checked against their sha256, written atomically)."""
        job, channel, address = self._job_route(job)
        request = learner_pb2.GetArtifactsRequest(name=job.name, files=list(files))
        return self._download(out_dir, "GetArtifacts", request, channel, address)

    def _download(self, out_dir: str | Path, method: str, request, channel=None, address=None) -> list[Path]:
        """The files a GetArtifacts-shaped stream sends, written into `out_dir` (checked, atomically)."""
        writer = M.ArtifactWriter(out_dir, self.targets["learner"])
        try:
            for chunk in self._stream("learner", LEARNER, method, request, None, channel, address):
                writer.add(chunk)
        finally:
            writer.close()
        return writer.written

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
        job, channel, address = self._job_route(job)
        request, label = M.generate_request(job.name, kind, prompts, concept_ids, options)
        for r in self._stream("learner", LEARNER, "Generate", request, None, channel, address):
            yield M.generated_image(r, label)

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
        request = M.evaluate_request(source_image, concepts, composition_images, encoders, background_fill, crop)
        timeout = evaluate_timeout(self.config, M.image_count(request))
        limit = M.chunk_bytes(self.config.max_message_bytes)
        if request.ByteSize() > limit:  # too large for one message: one item of EvaluateSet, in parts
            response = self._call("evaluator", EVALUATOR, "EvaluateSet", M.evaluate_as_set(request, limit), timeout)
            return M.evaluation_result_of_set(response)
        return M.evaluation_result(self._call("evaluator", EVALUATOR, "Evaluate", request, timeout))

    def evaluate_set(
        self,
        items: Iterable[tuple[str, Any, Sequence[tuple[str, Any, Sequence[Any]]], Sequence[Any]]],
        encoders: Sequence[str] = (),
        background_fill: str | None = None,
        crop: str | None = None,
    ) -> SetEvaluationResult:
        """UCE metrics of a whole set (e.g. a benchmark), as the paper computes them: every concept's accuracy and
        rank measured among all the set's concepts. `items`: (item_id, source image, concepts, composition
        images) per source image, `concepts` as in `evaluate`; read lazily, one item at a time. An extraction
        folder gives one with `extraction_set_item(load_extraction(folder), item_id)`. An item too large for one
        message is sent in parts (`continuation`). The deadline grows with the images when `items` is a sequence;
        a one-pass iterable gets none."""
        requests = M.evaluate_set_requests(items, encoders, background_fill, crop,
                                           M.chunk_bytes(self.config.max_message_bytes))
        images = M.set_image_count(items)
        timeout = None if images is None else evaluate_timeout(self.config, images)
        return M.set_evaluation_result(self._call("evaluator", EVALUATOR, "EvaluateSet", requests, timeout))

    def score_masks(self, predicted: Sequence[Any], ground_truth: Sequence[Any]) -> MaskScores:
        """mIoU, recall and precision of predicted masks against ground truth, after Hungarian matching."""
        request = M.score_masks_request(predicted, ground_truth)
        return M.mask_scores(self._call("evaluator", EVALUATOR, "ScoreMasks", request))

    # --- the whole pipeline --------------------------------------------------------------------------------
    def learn(self, image: bytes, concepts: Sequence[Concept], options: ExtractOptions,
              progress: bool | Callable[[JobProgress], None], on_job: Callable[[str], None]) -> LearningResult:
        schedule = options.schedule
        if self._planning(options):  # the plan first: scaled with few_class_images, then told to on_plan
            plan = self.plan_or_none(image, concepts, anchors=options.anchors, schedule=schedule, seed=options.seed)
            if options.few_class_images:
                schedule = scaled_schedule(options.schedule, plan)
                plan = plan and self.plan_or_none(image, concepts, anchors=options.anchors, schedule=schedule,
                                                  seed=options.seed)
            if plan is not None and self.on_plan is not None:
                self.on_plan(plan)
        job = self.create_job(image, concepts, anchors=options.anchors, schedule=schedule, seed=options.seed)
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
        from client.pipeline import run_extraction, with_schedule

        return run_extraction(self, image_bytes(image), with_schedule(options, schedule), out_dir=out_dir,
                              progress=progress)

    # the interface `client.pipeline.run_extraction` drives (shared with `client.local.LocalIce`)
    def generate_for(self, job_id: str, kind: str, options: GenerateOptions, prompts: Sequence[str] = ()):
        return self.generate(job_id, kind, prompts=prompts, options=options)

    def cancel_job(self, job_id: str) -> None:
        self.cancel(job_id)


    # --- the concept library and composition (client/compose.py) ----------------------------------------------
    def concepts(self, filter: str = "", *, parent: str = "", full: bool = False,
                 page_size: int = 100) -> list[LibraryConcept]:
        """Every concept of the learner's library (ListConcepts, all pages): the concepts of every succeeded job
        of the fleet, oldest job first. `filter`: AIP-160 (`client.compose.filter_text` builds one); `parent`:
        "operations/ID" for one job's; `full`: with masks and source crops."""
        out, token = [], ""
        while True:
            request = learner_pb2.ListConceptsRequest(parent=parent, page_size=page_size, page_token=token,
                                                      filter=filter, view=C.view(full))
            r = self._call("learner", LEARNER, "ListConcepts", request)
            out += [C.library_concept(c) for c in r.concepts]
            token = r.next_page_token
            if not token:
                return out

    def concept(self, name: str, full: bool = True, aliases: dict[str, str] | None = None) -> LibraryConcept:
        """One concept by its resource name (or a token's), or as `JOB:CONCEPT` (GetConcept)."""
        if not name.startswith("operations/"):
            resolved, _ = self._resolved([C.parse_readable(C.braced(name))], aliases or {})
            name = C.single_ref(resolved[0], name).name
        request = learner_pb2.GetConceptRequest(name=name, view=C.view(full))
        return C.library_concept(self._call("learner", LEARNER, "GetConcept", request).concept)

    def _resolved(self, parsed: list[list], aliases: dict[str, str], jobs: Sequence[str | None] = ()):
        """(parsed prompts with their references resolved, the library concepts looked at)."""
        wanted = C.listing(parsed, aliases, list(jobs))
        known = self.concepts() if wanted is None else [
            c for j in wanted for c in self.concepts(parent=f"operations/{j}")]
        return [C.resolve(p, known, aliases) for p in parsed], known

    def _composition(self, prompts, delta, delta_job, options, aliases):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        parsed, known = self._resolved([C.parse_readable(p) for p in prompts], aliases or {}, [delta_job])
        wire = [C.wire_prompt(p) for p in parsed]
        request = C.composition_request(wire, delta, C.resolve_job(delta_job, known, aliases or {}), options)
        return request, dict(zip(wire, prompts, strict=True)), parsed

    def iter_compose(self, prompts: str | Sequence[str], *, delta: str = "tokens_only", delta_job: str | None = None,
                     options: GenerateOptions | None = None,
                     aliases: dict[str, str] | None = None) -> Iterator[C.ComposedImage]:
        """Images from prompts mixing the tokens of several jobs, as the server streams them (GenerateComposition).
        Prompts in the readable syntax, "a photo of {3f9a:c0} in {b07c:c1.color} color" (client/compose.py);
        `delta`: "tokens_only", "one_job" (`delta_job`'s delta) or "merged_lora"."""
        request, readable, _ = self._composition(prompts, delta, delta_job, options, aliases)
        for r in self._stream("learner", LEARNER, "GenerateComposition", request):
            yield C.composed_image(r, readable)

    def compose(self, prompts: str | Sequence[str], *, delta: str = "tokens_only", delta_job: str | None = None,
                options: GenerateOptions | None = None, aliases: dict[str, str] | None = None,
                out_dir: str | Path | None = None) -> C.Composition:
        """`iter_compose`, collected with the concepts it used (their source crops); with `out_dir`, its report
        (`composition.html`: each prompt's source crops beside its images)."""
        request, readable, parsed = self._composition(prompts, delta, delta_job, options, aliases)
        images = [C.composed_image(r, readable)
                  for r in self._stream("learner", LEARNER, "GenerateComposition", request)]
        concepts = [self.concept(n) for n in C.referenced_concepts(parsed)]
        result = C.Composition(list(readable.values()), list(request.prompts), delta, request.delta_job, images,
                               concepts)
        if out_dir is not None:
            C.write_composition(result, Path(out_dir))
        return result

    def export_concepts(self, refs: Sequence[str], out_dir: str | Path, *, delta: str = "tokens_only",
                        delta_job: str | None = None, prompt: str = "", options: GenerateOptions | None = None,
                        aliases: dict[str, str] | None = None) -> list[Path]:
        """Write a folder plain diffusers loads (ExportConcepts): each token's `learned_embeds.safetensors`, the
        delta, `concepts.json`, and `compose_example.py` rendering `prompt` (readable syntax). `refs`: `JOB:C`
        (a concept: all its tokens) or `JOB:C.ATTRIBUTE`, or resource names."""
        parsed = [C.parse_readable(C.braced(r)) for r in refs] + ([C.parse_readable(prompt)] if prompt else [])
        resolved, known = self._resolved(parsed, aliases or {}, [delta_job])
        names = [C.single_ref(p, r).name for p, r in zip(resolved, refs, strict=False)]
        request = C.export_request(names, delta, C.resolve_job(delta_job, known, aliases or {}),
                                   C.wire_prompt(resolved[-1]) if prompt else "", options)
        return self._download(out_dir, "ExportConcepts", request)
