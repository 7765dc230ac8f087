"""Bounded load on loopback against real service processes (the short version of `bench/bench_load.py`):

- the localizer, capped at 4 concurrent RPCs, under 8 closed-loop clients for 5 s: every call answers OK or
  RESOURCE_EXHAUSTED (shed) within its deadline, shedding does happen, the server's RSS stays within a bound,
  and a single call is served promptly afterwards;
- the learner, with a queue of 3, under a burst of 12 simultaneous CreateLearningJob calls: each answers OK or
  RESOURCE_EXHAUSTED within its deadline, exactly as many jobs as the queue (plus the one the runner took) are
  accepted, and every accepted job is listed, cancellable and ends CANCELLED: nothing lost, nothing phantom.
"""

from __future__ import annotations

import time

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc
from tests.reliability.corpus import encode, mask_png, photo
from tests.reliability.harness import ServiceProcess, metric
from tests.reliability.loadgen import burst, run_load

IMAGE = encode(photo(96, 64), "PNG")
LOCALIZE = localizer_pb2.LocalizeRequest(image=IMAGE, options=localizer_pb2.LocalizeOptions(max_rounds=1))
RSS_BOUND_MIB = 150  # growth allowed over a load run, after warm-up


def localize_call(channel):
    stub = localizer_pb2_grpc.LocalizerServiceStub(channel)
    return lambda timeout: stub.Localize(LOCALIZE, timeout=timeout)


@pytest.fixture(scope="module")
def localizer(tiny_bundle_dir, tmp_path_factory):
    proc = ServiceProcess("localizer", tiny_bundle_dir, tmp_path_factory.mktemp("load") / "localizer.log",
                          metrics_port=-1, args=["--max-concurrent-rpcs", "4", "--max-workers", "8"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_localizer_sheds_load_within_deadlines_and_memory_stays_bounded(localizer):
    target = f"127.0.0.1:{localizer.port}"
    call = localize_call(localizer.channel)
    for _ in range(3):  # warm-up: lazy imports, allocator pools
        call(60)
    rss_before = localizer.rss_kib()
    result = run_load(target, localize_call, clients=8, duration_s=5, deadline_s=30)
    rss_after = localizer.rss_kib()
    print(f"\nlocalizer load: {result.summary()}; RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB")
    assert not result.unexpected(), result.summary()
    assert result.late == 0, result.summary()
    assert result.codes["OK"] >= 2 and result.codes["RESOURCE_EXHAUSTED"] >= 1, result.summary()
    assert (rss_after - rss_before) / 1024 < RSS_BOUND_MIB
    # nothing is left queued: every call the server started has finished (shed calls never start), and the next
    # call is served
    started = metric(localizer.metrics_port, "grpc_server_started_total", grpc_method="Localize")
    handled = metric(localizer.metrics_port, "grpc_server_handled_total", grpc_method="Localize")
    assert started == handled >= result.codes["OK"]
    assert call(60).rounds == 1


@pytest.fixture(scope="module")
def learner(tiny_bundle_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("burst")
    proc = ServiceProcess("learner", tiny_bundle_dir, folder / "learner.log",
                          args=["--job-store", str(folder / "store"), "--queue-size", "3", "--class-image-steps", "2"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_learner_job_burst_is_admitted_up_to_the_queue_and_nothing_is_lost(learner):
    request = learner_pb2.CreateLearningJobRequest(
        image=IMAGE, concepts=[learner_pb2.ConceptInput(noun="cup", mask=mask_png((96, 64)))],
        schedule=learner_pb2.Schedule(phase1_steps=5000, phase2_steps=0, refinement_steps=0, num_class_images=0))

    def create(channel, index, timeout):
        return learner_pb2_grpc.LearnerServiceStub(channel).CreateLearningJob(request, timeout=timeout)

    rss_before = learner.rss_kib()
    codes, latencies, ops = burst(f"127.0.0.1:{learner.port}", create, count=12, deadline_s=30)
    print(f"\nlearner burst: {dict(codes)}, latency max {max(latencies):.2f} s")
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert max(latencies) < 30 + 0.5
    assert 3 <= codes["OK"] <= 4, codes  # the queue (3), plus the job the runner may already have taken

    stub = operations_pb2_grpc.OperationsStub(learner.channel)
    accepted = {op.name for op in ops}
    listed = {op.name for op in stub.ListOperations(operations_pb2.ListOperationsRequest(name="operations"),
                                                    timeout=10).operations}
    assert listed == accepted
    for name in accepted:
        stub.CancelOperation(operations_pb2.CancelOperationRequest(name=name), timeout=10)
    deadline = time.monotonic() + 60
    while True:
        ops_now = stub.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), timeout=10).operations
        if all(op.done for op in ops_now):
            break
        assert time.monotonic() < deadline, "cancelled jobs did not end"
        time.sleep(0.3)
    assert all(op.error.code == grpc.StatusCode.CANCELLED.value[0] for op in ops_now)
    rss_after = learner.rss_kib()
    print(f"learner RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB (incl. loading the trainer)")
    assert (rss_after - rss_before) / 1024 < 1024
