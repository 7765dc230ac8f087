"""OpenTelemetry tracing of the services: a SERVER span per RPC in the caller's trace (W3C `traceparent` from the
call's metadata), and the helpers the servicers use for their stage spans.

Off by default: `start_server` installs the interceptor only once a tracer provider exists, which
`configure_from_env` (ice/wire.py, shared with the SDK) installs when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`,
`console`, ...; every other setting comes from the standard `OTEL_*` variables, see docs/client.md). Each
process is its own `service.name` (`ice-localizer`, `ice-learner`, `ice-evaluator` unless `OTEL_SERVICE_NAME`
says otherwise); spans of each service come from a tracer of the same name.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ice.wire import TracingConfigError, configure_from_env, extract, is_configured, rpc_attributes
from services.common.interceptors import _code_name, _wrap

__all__ = ["TracingConfigError", "TracingInterceptor", "configure_for", "record_localize_stages", "tracer"]


def tracer(service: str) -> trace.Tracer:
    """The tracer of one service ("localizer", "learner", "evaluator"): instrumentation scope `ice.<service>`."""
    return trace.get_tracer(f"ice.{service}", "0.1.0")


def configure_for(service: str) -> bool:
    """Set up export from the `OTEL_*` variables for a service process; True when tracing is on (by them, or by
    a provider installed before, as tests do). Raises `TracingConfigError` for an exporter that is missing."""
    configure_from_env(f"ice-{service}")
    return is_configured()


class TracingInterceptor(grpc.ServerInterceptor):
    """Outermost interceptor: every RPC is a SERVER span, child of the caller's span when the call carries one,
    current while the servicer runs (so its stage spans nest under it), with the gRPC status code."""

    def __init__(self, service: str):
        self._tracer = tracer(service)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        name = method.lstrip("/")
        attributes = rpc_attributes(method)
        metadata = handler_call_details.invocation_metadata

        def start():
            return self._tracer.start_span(name, context=extract(metadata), kind=SpanKind.SERVER, attributes=attributes)

        def wrap_unary(behaviour):
            def wrapped(request, context):
                span = start()
                token = otel_context.attach(trace.set_span_in_context(span))
                exc = None
                try:
                    return behaviour(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    otel_context.detach(token)
                    _finish(span, context, exc)

            return wrapped

        def wrap_stream(behaviour):
            # The span is current only while the servicer computes the next message: between messages the
            # thread is gRPC's, and a stream abandoned by its caller may be closed from another thread.
            def wrapped(request, context):
                span = start()
                current = trace.set_span_in_context(span)
                exc = None
                try:
                    token = otel_context.attach(current)
                    try:
                        responses = iter(behaviour(request, context))
                    finally:
                        otel_context.detach(token)
                    while True:
                        token = otel_context.attach(current)
                        try:
                            response = next(responses)
                        except StopIteration:
                            return
                        finally:
                            otel_context.detach(token)
                        yield response
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    _finish(span, context, exc)

            return wrapped

        return _wrap(handler, wrap_unary, wrap_stream)


def _finish(span: trace.Span, context: grpc.ServicerContext, exc: BaseException | None) -> None:
    code = _code_name(context, exc)  # a stream gRPC stopped reading (GeneratorExit) is its caller's CANCELLED
    number = grpc.StatusCode[code].value[0] if code in grpc.StatusCode.__members__ else 2
    span.set_attribute("rpc.grpc.status_code", number)
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, code))
    span.end()


def record_localize_stages(service_tracer: trace.Tracer, timings: Sequence[tuple[str, float]],
                           round_starts_ns: Sequence[int], returned_ns: int) -> None:
    """Spans for the localizer's loop from the stage timings it reports (retrieve, attention, segment per round;
    then masks), under the current span.

    The loop measures each stage's duration itself and runs its stages back to back; `round_starts_ns` are the
    wall-clock times at which each round began (the loop calls its `check` hook there) and `returned_ns` the
    time it returned, so every span starts where the previous stage of its round ended (the work between two
    stages is a few array operations)."""
    rounds = iter(round_starts_ns)
    parent_round, cursor, index = None, None, -1
    for stage, seconds in timings:
        if stage == "retrieve":  # the first stage of every round
            if parent_round is not None:
                parent_round.end(end_time=cursor)
            index += 1
            cursor = next(rounds, cursor or returned_ns)
            parent_round = service_tracer.start_span("localize.round", start_time=cursor,
                                                     attributes={"ice.round": index})
        duration = int(seconds * 1e9)
        if stage in ("retrieve", "attention", "segment") and parent_round is not None:
            ctx = trace.set_span_in_context(parent_round)
            span = service_tracer.start_span(stage, context=ctx, start_time=cursor, attributes={"ice.round": index})
            cursor += duration
            span.end(end_time=cursor)
        elif stage == "masks":
            if parent_round is not None:
                parent_round.end(end_time=cursor)
                parent_round = None
            service_tracer.start_span("masks", start_time=returned_ns - duration).end(end_time=returned_ns)
    if parent_round is not None:
        parent_round.end(end_time=cursor)


def timed_span(service_tracer: trace.Tracer, name: str, start_ns: int, end_ns: int | None = None,
               attributes: dict | None = None) -> None:
    """A span for work already done (start and end in `time.time_ns()`), under the current span."""
    service_tracer.start_span(name, start_time=start_ns, attributes=attributes).end(end_time=end_ns or time.time_ns())
