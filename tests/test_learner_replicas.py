"""Several learner replicas behind one load-balanced target (the Kubernetes StatefulSet behind a headless
Service): a job lives on the replica that took it, which advertises its address in the job's metadata, and the
SDK sends every later call about the job there. Two real learners on loopback, one round-robin target."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client import IceClient
from client.errors import ServiceError
from client.options import GenerateOptions, Schedule
from client.types import Job
from services.common.images import encode_mask
from services.common.server import start_server
from services.common.settings import LearnerSettings, from_sources
from services.learner.server import build_spec
from tests.conftest import free_port


@pytest.fixture(scope="module")
def replicas(tiny_bundle_dir, tmp_path_factory):
    running = []
    for i in range(2):
        port = free_port()  # known before the bind: the replica advertises its own address
        settings = from_sources(env={}, cls=LearnerSettings, host="127.0.0.1", port=port, metrics_port=0,
                                bundle=Path(tiny_bundle_dir), job_store=tmp_path_factory.mktemp(f"replica{i}"),
                                class_image_steps=2, advertise_address=f"127.0.0.1:{port}",
                                max_message_bytes=(64 << 20) + i)  # tells the replicas apart in GetServerInfo
        running.append(start_server(build_spec(settings), settings))
    assert all(r.wait_ready(600) for r in running)
    yield running
    for r in running:
        r.stop(grace=0)


def _concepts(photo_png):
    w, h = Image.open(io.BytesIO(photo_png)).size
    mask = np.zeros((h, w), bool)
    mask[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = True
    return [("cup", encode_mask(mask))]


def test_every_call_about_a_job_reaches_the_replica_that_owns_it(replicas, photo_png, tmp_path):
    balanced = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    schedule = Schedule(phase1_steps=2, phase2_steps=1, refinement_steps=1, num_class_images=0)
    with IceClient(learner=balanced, timeout=600) as ice:
        # round robin picks among READY connections only: wait until both replicas have answered a call
        answered, deadline = set(), time.monotonic() + 600
        while len(answered) < 2:
            assert time.monotonic() < deadline, "the second replica never became ready"
            answered.add(ice.server_info("learner")["max_message_bytes"])
        jobs = [ice.create_job(photo_png, _concepts(photo_png), schedule=schedule) for _ in range(4)]
        owners = [job.replica for job in jobs]
        assert set(owners) == {f"127.0.0.1:{r.port}" for r in replicas}
        assert sorted(owners.count(o) for o in set(owners)) == [2, 2]  # alternating over the two
        one_per_replica = {job.replica: job for job in jobs}.values()
        for job in jobs:
            for _ in range(4):  # calls that round robin alone would alternate between replicas
                assert ice.job(job.name).job_id == job.job_id
        for job in one_per_replica:  # the streaming calls too (Watch, GetArtifacts, Generate)
            assert ice.wait(job.name).tokens
            assert ice.artifacts(job.name, tmp_path / job.job_id)
            assert ice.generate(job.name, "free", prompts=["a photo of <&0>"],
                                options=GenerateOptions(num_images=1, num_inference_steps=2))
            ice.cancel(job.name)  # a no-op on a finished job, but it must reach the owner

        # By text alone ("name@replica", as `ice learn start` prints it) a new client reaches the owner too.
        with IceClient(learner=balanced, timeout=600) as fresh:
            for job in one_per_replica:
                for _ in range(4):
                    assert fresh.job(job.ref).state == "SUCCEEDED"

        # Control: without the replica, round robin reaches the other replica for some of the calls.
        with IceClient(learner=balanced, timeout=600) as blind:
            missed = 0
            for _ in range(12):
                try:
                    blind.job(Job(jobs[0].name))  # no replica known
                except ServiceError as exc:
                    assert exc.code.name == "NOT_FOUND"
                    missed += 1
            assert missed > 0
