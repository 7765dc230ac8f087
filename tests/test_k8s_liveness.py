"""Liveness means alive: the `liveness` health status follows a heartbeat that the model side must answer, so a
hung model call (the pod's GPU stuck in a CUDA call while the health thread still answers) gets the pod restarted.
Through the real runtime and real gRPC health checks on loopback."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import ServiceSpec, device_heartbeat, start_server
from services.common.settings import from_sources

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _wait_for(port: int, service: str, status: int, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _status(port, service) == status:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"{service} never became {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")


def _server(spec: ServiceSpec):
    from conftest import free_port

    settings = from_sources(env={}, host="127.0.0.1", port=free_port(), metrics_port=0, grace_seconds=0.0)
    running = start_server(spec, settings)
    assert running.wait_ready(10)
    return running


def test_a_hung_heartbeat_turns_liveness_off_and_a_returning_one_turns_it_back_on():
    hang = threading.Event()
    release = threading.Event()
    calls = []

    def heartbeat():
        calls.append(time.monotonic())
        if hang.is_set():
            release.wait(30)

    spec = ServiceSpec(name="probe", service_names=["test.Probe"], register=lambda server: None,
                       heartbeat=heartbeat, heartbeat_seconds=0.05, heartbeat_timeout=0.3)
    running = _server(spec)
    try:
        _wait_for(running.port, "liveness", SERVING)
        time.sleep(0.3)
        assert _status(running.port, "liveness") == SERVING and len(calls) >= 2  # beating, and alive
        hang.set()  # the model side stops answering: liveness must go, readiness is not its business
        _wait_for(running.port, "liveness", NOT_SERVING, timeout=5)
        assert _status(running.port, "readiness") == SERVING
        hang.clear()
        release.set()  # the stuck call returns: alive again
        _wait_for(running.port, "liveness", SERVING, timeout=5)
    finally:
        release.set()
        running.stop(grace=0)


def test_a_failing_heartbeat_turns_liveness_off():
    broken = threading.Event()

    def heartbeat():
        if broken.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    spec = ServiceSpec(name="probe", service_names=["test.Probe"], register=lambda server: None,
                       heartbeat=heartbeat, heartbeat_seconds=0.05, heartbeat_timeout=0.5)
    running = _server(spec)
    try:
        _wait_for(running.port, "liveness", SERVING)
        broken.set()
        _wait_for(running.port, "liveness", NOT_SERVING, timeout=5)
    finally:
        running.stop(grace=0)


def test_the_default_heartbeat_runs_without_cuda():
    # On a machine without CUDA in use it returns at once; the services' default never blocks a CPU pod.
    start = time.monotonic()
    device_heartbeat()
    assert time.monotonic() - start < 1.0
    assert ServiceSpec(name="x", service_names=[], register=lambda s: None).heartbeat is None  # default used
