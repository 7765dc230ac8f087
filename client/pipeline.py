"""The extraction pipeline, written once for every back-end: the services (`IceClient`, and `AsyncIceClient` on
asyncio) and in-process (`client.local.LocalIce`).

localize -> learn -> generate (per concept: the object-level prompt "a photo of <&i><#i><%i><$i>" and the
intrinsic prompts "a <#i> texture", ..., "a <&i>", as ICE's inference script (docs/method.md#generation);
plus "a photo of <&0> and <&1> ..." over all the concepts, or "a photo of <&0>" for a single one, for SIM^C) ->
evaluate (the object-level images of each concept against its masked source region;
docs/method.md#evaluation).

A back-end provides `localize(image, LocalizeOptions)`, `learn(image, concepts, ExtractOptions, progress,
on_job)`, `generate_for(job_id, kind, GenerateOptions, prompts)`, `evaluate(...)` and `cancel_job(job_id)`:
plain methods (`run_extraction`) or coroutines (`run_extraction_async`). The steps themselves are one generator
(`_steps`) that yields each back-end call and receives its result, so both drivers run the same code.

With tracing on (client/tracing.py), an extraction is one trace: an `ice.extract` span with a child span per
stage, under which every call's CLIENT span sits, and the services' spans under those.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from client import tracing
from client.errors import IceClientError
from client.options import ExtractOptions, Schedule
from client.types import Extraction, JobProgress, LearningResult


class Cancelled(IceClientError):
    """The caller asked the extraction to stop (Ctrl-C in `ice batch`)."""


def composition_prompt(learning: LearningResult) -> str | None:
    """"a photo of <&0> and <&1>" over the concept tokens (for SIM^C); with one concept "a photo of <&0>", the
    composition of that image's only concept, so that SIM^C is defined for it too; None without concepts."""
    tokens = [t.token for t in learning.tokens if t.role == "CONCEPT"]
    return "a photo of " + " and ".join(tokens) if tokens else None


def with_schedule(options: ExtractOptions | None, schedule: Schedule | None) -> ExtractOptions:
    """`options` (default: `ExtractOptions()`) with `schedule` in place of its own, when one is given."""
    options = options or ExtractOptions()
    return options if schedule is None else replace(options, schedule=schedule)


@dataclass
class _Call:
    """One step for a driver: `backend.<method>(*args)`, or `local(*args)` (file work: a thread on asyncio)."""

    method: str
    args: tuple
    local: Callable | None = None


def _steps(
    image: bytes,
    options: ExtractOptions,
    out_dir: str | Path | None,
    progress: bool | Callable[[JobProgress], None],
    cancel: threading.Event,
    on_stage: Callable[[str], None] | None,
    cancel_job: Callable[[str], None],
) -> Generator[_Call, Any, Extraction]:
    seconds: dict[str, float] = {}
    job: dict[str, str] = {}

    def stage(name: str):
        if cancel.is_set():
            raise Cancelled("extraction cancelled")
        if on_stage is not None:
            on_stage(name)
        return _Stage(seconds, name)

    with stage("localize"):
        localization = yield _Call("localize", (image, options.localize))
    extraction = Extraction(localization, None, None, [], None, seconds, image_png=image)
    if localization.concepts:
        from client.progress import progress_reporter

        with stage("learn"), progress_reporter(progress) as report:
            def on_progress(p: JobProgress) -> None:
                report(p)
                if cancel.is_set() and "cancelled" not in job:
                    job["cancelled"] = "1"
                    cancel_job(job["name"])

            try:
                learning = yield _Call("learn", (image, localization.concepts, options, on_progress,
                                                 lambda name: job.setdefault("name", name)))
            except IceClientError:
                if cancel.is_set():
                    raise Cancelled("extraction cancelled while learning") from None
                raise
        extraction.job_id = job.get("name")
        extraction.learning = learning
        with stage("generate"):
            for kind in ("object_level", "intrinsic"):
                extraction.generated += yield _Call("generate_for", (job["name"], kind, options.generate))
            prompt = composition_prompt(learning) if options.composition else None
            if prompt:
                extraction.generated += yield _Call("generate_for", (job["name"], "free", options.generate, [prompt]))
        if options.evaluate:
            from client.messages import evaluation_inputs

            with stage("evaluate"):
                composition = [g.image_png for g in extraction.generated if g.kind == "FREE"]
                extraction.evaluation = yield _Call("evaluate", (
                    image, evaluation_inputs(localization.concepts, extraction.generated), composition,
                    options.encoders))
    if out_dir is not None:
        from client.report import write_extraction

        with stage("report"):
            yield _Call("report", (extraction, Path(out_dir)), local=write_extraction)
    return extraction


def run_extraction(
    backend,
    image: bytes,
    options: ExtractOptions,
    out_dir: str | Path | None = None,
    progress: bool | Callable[[JobProgress], None] = True,
    cancel: threading.Event | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Extraction:
    """The extraction on a back-end with plain methods (`IceClient`, `LocalIce`). `cancel`: set it (from
    another thread) to stop before the next stage, cancelling a learning job in progress."""
    steps = _steps(image, options, out_dir, progress, cancel or threading.Event(), on_stage,
                   lambda job_name: backend.cancel_job(job_name))
    with tracing.span("ice.extract", {"ice.image_bytes": len(image)}):
        value, error = None, None
        while True:
            try:
                call = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as stop:
                return stop.value
            try:
                value = (call.local or getattr(backend, call.method))(*call.args)
                error = None
            except BaseException as exc:  # into the steps, so that their stage and progress blocks close
                value, error = None, exc


async def run_extraction_async(
    backend,
    image: bytes,
    options: ExtractOptions,
    out_dir: str | Path | None = None,
    progress: bool | Callable[[JobProgress], None] = True,
    on_stage: Callable[[str], None] | None = None,
) -> Extraction:
    """The same extraction on a back-end whose methods are coroutines (`AsyncIceClient`). Cancel the task to
    stop it: the back-end cancels a learning job in progress (see `AsyncIceClient.learn`)."""
    steps = _steps(image, options, out_dir, progress, threading.Event(), on_stage, _no_cancel)
    with tracing.span("ice.extract", {"ice.image_bytes": len(image)}):
        value, error = None, None
        while True:
            try:
                call = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as stop:
                return stop.value
            try:
                if call.local is not None:
                    value = await asyncio.to_thread(call.local, *call.args)
                else:
                    value = await getattr(backend, call.method)(*call.args)
                error = None
            except BaseException as exc:  # CancelledError too: the steps' blocks close, then it goes on up
                value, error = None, exc


def _no_cancel(_job: str) -> None:  # asyncio extractions stop by task cancellation, never through this hook
    raise AssertionError("unreachable: the asyncio driver never sets the cancel event")


class _Stage:
    """Times a stage into `seconds[name]` and traces it as a span `extract.<name>`."""

    def __init__(self, into: dict[str, float], name: str):
        self.into, self.name = into, name
        self._span = tracing.span(f"extract.{name}")

    def __enter__(self):
        self.start = time.perf_counter()
        self._span.__enter__()
        return self

    def __exit__(self, *exc):
        self.into[self.name] = round(time.perf_counter() - self.start, 3)
        self._span.__exit__(*exc)
        return False
