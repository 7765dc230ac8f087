"""OpenTelemetry tracing of the SDK: W3C trace context on every call,
one CLIENT span per RPC, and an exporter set up from the standard `OTEL_*` environment variables.

Off by default. The SDK needs only `opentelemetry-api`, whose tracer records nothing until a tracer provider is
installed: either by the application (the usual way for a library: its own `TracerProvider`, or the
`opentelemetry-instrument` launcher), or, when the application installed none, by `configure_from_env` once
`OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`, ...; `pip install 'ice-client[tracing]'` brings the
OpenTelemetry SDK and the OTLP exporter). Everything else is read by the OpenTelemetry SDK from the same standard
variables: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_ENDPOINT` (and the rest of
`OTEL_EXPORTER_OTLP_*`), `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`, `OTEL_PROPAGATORS`
(default `tracecontext,baggage`), and `OTEL_SDK_DISABLED=true` turns it all off.

Context travels in gRPC metadata as the `traceparent` / `tracestate` headers (W3C Trace Context), through the
globally configured propagator.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

# what the services use too lives below both (ice/wire.py); re-exported here as the SDK's tracing API
from ice.wire import TracingConfigError, configure_from_env, extract, inject, is_configured, rpc_attributes

__all__ = ["ClientRpc", "TracingConfigError", "configure_client_from_env", "configure_from_env", "extract",
           "inject", "is_configured", "rpc_attributes", "span", "tracer"]

CLIENT_TRACER = "ice.client"
_warned: set[str] = set()


def tracer(name: str = CLIENT_TRACER) -> trace.Tracer:
    return trace.get_tracer(name, "0.1.0")


def configure_client_from_env() -> None:
    """What the SDK does when a client is made: `configure_from_env("ice-client")`, and a misconfiguration is
    one warning on stderr, never a failed extraction."""
    try:
        configure_from_env("ice-client")
    except TracingConfigError as exc:
        if str(exc) not in _warned:
            _warned.add(str(exc))
            print(f"ice: tracing is off: {exc}", file=sys.stderr)


class ClientRpc:
    """One CLIENT span per SDK call: its headers go into the call's metadata; `finish` records the status code.

    The span is never made current (a stream may be abandoned and collected on another thread), so nothing has
    to be detached."""

    def __init__(self, full_method: str, target: str):
        self.span = tracer().start_span(full_method.lstrip("/"), kind=SpanKind.CLIENT,
                                        attributes=rpc_attributes(full_method, target))
        self.metadata = inject(trace.set_span_in_context(self.span))

    def finish(self, code=None, message: str = "") -> None:
        """`code`: a grpc.StatusCode (None = OK)."""
        if code is not None and code.name != "OK":
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
            self.span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"[:256]))
        else:
            self.span.set_attribute("rpc.grpc.status_code", 0)
        self.span.end()


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None, tracer_name: str = CLIENT_TRACER):
    """An INTERNAL span made current for the block (same thread or task throughout); errors mark it ERROR."""
    with tracer(tracer_name).start_as_current_span(name, attributes=dict(attributes or {})) as current:
        yield current
