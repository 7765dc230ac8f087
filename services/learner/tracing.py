"""Traces of learning jobs: the learner's `JobManager` with a `learn` span per run of a job, in the trace of the
CreateLearningJob call that queued it (a job outlives that call: it runs later, on the runner thread), and a
child span per phase (`learn.preparing`, `learn.object_level`, `learn.intrinsic`, `learn.refinement`,
`learn.finishing`). Used in place of `JobManager` only when tracing is on (services/common/tracing.py).

The link to the creating call is kept in memory: a job resumed after a restart starts a trace of its own.
"""

from __future__ import annotations

import threading

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, Status, StatusCode

from services.common.tracing import tracer
from services.learner.jobs import FAILED, JobManager, JobRecord


class TracedJobManager(JobManager):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tracer = tracer("learner")
        self._trace_lock = threading.Lock()
        self._creators: dict[str, trace.SpanContext] = {}  # job id -> the span of the call that created it
        self._job_spans: dict[str, trace.Span] = {}
        self._phase_spans: dict[str, tuple[str, trace.Span]] = {}

    def submit(self, spec, request_id: str = "", request_digest: str = "", memory_estimate: int = 0,
               source_sha256: str = "") -> JobRecord:
        record = super().submit(spec, request_id, request_digest, memory_estimate, source_sha256)
        creator = trace.get_current_span().get_span_context()
        if creator.is_valid:
            with self._trace_lock:
                self._creators.setdefault(record.id, creator)  # a repeated request_id keeps the first trace
        return record

    def _run(self, record: JobRecord) -> None:
        with self._trace_lock:
            creator = self._creators.pop(record.id, None)
        parent = trace.set_span_in_context(NonRecordingSpan(creator)) if creator is not None else None
        attributes = {"ice.job_id": record.id, "ice.total_steps": record.total_steps}
        with self._tracer.start_as_current_span("learn", context=parent, attributes=attributes) as span:
            self._job_spans[record.id] = span
            try:
                super()._run(record)
            finally:
                self._end_phase(record.id)
                self._job_spans.pop(record.id, None)
                final = self._jobs.get(record.id)
                if final is not None:
                    span.set_attribute("ice.job_state", final.state)
                    span.set_attribute("ice.steps_done", final.step)
                    if final.state == FAILED:
                        span.set_status(Status(StatusCode.ERROR, final.error_code or "FAILED"))

    def _update(self, job_id: str, **changes) -> JobRecord:
        record = super()._update(job_id, **changes)
        phase = changes.get("phase")
        job_span = self._job_spans.get(job_id)
        if phase and job_span is not None:
            current = self._phase_spans.get(job_id)
            if current is None or current[0] != phase:
                self._end_phase(job_id)
                span = self._tracer.start_span(f"learn.{phase}", context=trace.set_span_in_context(job_span),
                                               attributes={"ice.job_id": job_id, "ice.phase": phase,
                                                           "ice.first_step": record.step})
                self._phase_spans[job_id] = (phase, span)
        return record

    def _end_phase(self, job_id: str) -> None:
        current = self._phase_spans.pop(job_id, None)
        if current is not None:
            record = self._jobs.get(job_id)
            if record is not None:
                current[1].set_attribute("ice.last_step", record.step)
            current[1].end()
