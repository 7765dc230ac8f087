"""Tracing is off by default and configured by the standard OTEL_* variables (client/tracing.py, used by the SDK
and by every service's `start_server`). Each case runs in a fresh interpreter: OpenTelemetry's tracer provider is
process-global and can be set once. The trace across the real services is tests/interop/test_trace_across_services.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(env_vars, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_off_by_default_nothing_is_installed_and_no_server_interceptor():
    done = _python("""
        import json
        from client import IceClient, tracing
        from services.common.server import _tracing_on
        IceClient()  # making a client reads the environment too
        with tracing.span("probe") as span:
            recording = span.is_recording()
        print(json.dumps({"configured": tracing.is_configured(), "server": _tracing_on("localizer"),
                          "recording": recording, "headers": tracing.inject()}))
    """)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"configured": False, "server": False, "recording": False, "headers": []}


def test_console_exporter_and_service_name_from_the_environment():
    done = _python("""
        from client import tracing
        from services.common.server import _tracing_on
        assert _tracing_on("learner") and tracing.is_configured()
        with tracing.span("probe-span") as span:
            headers = dict(tracing.inject())
            assert headers["traceparent"].split("-")[2] == format(span.get_span_context().span_id, "016x")
    """, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="svc-from-env")
    assert done.returncode == 0, done.stderr
    exported = json.loads(done.stdout)  # the console exporter prints each span as JSON when the process ends
    assert exported["name"] == "probe-span" and exported["resource"]["attributes"]["service.name"] == "svc-from-env"


def test_default_service_name_is_the_service_and_sdk_disabled_wins():
    done = _python("""
        from opentelemetry import trace
        from services.common.tracing import configure_for
        assert configure_for("evaluator")
        print(trace.get_tracer_provider().resource.attributes["service.name"])
    """, OTEL_TRACES_EXPORTER="console")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ice-evaluator"
    done = _python("""
        from client import tracing
        assert not tracing.configure_from_env("x") and not tracing.is_configured()
    """, OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="true")
    assert done.returncode == 0, done.stderr


def test_an_unknown_exporter_stops_a_service_and_only_warns_a_client():
    done = _python("""
        from services.common.server import _tracing_on
        _tracing_on("localizer")
    """, OTEL_TRACES_EXPORTER="nonesuch")
    assert done.returncode == 1
    assert "localizer: OTEL_TRACES_EXPORTER: no span exporter 'nonesuch' is installed" in done.stderr
    done = _python("""
        import sys
        sys.modules["opentelemetry.sdk"] = None  # a client-only install without the [tracing] extra
        from client import IceClient, tracing
        IceClient(); IceClient()
        print(tracing.is_configured())
    """, OTEL_TRACES_EXPORTER="otlp")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert done.stderr.count("ice: tracing is off: OTEL_TRACES_EXPORTER is set but the OpenTelemetry SDK is not "
                             "installed (pip install 'ice-client[tracing]')") == 1
