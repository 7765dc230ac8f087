"""A real service process with a gate in its model call, so that a test acts while the work is held instead of
guessing with sleeps how far the work has got.

    python tests/reliability/gated.py SERVICE [service flags ...]     with ICE_TEST_GATE=FOLDER

Everything else is the unchanged `python -m services.SERVICE`. The gate is files in FOLDER (the test writes them):

- localizer: every `Localizer.localize` call first writes `entered-N` (N = 1, 2, ... in this process), then waits
  while `closed` exists.
- learner: `Trainer.step(i)` (the step that makes i + 1 steps done), for an i listed in `hold-at` (whitespace
  separated), writes `held-i` and `held-i-N` (N: the how-many-th time a job of this process reached step i) and
  waits while `closed` or `closed-i-N` exists; `closed-i-N` holds one job, the N-th to reach step i, and lets the
  others pass. Steps done before it were checkpointed as usual.
  Class-image generation: before the pipeline call that makes the batch starting at image b, for a b listed in
  `hold-class-at`, writes `class-held-b` and waits while `closed` exists (the batches before it are written).
"""

from __future__ import annotations

import itertools
import os
import runpy
import sys
import threading
import time
from pathlib import Path

GATE = Path(os.environ["ICE_TEST_GATE"])
_entries = itertools.count(1)
_lock = threading.Lock()


def _wait_open(also: str | None = None) -> None:
    while (GATE / "closed").exists() or (also is not None and (GATE / also).exists()):
        time.sleep(0.01)


def _gate_localizer() -> None:
    from services.localizer import pipeline

    original = pipeline.Localizer.localize

    def localize(self, *args, **kwargs):
        with _lock:
            n = next(_entries)
        (GATE / f"entered-{n}").touch()
        _wait_open()
        return original(self, *args, **kwargs)

    pipeline.Localizer.localize = localize


def _gate_learner() -> None:
    from services.learner import trainer

    original = trainer.Trainer.step
    arrivals: dict[int, itertools.count] = {}

    def step(self, i, *args, **kwargs):
        hold = GATE / "hold-at"
        if hold.exists() and str(i) in hold.read_text().split():
            with _lock:
                n = next(arrivals.setdefault(i, itertools.count(1)))
            (GATE / f"held-{i}-{n}").touch()
            (GATE / f"held-{i}").touch()
            _wait_open(f"closed-{i}-{n}")
        return original(self, i, *args, **kwargs)

    trainer.Trainer.step = step

    from services.learner import class_images

    make_batch = class_images.make_batch

    def batch(pipe, prompt, seeds, *args, **kwargs):
        hold = GATE / "hold-class-at"
        if hold.exists() and str(seeds[0]) in hold.read_text().split():
            (GATE / f"class-held-{seeds[0]}").touch()
            _wait_open()
        return make_batch(pipe, prompt, seeds, *args, **kwargs)

    class_images.make_batch = batch


if __name__ == "__main__":
    service = sys.argv[1]
    {"localizer": _gate_localizer, "learner": _gate_learner}[service]()
    sys.argv = [f"services.{service}", *sys.argv[2:]]
    runpy.run_module(f"services.{service}", run_name="__main__", alter_sys=True)
