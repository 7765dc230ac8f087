"""What the SDK and the services share beyond the messages: trace context in gRPC metadata, the OpenTelemetry
set-up from the standard `OTEL_*` variables, and the token overlap of a bearer-token rotation.

It lives beside the generated code because both distributions have it: `ice-client` ships the `ice` package and
`ice-serving` depends on `ice-client`. The SDK (`client/`) and the services (`services/`) both import it; it
imports neither (tests/test_layout.py holds that `services/` never imports `client/`). Its only dependency beyond
the standard library is `opentelemetry-api`, which both distributions require.

Tracing is off until a tracer provider is installed: by the application, or by `configure_from_env` once
`OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`, ...). Context travels as the W3C `traceparent` /
`tracestate` headers through the globally configured propagator.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context


class TracingConfigError(ValueError):
    """OTEL_TRACES_EXPORTER names an exporter that is not installed, or the SDK is missing."""


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


class TokenOverlap:
    """The token a rotation replaced, kept for `overlap_s` seconds after the rotation: the client sends it beside
    the new one (`client.channel.TokenFile`), the server accepts it beside the new one
    (`services.common.credentials.TokenFile`), so that the side whose copy of a Secret is updated later is not
    refused meanwhile."""

    def __init__(self, overlap_s: float):
        self.overlap_s = overlap_s
        self._previous: str | None = None
        self._until = 0.0

    def replaced(self, token: str) -> None:
        self._previous, self._until = token, time.monotonic() + self.overlap_s

    def tokens(self, current: str) -> tuple[str, ...]:
        """`current`, then the replaced token while the overlap lasts."""
        previous = self._previous
        return (current, previous) if previous is not None and time.monotonic() < self._until else (current,)
