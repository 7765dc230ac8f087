"""The three real services (localizer, learner, evaluator) in one process on loopback, traced into an in-memory
OpenTelemetry exporter: the host of the interoperability tests (tests/interop/conftest.py).

    python tests/interop/serve_traced.py --bundle DIR --job-store DIR

Each service is started by the production runtime (`start_server` with its own `build_spec`), on its own port,
exactly as `python -m services.<name>` does; only the tracer provider differs (an in-memory exporter installed
before the servers start, in place of what `OTEL_TRACES_EXPORTER` would configure). It prints one JSON line
{"targets": {...}} once all three are ready, then answers commands on stdin, one per line:
  spans   -> one JSON line: every span finished so far (name, trace/span/parent ids, scope, kind, attributes)
  quit    -> stops the services and exits
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def span_record(span) -> dict:
    parent = span.parent
    return {
        "name": span.name,
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else "",
        "kind": span.kind.name,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent is not None else None,
        "parent_remote": bool(parent.is_remote) if parent is not None else None,
        "status": span.status.status_code.name,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in (span.attributes or {}).items()},
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--job-store", type=Path, required=True)
    a = p.parse_args()

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "ice-interop-host"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    from services.common.server import start_server
    from services.common.settings import EvaluatorSettings, LearnerSettings, LocalizerSettings, from_sources
    from services.evaluator.server import build_spec as evaluator_spec
    from services.learner.server import build_spec as learner_spec
    from services.localizer.server import build_spec as localizer_spec

    common = dict(env={}, host="127.0.0.1", metrics_port=0, bundle=a.bundle, grace_seconds=0.0)
    settings = {
        "localizer": from_sources(cls=LocalizerSettings, port=_free_port(), **common),
        "learner": from_sources(cls=LearnerSettings, port=_free_port(), job_store=a.job_store, class_image_steps=2,
                                **common),
        "evaluator": from_sources(cls=EvaluatorSettings, port=_free_port(), **common),
    }
    specs = {"localizer": localizer_spec, "learner": learner_spec, "evaluator": evaluator_spec}
    running = {name: start_server(specs[name](s), s) for name, s in settings.items()}
    try:
        for name, server in running.items():
            if not server.wait_ready(600):
                print(json.dumps({"error": f"the {name} did not load: {server.load_error}"}), flush=True)
                return 1
        print(json.dumps({"targets": {n: f"127.0.0.1:{s.port}" for n, s in running.items()}}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "spans":
                print(json.dumps([span_record(s) for s in exporter.get_finished_spans()]), flush=True)
            elif command == "quit":
                break
    finally:
        for server in running.values():
            server.stop(grace=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
