"""The one way every ICE service starts: `start_server(spec, settings)`.

It gives each service, without the service writing any of it:
- `grpc.health.v1` with liveness and readiness answerable separately: the service names `liveness` and
  `readiness` (and the overall `""` plus each full service name, which follow readiness). Liveness is SERVING
  as soon as the port is bound, then follows a heartbeat that the model's device must answer (a hung CUDA call
  turns it NOT_SERVING); readiness is NOT_SERVING until `spec.load()` has returned.
- server reflection, Prometheus metrics with the go-grpc-prometheus names on their own HTTP port,
  bearer-token auth, TLS / mutual TLS (certificates and token re-read when their files change, see
  `services/common/credentials.py`), explicit message-size, keepalive and connection-age options,
  a concurrency cap (RESOURCE_EXHAUSTED beyond it), domain-error mapping, and graceful shutdown on SIGTERM.
The service supplies only `register(server)` (add its servicers) and `load()` (load its models).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge, start_http_server

from services.common.credentials import server_credentials, token_source
from services.common.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    ReadinessInterceptor,
)
from services.common.settings import Settings

log = logging.getLogger("ice.server")

LIVENESS = "liveness"
READINESS = "readiness"

BUILD_INFO = Gauge("ice_build_info", "Server build and bundle (value 1).", ("service", "version", "bundle"))
READY = Gauge("ice_ready", "1 once the models are loaded and the service answers, else 0.", ("service",))


@dataclass
class ServiceSpec:
    """What a service hands the runtime."""

    name: str  # short name: localizer | learner | evaluator
    service_names: list[str]  # full gRPC service names, for health and reflection
    register: Callable[[grpc.Server], None]
    load: Callable[[], None] = lambda: None  # loads models; runs after the port is bound
    on_shutdown: Callable[[], None] = lambda: None  # e.g. stop accepting jobs, checkpoint
    version: str = "0.1.0"
    bundle_digest: Callable[[], str] = lambda: ""
    # Polled every second once loaded: False turns readiness NOT_SERVING (e.g. the learner's job store cannot be
    # written) until it is True again. Liveness is unaffected: the process is fine, its dependency is not.
    ready_check: Callable[[], bool] | None = None
    # Liveness means alive: once loaded, a watchdog runs `heartbeat` every `heartbeat_seconds` on a thread of its
    # own; while one has not returned within `heartbeat_timeout` seconds (a hung CUDA call, a wedged model) or
    # raised, liveness is NOT_SERVING, so Kubernetes restarts the pod. The default, `device_heartbeat`, proves
    # that the model's GPU still completes work; on CPU it proves only that the interpreter runs.
    heartbeat: Callable[[], None] | None = None
    heartbeat_seconds: float = 10.0
    heartbeat_timeout: float = 60.0


@dataclass
class RunningServer:
    spec: ServiceSpec
    settings: Settings
    server: grpc.Server
    health: health.HealthServicer
    port: int
    metrics_port: int | None
    health_server: grpc.Server | None = None
    health_port: int | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    failed: threading.Event = field(default_factory=threading.Event)
    load_error: BaseException | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _metrics_httpd: object | None = None

    def set_ready(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", READINESS, *self.spec.service_names):
            self.health.set(name, status)
        READY.labels(self.spec.name).set(1 if ready else 0)
        (self.ready.set if ready else self.ready.clear)()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loaded (True) or the load failed / timed out (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready.is_set():
            if self.failed.is_set():
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self.ready.wait(0.05 if remaining is None else min(0.05, remaining))
        return True

    def stop(self, grace: float | None = None) -> None:
        """Graceful: readiness and liveness go NOT_SERVING, new RPCs are refused, in-flight ones get `grace`."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("%s: shutting down (grace %.1fs)", self.spec.name, grace)
        self.ready.clear()
        READY.labels(self.spec.name).set(0)
        self.health.enter_graceful_shutdown()
        try:
            self.spec.on_shutdown()
        except Exception:
            log.exception("%s: on_shutdown failed", self.spec.name)
        done = self.server.stop(grace)
        if self.health_server is not None:
            self.health_server.stop(0)
        done.wait()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()

    def wait(self) -> None:
        self.server.wait_for_termination()


