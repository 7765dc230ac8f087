"""The three services as local subprocesses, for development (`ice serve`), the demo and end-to-end tests.

Each runs `python -m services.<name> --bundle DIR --host 127.0.0.1 --port N` in its own session (a Ctrl-C
in the terminal reaches only us; we then stop them in order), logs to `<log_dir>/<name>.log`, and counts as
started once its `readiness` health check answers SERVING (the bundle is loaded). A port left out (or 0) is any
free port: the service binds it (`--port -1`) and the port it bound is read back from its log, so nothing races
for a port picked beforehand.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = ("localizer", "learner", "evaluator")


def _stop_with_parent() -> None:
    """In the child, before exec: SIGTERM (a graceful stop) when the process that started it dies, even by
    SIGKILL, so that a killed `ice serve` or demo leaves no services behind (Linux; elsewhere a no-op). The
    kernel ties this to the thread that started the child: start the services from a thread that lives as long
    as they should (the main thread, as `ice serve`, the demo and the benchmarks do)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


_BOUND = re.compile(r": listening on (\d+) ")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServicesFailed(RuntimeError):
    """A service did not start; the message carries the end of its log."""


@dataclass
class DevServices:
    bundle: Path
    ports: dict[str, int] = field(default_factory=dict)  # missing (or 0): any free port, read back once bound
    host: str = "127.0.0.1"
    job_store: Path | None = None  # the learner's job store; default: a folder under log_dir
    log_dir: Path | None = None  # default: a temporary folder
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    services: tuple[str, ...] = SERVICES  # which of them to start (a benchmark of the learner alone needs one)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _log_start: dict[str, int] = field(default_factory=dict)

    def targets(self) -> dict[str, str]:
        return {name: f"{self.host}:{self.ports[name]}" for name in self.services}

    def command(self, name: str) -> list[str]:
        args = [sys.executable, "-m", f"services.{name}", "--bundle", str(self.bundle), "--host", self.host,
                "--port", str(self.ports.get(name) or -1), "--metrics-port", "0"]
        if name == "learner":
            args += ["--job-store", str(self.job_store)]
        return args + self.extra_args.get(name, [])

    def start(self, timeout: float = 300.0) -> DevServices:
        """Start the three services and wait until each is ready; on any failure stop them all and raise."""
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="ice-serve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.job_store = Path(self.job_store or self.log_dir / "jobs")
        self.ports = {name: port for name, port in self.ports.items() if port}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        repo_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
        try:
            for name in self.services:
                self._log_start[name] = (self.log_dir / f"{name}.log").stat().st_size \
                    if (self.log_dir / f"{name}.log").exists() else 0
                log = open(self.log_dir / f"{name}.log", "ab")
                self.processes[name] = subprocess.Popen(self.command(name), stdout=log, stderr=subprocess.STDOUT,
                                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                                        preexec_fn=_stop_with_parent)
                log.close()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.services)
        while pending:
            for name in sorted(pending):
                code = self.processes[name].poll()
                if code is not None:
                    raise ServicesFailed(f"the {name} exited with code {code} while starting:\n{self.log_tail(name)}")
                if name not in self.ports:
                    self._read_port(name)
                if name in self.ports and _ready(f"{self.host}:{self.ports[name]}"):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                names = ", ".join(sorted(pending))
                raise ServicesFailed(f"not ready after {timeout:.0f}s: {names}\n"
                                     + "\n".join(self.log_tail(n) for n in sorted(pending)))
            if pending:
                time.sleep(0.5)

    def _read_port(self, name: str) -> None:
        """The port a service started with `--port -1` bound, from its log (this start's part of it)."""
        with open(self.log_dir / f"{name}.log", "rb") as f:
            f.seek(self._log_start.get(name, 0))
            found = _BOUND.search(f.read().decode(errors="replace"))
        if found:
            self.ports[name] = int(found.group(1))

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log" if self.log_dir else None
        if path is None or not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"  {name}| {line}" for line in text)

    def dead(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.poll() is not None]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every service (they drain in-flight calls), then SIGKILL what is left after `grace`."""
        for p in self.processes.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.processes.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> DevServices:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _ready(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="readiness"),
                                                               timeout=1.0).status
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING
