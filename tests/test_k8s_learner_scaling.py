"""The learner's autoscaling signal counts the work a replica holds, running jobs included: a replica training
with an empty queue must not look idle to the HorizontalPodAutoscaler (or to its own pre-stop drain)."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from services.learner.jobs import QUEUED, RUNNING, SUCCEEDED, JobManager, JobRecord, JobStore


def _gauge(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, f"{name} is not exported"
    return value


def _record(job_id: str, state: str, seq: int) -> JobRecord:
    now = time.time()
    return JobRecord(job_id, "", "", state, 10, now, now, seq=seq)


def test_a_running_job_counts_as_active_work(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.put(_record("a", QUEUED, 1))
    store.put(_record("b", SUCCEEDED, 2))
    store.close()
    manager = JobManager(tmp_path, bundle=None)
    try:
        assert _gauge("ice_learner_queue_depth") == 1 and _gauge("ice_learner_active_jobs") == 1
        running = manager._next()  # the runner takes the job: the queue is empty, the replica is not idle
        assert running.id == "a" and running.state == RUNNING
        assert _gauge("ice_learner_queue_depth") == 0
        assert _gauge("ice_learner_active_jobs") == 1
        manager._update("a", state=SUCCEEDED)
        assert _gauge("ice_learner_active_jobs") == 0
    finally:
        manager.close()


def test_jobs_running_when_the_replica_died_count_again_on_restart(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.put(_record("r", RUNNING, 1))
    store.close()
    manager = JobManager(tmp_path, bundle=None)  # the interrupted job is queued again to resume
    try:
        assert _gauge("ice_learner_active_jobs") == 1
    finally:
        manager.close()


# --- the learner's preStop drain, as the manifest runs it --------------------------------------------------
def _drain_command() -> list[str]:
    from pathlib import Path

    import yaml

    docs = yaml.safe_load_all((Path(__file__).resolve().parents[1] / "k8s/base/learner.yaml").read_text())
    (sts,) = [d for d in docs if d and d["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return container["lifecycle"]["preStop"]["exec"]["command"]


class _Metrics:
    """A /metrics endpoint whose ice_learner_active_jobs the test sets."""

    def __init__(self, active: float):
        import http.server
        import threading

        self.active, self.requests = active, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                body = (f"# TYPE ice_learner_active_jobs gauge\nice_learner_active_jobs {outer.active}\n"
                        f"ice_learner_queue_depth 0.0\n").encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_drain_waits_while_the_replica_holds_a_job_then_lets_it_stop():
    import subprocess
    import sys
    import threading

    command = _drain_command()
    assert command[:2] == ["python", "-c"] and command[3] == "9090"  # the metrics port of the container
    metrics = _Metrics(active=1.0)  # a job is running
    try:
        drain = subprocess.Popen([sys.executable, "-c", command[2], str(metrics.port), "60", "0.05"])
        time.sleep(1.0)
        assert drain.poll() is None and metrics.requests >= 3  # still waiting, and asking
        threading.Timer(0.2, lambda: setattr(metrics, "active", 0.0)).start()  # the job ends
        assert drain.wait(timeout=10) == 0
    finally:
        metrics.stop()


def test_the_drain_is_bounded_and_ends_when_the_server_is_gone():
    import subprocess
    import sys

    command = _drain_command()
    metrics = _Metrics(active=2.0)
    try:
        start = time.monotonic()
        assert subprocess.run([sys.executable, "-c", command[2], str(metrics.port), "0.5", "0.05"],
                              timeout=30).returncode == 0
        assert time.monotonic() - start < 10  # gave up at its timeout: the grace period takes over
    finally:
        metrics.stop()
    start = time.monotonic()  # nothing listens: nothing to wait for
    assert subprocess.run([sys.executable, "-c", command[2], str(metrics.port), "60", "0.05"],
                          timeout=30).returncode == 0
    assert time.monotonic() - start < 10
