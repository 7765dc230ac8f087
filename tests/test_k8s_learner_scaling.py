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
