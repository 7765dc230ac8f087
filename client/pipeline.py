"""The extraction pipeline, written once for both back-ends: the services (`IceClient`) and in-process
(`client.local.LocalIce`).

localize -> learn -> generate (per concept: the object-level prompt "a photo of <&i><#i><%i><$i>" and the
intrinsic prompts "a <#i> texture", ..., "a <&i>", as ICE's inference script; ICE_REFERENCE B §4; plus, when
there are several concepts, "a photo of <&0> and <&1> ..." for SIM^C) -> evaluate (the object-level images
of each concept against its masked source region; B §5).

A back-end provides `localize(image, LocalizeOptions)`, `learn(image, concepts, ExtractOptions, progress,
on_job)`, `generate_for(job_id, kind, GenerateOptions, prompts)`, `evaluate(...)` and `cancel_job(job_id)`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from client.errors import IceClientError
from client.options import ExtractOptions
from client.types import Extraction, JobProgress, LearningResult


class Cancelled(IceClientError):
    """The caller asked the extraction to stop (Ctrl-C in `ice batch`)."""


def composition_prompt(learning: LearningResult) -> str | None:
    """"a photo of <&0> and <&1>" over the concept tokens, or None with fewer than two concepts."""
    tokens = [t.token for t in learning.tokens if t.role == "CONCEPT"]
    return "a photo of " + " and ".join(tokens) if len(tokens) > 1 else None


def run_extraction(
    backend,
    image: bytes,
    options: ExtractOptions,
    out_dir: str | Path | None = None,
    progress: bool | Callable[[JobProgress], None] = True,
    cancel: threading.Event | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Extraction:
    cancel = cancel or threading.Event()
    seconds: dict[str, float] = {}
    job: dict[str, str] = {}

    def stage(name: str):
        if cancel.is_set():
            raise Cancelled("extraction cancelled")
        if on_stage is not None:
            on_stage(name)
        return _Timer(seconds, name)

    with stage("localize"):
        localization = backend.localize(image, options.localize)
    extraction = Extraction(localization, None, None, [], None, seconds, image_png=image)
    if localization.concepts:
        from client.progress import progress_reporter

        with stage("learn"), progress_reporter(progress) as report:
            def on_progress(p: JobProgress) -> None:
                report(p)
                if cancel.is_set() and "cancelled" not in job:
                    job["cancelled"] = "1"
                    backend.cancel_job(job["name"])

            try:
                learning = backend.learn(image, localization.concepts, options, on_progress,
                                         lambda name: job.setdefault("name", name))
            except IceClientError:
                if cancel.is_set():
                    raise Cancelled("extraction cancelled while learning") from None
                raise
        extraction.job_id = job.get("name")
        extraction.learning = learning
        with stage("generate"):
            for kind in ("object_level", "intrinsic"):
                extraction.generated += backend.generate_for(job["name"], kind, options.generate)
            prompt = composition_prompt(learning) if options.composition else None
            if prompt:
                extraction.generated += backend.generate_for(job["name"], "free", options.generate, [prompt])
        if options.evaluate:
            from client.sdk import evaluation_inputs

            with stage("evaluate"):
                composition = [g.image_png for g in extraction.generated if g.kind == "FREE"]
                extraction.evaluation = backend.evaluate(
                    image, evaluation_inputs(localization.concepts, extraction.generated), composition,
                    options.encoders)
    if out_dir is not None:
        from client.report import write_extraction

        with stage("report"):
            write_extraction(extraction, Path(out_dir))
    return extraction


class _Timer:
    def __init__(self, into: dict[str, float], name: str):
        self.into, self.name = into, name

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.into[self.name] = round(time.perf_counter() - self.start, 3)
        return False
