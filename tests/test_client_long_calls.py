"""Long calls from the SDK: a job watch outlives the server's connection-age closes (re-opened from the last seen
step, each step seen once), for the sync and the asyncio client; deadlines grow with the work (Localize rounds,
Evaluate images)."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from client import AsyncIceClient, IceClient, Schedule
from client.channel import ChannelConfig
from client.errors import ServiceError
from client.longcalls import Resume
from client.options import LocalizeOptions
from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc


def _watch_calls() -> float:
    return REGISTRY.get_sample_value("grpc_server_started_total", {
        "grpc_type": "server_stream", "grpc_service": "ice.learner.v1.LearnerService",
        "grpc_method": "WatchLearningJob"}) or 0.0


@pytest.fixture(scope="module")
def aging_learner(tiny_bundle_dir, tmp_path_factory):
    """A learner whose connections are closed 1 s after they open (+ 0.5 s grace for calls in flight). The memory
    traces are made first (the test's jobs, and the default job the learner traces in the background at start-up,
    which holds the interpreter for seconds), so that CreateLearningJob answers within the grace."""
    from services.common.bundle import Bundle
    from services.common.server import start_server
    from services.common.settings import LearnerSettings, from_sources
    from services.learner.memory import MemoryEstimator
    from services.learner.server import build_spec
    from tests.conftest import free_port

    estimator = MemoryEstimator(Bundle.open(Path(tiny_bundle_dir)), "cpu")
    estimator.training_trace("embeddings", 1)
    estimator.warm()

    settings = from_sources(env={}, cls=LearnerSettings, host="127.0.0.1", port=free_port(), metrics_port=0,
                            bundle=Path(tiny_bundle_dir), job_store=tmp_path_factory.mktemp("jobs"),
                            class_image_steps=2, max_connection_age_ms=1000, max_connection_age_grace_ms=500)
    running = start_server(build_spec(settings), settings)
    assert running.wait_ready(120)
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=0)


def _concepts(photo_png):
    w, h = Image.open(io.BytesIO(photo_png)).size
    mask = np.zeros((h, w), bool)
    mask[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = True
    return [("cup", mask)]


SCHEDULE = Schedule(phase1_steps=12, phase2_steps=0, refinement_steps=0, num_class_images=0, lambda_attention=0.0,
                    checkpoint_every=0)
HELD_STEP = 5
PATIENCE = 300.0  # bounds a failure; never decides a pass


@pytest.fixture
def held_until_reopened(monkeypatch):
    """Training holds at step HELD_STEP until a watch has been re-opened (a second WatchLearningJob call started
    since `state["before"]`): the job outlives at least one connection-age close however fast the machine is."""
    from services.learner.trainer import Trainer

    original, state = Trainer.step, {"before": _watch_calls()}

    def step(self, i, *args, **kwargs):
        if i == HELD_STEP:
            deadline = time.monotonic() + PATIENCE
            while _watch_calls() - state["before"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", step)
    return state


def _create(ice, photo_png, seed: int):
    """Create the job; the call itself may meet a connection-age close on a slow machine: the same request_id makes
    the retry return the same job."""
    request_id = str(uuid.uuid4())
    for _ in range(20):
        try:
            return ice.create_job(photo_png, _concepts(photo_png), schedule=SCHEDULE, seed=seed,
                                  request_id=request_id)
        except ServiceError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE:
                raise
    raise AssertionError("CreateLearningJob met a closed connection 20 times")


def test_a_watch_outlives_connection_age_closes(aging_learner, photo_png, held_until_reopened):
    seen = []
    with IceClient(learner=aging_learner) as ice:
        job = _create(ice, photo_png, seed=1)
        held_until_reopened["before"] = before = _watch_calls()
        result = ice.wait(job, progress=seen.append)
    assert result.tokens and seen[-1].done and seen[-1].state == "SUCCEEDED"
    assert _watch_calls() - before >= 2  # the stream was cut while the job ran, and re-opened
    keys = [(p.state, p.phase, p.step) for p in seen]
    assert len(keys) == len(set(keys)), "an update was delivered twice after a re-open"
    steps = [p.step for p in seen]
    assert steps == sorted(steps) and steps[-1] == 12


def test_the_asyncio_watch_resumes_too(aging_learner, photo_png, held_until_reopened):
    async def create(ice):
        request_id = str(uuid.uuid4())
        for _ in range(20):
            try:
                return await ice.create_job(photo_png, _concepts(photo_png), schedule=SCHEDULE, seed=2,
                                            request_id=request_id)
            except ServiceError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
        raise AssertionError("CreateLearningJob met a closed connection 20 times")

    async def run():
        seen = []
        async with AsyncIceClient(learner=aging_learner) as ice:
            job = await create(ice)
            held_until_reopened["before"] = _watch_calls()
            result = await ice.wait(job, progress=seen.append)
        return seen, result

    seen, result = asyncio.run(run())
    assert result.tokens and seen[-1].done
    assert _watch_calls() - held_until_reopened["before"] >= 2
    steps = [p.step for p in seen]
    assert steps == sorted(steps) and len(set(steps)) >= 2 and steps[-1] == 12


def test_resume_policy_gives_up_on_other_codes_and_after_the_reconnect_window():
    config = ChannelConfig(watch_reconnect_s=0.05)
    resume = Resume(config)
    unavailable = ServiceError("learner", "x:1", grpc.StatusCode.UNAVAILABLE, "GOAWAY")
    assert resume.after_error(ServiceError("learner", "x:1", grpc.StatusCode.NOT_FOUND, "gone")) is None
    assert resume.after_error(unavailable) == 0.0  # a routine close: re-open at once
    assert resume.after_error(unavailable) == 0.2  # then back off
    time.sleep(0.1)
    assert resume.after_error(unavailable) is None  # unreachable for longer than the window
    timed = Resume(ChannelConfig(), timeout=0.0)
    assert timed.after_error(unavailable) is None  # the caller's own deadline wins


class _Recorder(localizer_pb2_grpc.LocalizerServiceServicer):
    def __init__(self):
        self.remaining: list[float] = []

    def Localize(self, request, context):
        self.remaining.append(context.time_remaining())
        return localizer_pb2.LocalizeResponse(width=8, height=8)


def test_deadlines_grow_with_the_work(photo_png):
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    localizer_pb2_grpc.add_LocalizerServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with IceClient(localizer=f"127.0.0.1:{port}", timeout=100, config=ChannelConfig(
                timeout=100, seconds_per_round=10)) as ice:
            ice.localize(photo_png)  # the published 11 rounds
            ice.localize(photo_png, LocalizeOptions(max_rounds=3))
    finally:
        server.stop(0)
    # 100 + 10 × 11 and 100 + 10 × 3 (gRPC rounds a deadline it sends up to a whole second or so)
    assert 205 < recorder.remaining[0] <= 212 and 125 < recorder.remaining[1] <= 132
    assert recorder.remaining[0] - recorder.remaining[1] == pytest.approx(80, abs=3)
