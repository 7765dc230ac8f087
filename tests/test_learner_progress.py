"""A learning job's reported progress after a restart: the runner recomputes the steps since the job's last
checkpoint, and the step it reports never goes backwards (it once fell from the furthest step reached back to
the checkpoint's). The job manager is the real one, on a real job store; the trainer is a double that replays
what the real one reports when it resumes from a checkpoint."""

from __future__ import annotations

import time

from services.learner import jobs
from services.learner.jobs import QUEUED, RUNNING, SUCCEEDED, JobManager, JobRecord, JobStore
from services.learner.trainer import StepInfo, TrainResult


class ResumingTrainer:
    """Resumes at step 3 of 8 (its newest checkpoint) and reports every step after it, as Trainer.run does."""

    checkpoint = 3

    def __init__(self, bundle, spec, work_dir, *, on_step, on_phase, **_):
        self.on_step, self.on_phase = on_step, on_phase

    def release(self) -> None:
        """Nothing to free (the real Trainer drops its models here once the job ends)."""

    def run(self, resume: bool = True) -> TrainResult:
        assert resume
        self.on_phase("preparing")
        self.on_phase("phase1")
        for done in range(self.checkpoint + 1, 9):
            self.on_step(StepInfo("phase1" if done <= 4 else "phase2", done, 8, {"loss": 1.0 / done}))
        self.on_phase("finishing")
        return TrainResult([], {}, None, None)


def test_reported_step_never_goes_backwards_after_a_restart(tmp_path, monkeypatch):
    now = time.time()
    store = JobStore(tmp_path / "jobs.sqlite")  # the replica died after step 6 had been reported
    store.put(JobRecord("j", "", "", RUNNING, 8, now, now, phase="phase2", step=6, start_time=now, seq=1))
    store.close()
    monkeypatch.setattr(jobs, "load_inputs", lambda folder: None)
    monkeypatch.setattr(jobs, "Trainer", ResumingTrainer)
    monkeypatch.setattr(jobs, "write_artifacts", lambda *args: [])
    manager = JobManager(tmp_path, bundle=type("Bundle", (), {"digest": "d"})())
    published: list[tuple[str, int]] = []
    put = manager._put

    def recording_put(record):
        put(record)
        if record.id == "j":
            published.append((record.state, record.step))

    monkeypatch.setattr(manager, "_put", recording_put)
    try:
        record = manager.get("j")
        assert record.state == QUEUED and record.step == 6  # queued again, progress kept
        manager._run(record)
        steps = [step for _, step in published]
        assert steps == sorted(steps), steps  # never backwards
        assert steps[0] == 6 and steps[-1] == 8  # held at 6 while steps 4..6 were recomputed, then onwards
        assert manager.get("j").state == SUCCEEDED
    finally:
        manager.close()
