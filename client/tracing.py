"""OpenTelemetry tracing of the SDK (and the helpers the services share): W3C trace context on every call,
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

import os
import sys
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

CLIENT_TRACER = "ice.client"
_warned: set[str] = set()


class TracingConfigError(ValueError):
    """OTEL_TRACES_EXPORTER names an exporter that is not installed, or the SDK is missing."""


def tracer(name: str = CLIENT_TRACER) -> trace.Tracer:
    return trace.get_tracer(name, "0.1.0")


def is_configured() -> bool:
    """True once a real tracer provider is installed (by the application or `configure_from_env`)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return [n for n in names if n and n != "none"]


def _exporter(name: str, env: Mapping[str, str]):
    from importlib.metadata import entry_points

    if name == "otlp":  # the protocol decides which OTLP exporter, as in the OpenTelemetry SDK's own set-up
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        name = "otlp_proto_http" if protocol.startswith("http") else "otlp_proto_grpc"
    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    if not found:
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed "
                                 "(otlp/otlp_proto_grpc: opentelemetry-exporter-otlp-proto-grpc; "
                                 "otlp_proto_http: opentelemetry-exporter-otlp-proto-http; console: opentelemetry-sdk)")
    return found[0].load()()


def configure_from_env(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Install an OpenTelemetry SDK tracer provider exporting to what `OTEL_TRACES_EXPORTER` names.

    Does nothing (returns False) when that variable is unset or `none`, when `OTEL_SDK_DISABLED=true`, or when a
    provider is already installed. `service_name` is the resource's `service.name` unless `OTEL_SERVICE_NAME` or
    `OTEL_RESOURCE_ATTRIBUTES` sets one. Raises `TracingConfigError` when the SDK or a named exporter is missing.
    """
    env = os.environ if env is None else env
    names = _exporter_names(env)
    if not names or is_configured():
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise TracingConfigError("OTEL_TRACES_EXPORTER is set but the OpenTelemetry SDK is not installed "
                                 "(pip install 'ice-client[tracing]')") from None
    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {SERVICE_NAME: service_name}))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    trace.set_tracer_provider(provider)
    return True


def configure_client_from_env() -> None:
    """What the SDK does when a client is made: `configure_from_env("ice-client")`, and a misconfiguration is
    one warning on stderr, never a failed extraction."""
    try:
        configure_from_env("ice-client")
    except TracingConfigError as exc:
        if str(exc) not in _warned:
            _warned.add(str(exc))
            print(f"ice: tracing is off: {exc}", file=sys.stderr)


# --- propagation ---------------------------------------------------------------------------------------------
def inject(context: Context | None = None) -> list[tuple[str, str]]:
    """The trace context headers (`traceparent`, ...) of `context` (default: the current one) as gRPC metadata;
    empty when there is no valid span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return list(carrier.items())


def extract(metadata: Iterable[tuple[str, Any]] | None) -> Context:
    """The remote parent carried by incoming gRPC metadata (binary `-bin` headers are skipped)."""
    carrier = {key.lower(): value for key, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)


def rpc_attributes(full_method: str, target: str | None = None) -> dict[str, Any]:
    """OpenTelemetry's RPC semantic conventions for a gRPC method "/pkg.Service/Method"."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    if target:
        host, _, port = target.rpartition(":")
        attributes["server.address"] = host or target
        if port.isdigit():
            attributes["server.port"] = int(port)
    return attributes


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
