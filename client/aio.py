"""`AsyncIceClient`: the SDK on asyncio (`grpc.aio`), with the surface of `IceClient`.

    from client.aio import AsyncIceClient

    async with AsyncIceClient(localizer="localhost:50051", learner="localhost:50052",
                              evaluator="localhost:50053") as ice:
        x = await ice.extract("photo.jpg", out_dir="result/")
        loc = await ice.localize("photo.jpg")
        job = await ice.create_job("photo.jpg", loc.concepts)
        async for p in ice.watch(job):
            print(p.line())

Requests and results are the sync client's (`client.messages`, `client.types`); channels are configured by the
same `ChannelConfig` (retries on UNAVAILABLE only, TLS, mutual TLS, bearer token, deadlines, message sizes); the
extraction runs the same steps (`client.pipeline`). Cancelling the task of `extract`, `learn` or `wait`... while a
learning job runs cancels the job too (`learn`), so nothing trains for nobody. Artifact files are written as
their chunks arrive, from the event loop (small local writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.longrunning import operations_pb2

from client import compose as C
from client import messages as M
from client import tracing
from client.channel import open_aio_channel
from client.compose import LibraryConcept
from client.core import ClientCore, JobWatch, scaled_schedule
from client.errors import IceClientError, ServiceError
from client.longcalls import evaluate_timeout, localize_timeout
from client.messages import EVALUATOR, LEARNER, LOCALIZER, OPERATIONS, learning_request
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


class AsyncIceClient(ClientCore):
    """Channels to the localizer, learner and evaluator, and one awaitable method per RPC (async iterators for
    the streams). Takes the arguments of `IceClient`. Use it from one event loop (the one that made its first
    call); `await close()` or `async with` releases the channels."""

    # --- plumbing ------------------------------------------------------------------------------------------
    def _open(self, target: str) -> grpc.aio.Channel:
        return open_aio_channel(target, self.config)

    async def _call(self, service: str, grpc_service: str, method: str, request,
                    timeout: float | None | str = "default", channel=None, address: str | None = None):
        channel, address = self._route(service, channel, address)
        rpc = tracing.ClientRpc(f"{grpc_service}/{method}", address)
        try:
            response = await self._method(channel, grpc_service, method)(
                request, timeout=self._deadline(timeout), metadata=rpc.metadata or None)
        except grpc.RpcError as error:
            failure = self._error(error, service)
            rpc.finish(failure.code, failure.details)
            raise failure from None
        except asyncio.CancelledError:
            rpc.finish(grpc.StatusCode.CANCELLED, "the caller's task was cancelled")
            raise
        rpc.finish()
        return response

    async def _stream(self, service: str, grpc_service: str, method: str, request, timeout: float | None = None,
                      channel=None, address: str | None = None) -> AsyncIterator:
        channel, address = self._route(service, channel, address)
        rpc = tracing.ClientRpc(f"{grpc_service}/{method}", address)
        call = self._method(channel, grpc_service, method)(request, timeout=timeout, metadata=rpc.metadata or None)
        code, details = None, ""
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            failure = self._error(error, service)
            code, details = failure.code, failure.details
            raise failure from None
        except (asyncio.CancelledError, GeneratorExit):
            code, details = grpc.StatusCode.CANCELLED, "the caller stopped reading"
            raise
        finally:
            call.cancel()  # a no-op once the stream has ended; stops the server's work when the reader left early
            rpc.finish(code, details)

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> AsyncIceClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def server_info(self, service: str) -> dict[str, Any]:
        """GetServerInfo of "localizer", "learner" or "evaluator", as a dict."""
        request = M.SERVER_INFO_REQUESTS[service]()
        return M.server_info_dict(await self._call(service, M.SERVICE_OF[service], "GetServerInfo", request))

    # --- localizer -----------------------------------------------------------------------------------------
    async def localize(self, image: Any, options: LocalizeOptions | None = None) -> LocalizeResult:
        """Stage 1: the object-level concepts of one image (nouns and masks)."""
        r = await self._call("localizer", LOCALIZER, "Localize", M.localize_request(image, options),
                             localize_timeout(self.config, options.max_rounds if options else None))
        return M.localize_result(r)

    # --- learner -------------------------------------------------------------------------------------------
    async def create_job(
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
        """Queue a learning job (see `IceClient.create_job`)."""
        request = learning_request(image, concepts, anchors=anchors, schedule=schedule, ablation=ablation,
                                   refinement_delta=refinement_delta, lora_rank=lora_rank, seed=seed,
                                   request_id=request_id or str(uuid.uuid4()))
        op = await self._call("learner", LEARNER, "CreateLearningJob", request)
        metadata = M.created_job_metadata(op)
        self._remember(op.name, metadata)
        return Job(op.name, metadata.replica_address)

    async def plan_job(self, image: Any, concepts: Sequence[Concept] | Sequence[tuple[str, Any]],
                       **options) -> JobPlan:
        """What `create_job` would do, without queuing anything (see `IceClient.plan_job`)."""
        request = learning_request(image, concepts, **options)
        return M.job_plan(await self._call("learner", LEARNER, "PlanLearningJob", M.plan_request(request)))

    async def plan_or_none(self, *args, **kwargs) -> JobPlan | None:
        """`plan_job`, or None from a learner too old to plan (UNIMPLEMENTED)."""
        try:
            return await self.plan_job(*args, **kwargs)
        except ServiceError as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise

    async def job(self, job: Job | str) -> JobProgress:
        """The job's current progress (google.longrunning GetOperation)."""
        job, channel, address = self._job_route(job)
        op = await self._call("learner", OPERATIONS, "GetOperation",
                              operations_pb2.GetOperationRequest(name=job.name), channel=channel, address=address)
        return M.operation_progress(op)

    async def jobs(self, page_size: int = 100) -> list[JobProgress]:
        """Every job the learner knows (ListOperations, all pages)."""
        out, token = [], ""
        while True:
            r = await self._call("learner", OPERATIONS, "ListOperations", M.list_operations_request(page_size, token))
            out += [M.operation_progress(op) for op in r.operations]
            token = r.next_page_token
            if not token:
                return out

    async def watch(self, job: Job | str, timeout: float | None = None) -> AsyncIterator[JobProgress]:
        """Progress of a job as it changes; the last item has `done` = True (WatchLearningJob). A stream the server
        closes (UNAVAILABLE) is re-opened for as long as the job runs, as `IceClient.watch` does."""
        watch = JobWatch(self, job, timeout)
        while True:
            try:
                async with contextlib.aclosing(self._stream(*watch.stream())) as stream:
                    async for response in stream:
                        progress = watch.take(response)
                        if progress is not None:
                            yield progress
            except ServiceError as error:
                await asyncio.sleep(watch.after_error(error))
                continue
            delay = watch.after_end()
            if delay is None:
                return
            await asyncio.sleep(delay)

    async def wait(self, job: Job | str, progress: bool | Callable[[JobProgress], None] = False,
                   timeout: float | None = None) -> LearningResult:
        """Follow the job to its end; return its result or raise `JobFailed`."""
        from client.progress import progress_reporter

        last = None
        with progress_reporter(progress) as report:
            async with contextlib.aclosing(self.watch(job, timeout)) as updates:
                async for last in updates:
                    report(last)
        if last is None or not last.done:  # the stream ended early: ask once more
            last = await self.job(job)
        return M.final_result(last)

    async def cancel(self, job: Job | str) -> None:
        """Ask the job to stop; it ends CANCELLED within one training step."""
        job, channel, address = self._job_route(job)
        await self._call("learner", OPERATIONS, "CancelOperation",
                         operations_pb2.CancelOperationRequest(name=job.name), channel=channel, address=address)

    async def delete(self, job: Job | str) -> None:
        """Forget a finished job and its artifacts."""
        job, channel, address = self._job_route(job)
        await self._call("learner", OPERATIONS, "DeleteOperation",
                         operations_pb2.DeleteOperationRequest(name=job.name), channel=channel, address=address)

    async def artifacts(self, job: Job | str, out_dir: str | Path, files: Sequence[str] = ()) -> list[Path]:
        """Download the job's artifact files into `out_dir` (checked against their sha256, written atomically)."""
        job, channel, address = self._job_route(job)
        request = learner_pb2.GetArtifactsRequest(name=job.name, files=list(files))
        return await self._download(out_dir, "GetArtifacts", request, channel, address)

    async def _download(self, out_dir: str | Path, method: str, request, channel=None, address=None) -> list[Path]:
        """The files a GetArtifacts-shaped stream sends, written into `out_dir` (checked, atomically)."""
        writer = M.ArtifactWriter(out_dir, self.targets["learner"])
        stream = self._stream("learner", LEARNER, method, request, None, channel, address)
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    writer.add(chunk)
        finally:
            writer.close()
        return writer.written

    async def iter_generate(
        self,
        job: Job | str,
        kind: str = "object_level",
        prompts: Sequence[str] = (),
        concept_ids: Sequence[str] = (),
        options: GenerateOptions | None = None,
    ) -> AsyncIterator[GeneratedImage]:
        """Images from the job's learned tokens, as the server streams them (see `IceClient.iter_generate`)."""
        job, channel, address = self._job_route(job)
        request, label = M.generate_request(job.name, kind, prompts, concept_ids, options)
        stream = self._stream("learner", LEARNER, "Generate", request, None, channel, address)
        async with contextlib.aclosing(stream):
            async for r in stream:
                yield M.generated_image(r, label)

    async def generate(self, job: Job | str, kind: str = "object_level", prompts: Sequence[str] = (),
                       concept_ids: Sequence[str] = (), options: GenerateOptions | None = None) -> list[GeneratedImage]:
        return [g async for g in self.iter_generate(job, kind, prompts, concept_ids, options)]

    # --- evaluator -----------------------------------------------------------------------------------------
    async def evaluate(
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
            response = await self._call("evaluator", EVALUATOR, "EvaluateSet", M.evaluate_as_set(request, limit),
                                        timeout)
            return M.evaluation_result_of_set(response)
        return M.evaluation_result(await self._call("evaluator", EVALUATOR, "Evaluate", request, timeout))

    async def evaluate_set(
        self,
        items: Iterable[tuple[str, Any, Sequence[tuple[str, Any, Sequence[Any]]], Sequence[Any]]],
        encoders: Sequence[str] = (),
        background_fill: str | None = None,
        crop: str | None = None,
    ) -> SetEvaluationResult:
        """UCE metrics of a whole set, accuracy among all its concepts (see `IceClient.evaluate_set`)."""
        requests = M.evaluate_set_requests(items, encoders, background_fill, crop,
                                           M.chunk_bytes(self.config.max_message_bytes))
        images = M.set_image_count(items)
        timeout = None if images is None else evaluate_timeout(self.config, images)
        return M.set_evaluation_result(await self._call("evaluator", EVALUATOR, "EvaluateSet", requests, timeout))

    async def score_masks(self, predicted: Sequence[Any], ground_truth: Sequence[Any]) -> MaskScores:
        """mIoU, recall and precision of predicted masks against ground truth, after Hungarian matching."""
        request = M.score_masks_request(predicted, ground_truth)
        return M.mask_scores(await self._call("evaluator", EVALUATOR, "ScoreMasks", request))

    # --- the whole pipeline --------------------------------------------------------------------------------
    async def learn(self, image: bytes, concepts: Sequence[Concept], options: ExtractOptions,
                    progress: bool | Callable[[JobProgress], None], on_job: Callable[[str], None]) -> LearningResult:
        """Create the job and wait for it; when the task is cancelled meanwhile, the job is cancelled too."""
        schedule = options.schedule
        if self._planning(options):  # the plan first: scaled with few_class_images, then told to on_plan
            plan = await self.plan_or_none(image, concepts, anchors=options.anchors, schedule=schedule,
                                           seed=options.seed)
            if options.few_class_images:
                schedule = scaled_schedule(options.schedule, plan)
                plan = plan and await self.plan_or_none(image, concepts, anchors=options.anchors, schedule=schedule,
                                                        seed=options.seed)
            if plan is not None and self.on_plan is not None:
                self.on_plan(plan)
        job = await self.create_job(image, concepts, anchors=options.anchors, schedule=schedule,
                                    seed=options.seed)
        on_job(job.name)
        try:
            return await self.wait(job, progress=progress)
        except asyncio.CancelledError:
            with contextlib.suppress(IceClientError, asyncio.CancelledError):
                await asyncio.shield(self.cancel(job))
            raise

    async def extract(
        self,
        image: Any,
        out_dir: str | Path | None = None,
        schedule: Schedule | None = None,
        progress: bool | Callable[[JobProgress], None] = True,
        options: ExtractOptions | None = None,
    ) -> Extraction:
        """localize -> learn -> generate -> evaluate, as `IceClient.extract` (the report is written in a thread)."""
        from client.pipeline import run_extraction_async, with_schedule

        return await run_extraction_async(self, image_bytes(image), with_schedule(options, schedule),
                                          out_dir=out_dir, progress=progress)

    # the interface `client.pipeline.run_extraction_async` drives
    async def generate_for(self, job_id: str, kind: str, options: GenerateOptions, prompts: Sequence[str] = ()):
        return await self.generate(job_id, kind, prompts=prompts, options=options)

    async def cancel_job(self, job_id: str) -> None:
        await self.cancel(job_id)

    # --- the concept library and composition (client/compose.py; see `IceClient`) -----------------------------
    async def concepts(self, filter: str = "", *, parent: str = "", full: bool = False,
                       page_size: int = 100) -> list[LibraryConcept]:
        """Every concept of the learner's library (ListConcepts, all pages); see `IceClient.concepts`."""
        out, token = [], ""
        while True:
            request = learner_pb2.ListConceptsRequest(parent=parent, page_size=page_size, page_token=token,
                                                      filter=filter, view=C.view(full))
            r = await self._call("learner", LEARNER, "ListConcepts", request)
            out += [C.library_concept(c) for c in r.concepts]
            token = r.next_page_token
            if not token:
                return out

    async def concept(self, name: str, full: bool = True, aliases: dict[str, str] | None = None) -> LibraryConcept:
        """One concept by its resource name (or a token's), or as `JOB:CONCEPT` (GetConcept)."""
        if not name.startswith("operations/"):
            resolved, _ = await self._resolved([C.parse_readable(C.braced(name))], aliases or {})
            name = C.single_ref(resolved[0], name).name
        request = learner_pb2.GetConceptRequest(name=name, view=C.view(full))
        return C.library_concept((await self._call("learner", LEARNER, "GetConcept", request)).concept)

    async def _resolved(self, parsed: list[list], aliases: dict[str, str], jobs: Sequence[str | None] = ()):
        wanted = C.listing(parsed, aliases, list(jobs))
        if wanted is None:
            known = await self.concepts()
        else:
            known = [c for j in wanted for c in await self.concepts(parent=f"operations/{j}")]
        return [C.resolve(p, known, aliases) for p in parsed], known

    async def _composition(self, prompts, delta, delta_job, options, aliases):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        parsed, known = await self._resolved([C.parse_readable(p) for p in prompts], aliases or {}, [delta_job])
        wire = [C.wire_prompt(p) for p in parsed]
        request = C.composition_request(wire, delta, C.resolve_job(delta_job, known, aliases or {}), options)
        return request, dict(zip(wire, prompts, strict=True)), parsed

    async def iter_compose(self, prompts: str | Sequence[str], *, delta: str = "tokens_only",
                           delta_job: str | None = None, options: GenerateOptions | None = None,
                           aliases: dict[str, str] | None = None) -> AsyncIterator[C.ComposedImage]:
        """Images from prompts mixing the tokens of several jobs (see `IceClient.iter_compose`)."""
        request, readable, _ = await self._composition(prompts, delta, delta_job, options, aliases)
        stream = self._stream("learner", LEARNER, "GenerateComposition", request)
        async with contextlib.aclosing(stream):
            async for r in stream:
                yield C.composed_image(r, readable)

    async def compose(self, prompts: str | Sequence[str], *, delta: str = "tokens_only",
                      delta_job: str | None = None, options: GenerateOptions | None = None,
                      aliases: dict[str, str] | None = None, out_dir: str | Path | None = None) -> C.Composition:
        """`iter_compose` collected, with its concepts and (with `out_dir`) its report; see `IceClient.compose`."""
        request, readable, parsed = await self._composition(prompts, delta, delta_job, options, aliases)
        stream = self._stream("learner", LEARNER, "GenerateComposition", request)
        async with contextlib.aclosing(stream):
            images = [C.composed_image(r, readable) async for r in stream]
        concepts = [await self.concept(n) for n in C.referenced_concepts(parsed)]
        result = C.Composition(list(readable.values()), list(request.prompts), delta, request.delta_job, images,
                               concepts)
        if out_dir is not None:
            await asyncio.to_thread(C.write_composition, result, Path(out_dir))
        return result

    async def export_concepts(self, refs: Sequence[str], out_dir: str | Path, *, delta: str = "tokens_only",
                              delta_job: str | None = None, prompt: str = "", options: GenerateOptions | None = None,
                              aliases: dict[str, str] | None = None) -> list[Path]:
        """Write a folder plain diffusers loads (see `IceClient.export_concepts`)."""
        parsed = [C.parse_readable(C.braced(r)) for r in refs] + ([C.parse_readable(prompt)] if prompt else [])
        resolved, known = await self._resolved(parsed, aliases or {}, [delta_job])
        names = [C.single_ref(p, r).name for p, r in zip(resolved, refs, strict=False)]
        request = C.export_request(names, delta, C.resolve_job(delta_job, known, aliases or {}),
                                   C.wire_prompt(resolved[-1]) if prompt else "", options)
        return await self._download(out_dir, "ExportConcepts", request)