def device_heartbeat() -> None:
    """A one-element CUDA op on a stream of its own, waited for: returns once the GPU has run it. Waits for
    nothing else on the device (the model's kernels on other streams), and does nothing before CUDA is in use."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    stream = getattr(device_heartbeat, "stream", None)
    if stream is None:
        stream = device_heartbeat.stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.ones(1, device="cuda").add_(1)
    stream.synchronize()


def watch_heartbeat(running: RunningServer) -> None:
    """Liveness follows the heartbeat (see ServiceSpec.heartbeat) until the server stops."""
    spec = running.spec
    check = spec.heartbeat or device_heartbeat
    outcome: dict[str, bool] = {}
    pending: threading.Thread | None = None
    alive = True

    def beat(result: dict[str, bool]) -> None:
        try:
            check()
            result["ok"] = True
        except Exception:
            log.exception("%s: heartbeat failed", spec.name)
            result["ok"] = False

    while not running._stopped.is_set():
        if pending is None or not pending.is_alive():
            outcome = {}
            pending = threading.Thread(target=beat, args=(outcome,), name=f"{spec.name}-heartbeat", daemon=True)
            pending.start()
        pending.join(spec.heartbeat_timeout)
        now = not pending.is_alive() and outcome.get("ok", False)
        if now != alive and not running._stopped.is_set():
            if now:
                log.warning("%s: heartbeat back: liveness -> SERVING", spec.name)
            else:
                log.error("%s: no heartbeat within %.0fs: liveness -> NOT_SERVING", spec.name, spec.heartbeat_timeout)
            status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            running.health.set(LIVENESS, status)
            alive = now
        running._stopped.wait(spec.heartbeat_seconds)


def _server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_connection_age_ms", settings.max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_ms),
        ("grpc.so_reuseport", 0),
    ]


def _tracing_on(service: str) -> bool:
    """OpenTelemetry: on when `OTEL_TRACES_EXPORTER` names an exporter (or a tracer provider already exists)."""
    from services.common.tracing import TracingConfigError, configure_for

    try:
        return configure_for(service)
    except TracingConfigError as exc:
        raise SystemExit(f"{service}: {exc}") from exc


def start_server(spec: ServiceSpec, settings: Settings, *, load_in_background: bool = True) -> RunningServer:
    """Bind, start serving health at once, then load the models (in a thread unless told otherwise)."""
    holder: dict[str, RunningServer] = {}

    def is_ready() -> bool:
        running = holder.get("server")
        return running is not None and running.ready.is_set()

    interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor()]
    token = token_source(settings)  # --auth-token-file: re-read when it changes
    if token:
        interceptors.append(AuthInterceptor(token))
    interceptors += [ReadinessInterceptor(is_ready), ErrorInterceptor()]
    if _tracing_on(spec.name):  # outermost: the RPC's span covers auth, readiness and error mapping too
        from services.common.tracing import TracingInterceptor

        interceptors.insert(0, TracingInterceptor(spec.name))

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix=f"{spec.name}-rpc"),
        interceptors=interceptors,
        options=_server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    spec.register(server)
    reflection.enable_server_reflection(
        (*spec.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )

    # a negative port is any free port the OS picks; the bound port is what `RunningServer.port` holds and what
    # the "listening on" log line says (how tests and tools start a server without racing for a port)
    any_port = settings.port < 0
    address = f"{settings.host}:{0 if any_port else settings.grpc_port(spec.name)}"
    creds = server_credentials(settings)  # the certificates are re-read when they change
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"{spec.name}: cannot bind {address}")

    health_server = None
    health_port = None
    if settings.health_port:
        # Kubernetes' native gRPC probes cannot speak TLS: a plaintext port that serves only health.
        health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_address = f"{settings.host}:{max(settings.health_port, 0)}"
        health_port = health_server.add_insecure_port(health_address)
        if health_port == 0:
            raise SystemExit(f"{spec.name}: cannot bind the health port {health_address}")

    # with any gRPC port, the default metrics port (gRPC port + 1000) is any free port too
    metrics_port = 0 if any_port and settings.metrics_port < 0 else settings.resolved_metrics_port(spec.name, port)
    httpd = None
    if metrics_port or (any_port and settings.metrics_port < 0):
        httpd, _thread = start_http_server(metrics_port, addr=settings.host)
        metrics_port = httpd.server_port

    running = RunningServer(spec, settings, server, health_servicer, port, metrics_port or None, health_server, health_port)
    running._metrics_httpd = httpd
    holder["server"] = running
    running.set_ready(False)
    health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    server.start()
    if health_server is not None:
        health_server.start()
    log.info("%s: listening on %s (metrics :%s, health :%s, tls %s, auth %s)", spec.name, port, metrics_port,
             health_port, "mutual" if settings.tls_client_ca else ("on" if creds else "off"), "on" if token else "off")

    def load() -> None:
        started = time.perf_counter()
        try:
            spec.load()
        except BaseException as exc:  # a bundle that cannot load: not live, so Kubernetes restarts us
            running.load_error = exc
            log.error("%s: loading failed: %s", spec.name, exc)
            health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
            running.failed.set()
            return
        BUILD_INFO.labels(spec.name, spec.version, spec.bundle_digest()).set(1)
        running.set_ready(True)
        log.info("%s: ready in %.1fs", spec.name, time.perf_counter() - started)
        threading.Thread(target=watch_heartbeat, args=(running,), name=f"{spec.name}-liveness", daemon=True).start()
        if spec.ready_check is not None:
            threading.Thread(target=watch_readiness, name=f"{spec.name}-ready", daemon=True).start()

    def watch_readiness() -> None:
        ready = True
        while not running._stopped.wait(1.0):
            now = bool(spec.ready_check())
            if now != ready:
                log.warning("%s: readiness -> %s", spec.name, "SERVING" if now else "NOT_SERVING")
                running.set_ready(now)
                ready = now

    if load_in_background:
        threading.Thread(target=load, name=f"{spec.name}-load", daemon=True).start()
    else:
        load()
    return running


def serve_forever(spec: ServiceSpec, settings: Settings) -> int:
    """Run until SIGTERM/SIGINT (graceful) or a failed model load (exit code 1)."""
    running = start_server(spec, settings)
    received: list[int] = []

    def on_signal(signum, _frame):
        # Nothing that takes a lock: the handler runs in the main thread wherever it was interrupted, possibly inside
        # a lock it would need (Event.set() inside Event.wait(), logging), or inside itself when signals come in a
        # burst (a killed parent signals once per thread that dies); that would wait forever. A list append is safe.
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not received:
        if running.failed.is_set():
            running.stop(grace=0)
            return 1
        time.sleep(0.2)
    log.info("%s: received %s", spec.name, signal.Signals(received[0]).name)
    running.stop()
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
