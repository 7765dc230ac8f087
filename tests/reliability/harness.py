"""What the reliability tests share: starting a real service (in-process or as a subprocess), raw-bytes calls,
reading an RPC's outcome, process RSS, and throwaway certificate authorities."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.common.server import RunningServer, start_server
from services.common.settings import EvaluatorSettings, LearnerSettings, LocalizerSettings, from_sources

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"localizer": LocalizerSettings, "learner": LearnerSettings, "evaluator": EvaluatorSettings}
# Small enough that an oversized message is cheap to build, large enough for every good request of the tests.
TEST_MAX_MESSAGE_BYTES = 2 * 1024 * 1024
# How long a test waits for something that must happen (a server ready, a job at a step): only ever the bound of a
# failure, never what decides a pass, so it is generous (a loaded 2-core machine is many times slower than a quiet one).
PATIENCE = 1800.0


def build_spec(service: str):
    if service == "localizer":
        from services.localizer.server import build_spec as spec
    elif service == "learner":
        from services.learner.server import build_spec as spec
    else:
        from services.evaluator.server import build_spec as spec
    return spec


def start_inprocess(service: str, bundle: Path, **overrides) -> RunningServer:
    # port -1: any free port; the bound one is `RunningServer.port`
    values = {"bundle": Path(bundle), "host": "127.0.0.1", "port": -1, "metrics_port": 0,
              "max_message_bytes": TEST_MAX_MESSAGE_BYTES, **overrides}
    settings = from_sources(env={}, cls=SETTINGS[service], **values)
    running = start_server(build_spec(service)(settings), settings)
    assert running.wait_ready(PATIENCE), f"{service} did not load: {running.load_error}"
    return running


# -- outcomes ------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: str  # "OK" or the gRPC status code's name
    details: str = ""
    field: str = ""  # the first google.rpc.BadRequest field violation, if any
    value: object = None

    def __str__(self) -> str:
        return f"{self.code} ({self.field or '-'}): {self.details[:200]}"


def outcome(call: Callable[[], object]) -> Outcome:
    """Run a call (a streaming response is drained) and describe how it ended."""
    try:
        value = call()
        if hasattr(value, "__next__"):
            value = list(value)
        return Outcome("OK", value=value)
    except grpc.RpcError as err:
        field = ""
        try:
            status = rpc_status.from_call(err)
        except Exception:
            status = None
        for detail in getattr(status, "details", []) or []:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad) and bad.field_violations:
                field = bad.field_violations[0].field
                break
        return Outcome(err.code().name, err.details() or "", field)


def assert_refused_well(result: Outcome, expect: Iterable[str], field_hint: str | None = None) -> None:
    """The answer is one of `expect`; a refusal is never INTERNAL/UNKNOWN and says what was wrong."""
    expect = set(expect)
    assert result.code not in ("INTERNAL", "UNKNOWN"), f"server error on bad input: {result}"
    assert result.code in expect, f"expected one of {sorted(expect)}, got {result}"
    if result.code != "OK":
        assert len(result.details) >= 12 and "internal error" not in result.details, f"unhelpful message: {result}"
        if field_hint is not None and result.code == "INVALID_ARGUMENT":
            assert field_hint in result.field or field_hint in result.details, \
                f"the refusal does not name {field_hint!r}: {result}"


# -- raw calls: bytes in, bytes out (for messages the client library would refuse to build) -------------------------


def _identity(data: bytes) -> bytes:
    return data


def raw_unary(channel: grpc.Channel, method: str):
    return channel.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)


def raw_unary_stream(channel: grpc.Channel, method: str):
    return channel.unary_stream(method, request_serializer=_identity, response_deserializer=_identity)


def raw_stream_unary(channel: grpc.Channel, method: str):
    return channel.stream_unary(method, request_serializer=_identity, response_deserializer=_identity)


# -- services as subprocesses --------------------------------------------------------------------------------------


BOUND = re.compile(r": listening on (\d+) \(metrics :(\w+), health :(\w+),")


class ServiceProcess:
    """`python -m services.<name>` on loopback, for RSS, signals and restarts.

    It binds any free port (`--port -1`; the default metrics port, when asked for with metrics_port=-1, is any free
    port too) and the ports it bound are read back from its log, so nothing races for a port picked beforehand.
    `port`, `metrics_port` and `channel` are known once `wait_bound` (or `wait_ready`) has returned.
    With `gate` (a folder), the process runs with a gate in its model call (see tests/reliability/gated.py)."""

    def __init__(self, service: str, bundle: Path, log_path: Path, *, metrics_port: int = 0,
                 args: Iterable[str] = (), env: dict[str, str] | None = None, gate: Path | None = None):
        self.service = service
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._channel: grpc.Channel | None = None
        self.log_path = log_path
        run = ([str(ROOT / "tests" / "reliability" / "gated.py"), service] if gate is not None
               else ["-m", f"services.{service}"])
        cmd = [sys.executable, *run, "--bundle", str(bundle), "--host", "127.0.0.1",
               "--port", "-1", "--metrics-port", str(metrics_port), *args]
        full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT),
                        **({"ICE_TEST_GATE": str(gate)} if gate is not None else {}), **(env or {}))
        self._log_start = log_path.stat().st_size if log_path.exists() else 0  # restarts append to one log
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def channel(self) -> grpc.Channel:
        assert self._channel is not None, "the port is not known before wait_bound()"
        return self._channel

    def wait_bound(self, timeout: float = PATIENCE) -> int:
        """Wait for this process's "listening on" line; set the ports and the channel from it."""
        deadline = time.monotonic() + timeout
        while self.port is None:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                found = BOUND.search(f.read().decode(errors="replace"))
            if found:
                self.port = int(found.group(1))
                self.metrics_port = int(found.group(2)) if found.group(2).isdigit() else None
                self.health_port = int(found.group(3)) if found.group(3).isdigit() else None
                self._channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
                break
            assert self.proc.poll() is None, f"{self.service} exited: {self.log_tail()}"
            assert time.monotonic() < deadline, f"{self.service} did not bind: {self.log_tail()}"
            time.sleep(0.05)
        return self.port

    def wait_ready(self, timeout: float = PATIENCE) -> None:
        deadline = time.monotonic() + timeout
        self.wait_bound(timeout)
        stub = health_pb2_grpc.HealthStub(self.channel)
        while True:
            assert self.proc.poll() is None, f"{self.service} exited: {self.log_tail()}"
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{self.service} not ready: {self.log_tail()}"
            time.sleep(0.2)

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def log_text(self) -> str:
        """This process's part of the log (a restart appends to the same file)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int | None:
        if self._channel is not None:
            self._channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- certificates --------------------------------------------------------------------------------------------------


def make_ca(name: str):
    """A throwaway CA: (ca_pem, issue(common_name, server) -> (key_pem, cert_pem))."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def issue(common_name: str, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1)))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)

    return ca.public_bytes(serialization.Encoding.PEM), issue


def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.05):
    """Poll until `predicate()` is truthy and return it; the timeout only bounds a failure, never decides a pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(every)


def metric(port: int, name: str, **labels) -> float:
    """The sum of a Prometheus sample over the series that carry `labels`, read from a /metrics port."""
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
