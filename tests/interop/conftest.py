"""Interoperability tests: the contract from other languages (buf, a Node.js client), the client-only install,
and one trace across the services. The npm packages they need live in tests/interop/node (`make test` installs
them from the committed lock file).

`interop_services` is one process (serve_traced.py) running the three real services on loopback with the tiny
bundle, traced into an in-memory exporter, shared by every test here: the Node.js client, the client-only
virtualenv and the traced extraction each drive it, and each finds its own spans by trace id. It runs apart from
pytest so that its tracer provider (process-global in OpenTelemetry) changes nothing for the rest of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

collect_ignore = ["node"]  # node_modules is not ours to collect


class ServicesHost:
    def __init__(self, process: subprocess.Popen, targets: dict[str, str], log: Path):
        self.process = process
        self.targets = targets
        self.log = log
        self._lock = threading.Lock()

    def spans(self) -> list[dict]:
        """Every span the three services finished so far."""
        with self._lock:
            self.process.stdin.write("spans\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the services host exited:\n{self.log_tail()}")
        return json.loads(line)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def interop_services(tiny_bundle_dir, tmp_path_factory) -> ServicesHost:
    work = tmp_path_factory.mktemp("interop-services")
    log = work / "services.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    for name in [k for k in env if k.startswith("OTEL_")]:  # the host's exporter is the in-memory one
        del env[name]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "interop" / "serve_traced.py"), "--bundle", str(tiny_bundle_dir),
             "--job-store", str(work / "jobs")],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True)
    first = process.stdout.readline()
    info = json.loads(first) if first.startswith("{") else {}
    if "targets" not in info:
        process.kill()
        pytest.fail(f"the services did not start: {info.get('error', '')}\n{log.read_text(errors='replace')[-4000:]}")
    host = ServicesHost(process, info["targets"], log)
    yield host
    host.stop()


@pytest.fixture(scope="session")
def photo_file(photo_png, tmp_path_factory) -> Path:
    """scikit-image's `coffee` photo (600x400) as a PNG file."""
    path = tmp_path_factory.mktemp("photo") / "coffee.png"
    path.write_bytes(photo_png)
    return path
