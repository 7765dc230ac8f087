"""Load on loopback against real service processes (tiny bundle): latency under load against a single client.

- localizer: N closed-loop clients for D seconds (full: 32 x 60 s; quick: 8 x 10 s) against a server capped at
  4 concurrent RPCs; ours = p50 of the successful calls under load, reference = p50 of one client alone on the
  same server, ratio = the slowdown. extra: p99, throughput, shed fraction, calls late past their deadline,
  unexpected codes, server RSS before/after (MiB).
- learner: a burst of simultaneous CreateLearningJob calls (full: 64; quick: 16) against a queue of 8; ours = p50
  latency in the burst, reference = p50 of one creation alone. extra: accepted/shed counts, the slowest call.
Every call must answer OK or RESOURCE_EXHAUSTED within its deadline; the benchmark fails otherwise.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness import BenchResult  # noqa: E402

from ice.learner.v1 import learner_pb2, learner_pb2_grpc  # noqa: E402
from tests.reliability.corpus import mask_png  # noqa: E402
from tests.reliability.harness import ServiceProcess  # noqa: E402
from tests.reliability.loadgen import burst, run_load  # noqa: E402
from tests.reliability.test_load import IMAGE, localize_call  # noqa: E402

DEADLINE_S = 30.0


def _bundle(folder: Path) -> Path:
    from services.common.tiny_bundle import build_tiny_bundle

    prebuilt = ROOT / "build" / "tiny-bundle"
    return prebuilt if (prebuilt / "bundle.json").is_file() else build_tiny_bundle(folder / "bundle", seed=0)


def _localizer(bundle: Path, folder: Path, clients: int, duration: float) -> BenchResult:
    proc = ServiceProcess("localizer", bundle, folder / "localizer.log",
                          args=["--max-concurrent-rpcs", "4", "--max-workers", "8"])
    try:
        proc.wait_ready()
        call = localize_call(proc.channel)
        for _ in range(3):
            call(60)
        single = []
        for _ in range(8):
            t0 = time.perf_counter()
            call(60)
            single.append(time.perf_counter() - t0)
        rss_before = proc.rss_kib() / 1024
        result = run_load(f"127.0.0.1:{proc.port}", localize_call, clients=clients, duration_s=duration,
                          deadline_s=DEADLINE_S)
        rss_after = proc.rss_kib() / 1024
    finally:
        proc.stop()
    print(f"  localizer: {result.summary()}; RSS {rss_before:.0f} -> {rss_after:.0f} MiB", flush=True)
    if result.unexpected() or result.late:
        raise AssertionError(f"load contract broken: {result.summary()}")
    return BenchResult(
        f"load_localizer_{clients}x{duration:.0f}s", result.percentile(50), statistics.median(single),
        "one client alone on the same server", unit="Localize (64x96 px, max_rounds=1)",
        notes="ours = p50 of OK calls under load; ratio = slowdown; server capped at 4 concurrent RPCs",
        extra={"p99_s": result.percentile(99), "throughput_ok_per_s": result.throughput,
               "shed_fraction": result.shed_fraction, "calls": result.calls, "late": result.late,
               "codes": dict(result.codes), "rss_before_mib": rss_before, "rss_after_mib": rss_after,
               "rss_growth_mib": rss_after - rss_before, "clients": clients, "duration_s": result.duration_s,
               "deadline_s": DEADLINE_S})


def _learner(bundle: Path, folder: Path, count: int) -> BenchResult:
    proc = ServiceProcess("learner", bundle, folder / "learner.log",
                          args=["--job-store", str(folder / "store"), "--queue-size", "8"])
    request = learner_pb2.CreateLearningJobRequest(
        image=IMAGE, concepts=[learner_pb2.ConceptInput(noun="cup", mask=mask_png((96, 64)))],
        schedule=learner_pb2.Schedule(phase1_steps=5000, phase2_steps=0, refinement_steps=0, num_class_images=0))

    def create(channel, index, timeout):
        return learner_pb2_grpc.LearnerServiceStub(channel).CreateLearningJob(request, timeout=timeout)

    try:
        proc.wait_ready()
        from google.longrunning import operations_pb2, operations_pb2_grpc

        stub = learner_pb2_grpc.LearnerServiceStub(proc.channel)
        ops = operations_pb2_grpc.OperationsStub(proc.channel)
        single = []
        for _ in range(3):  # one at a time, each cancelled so that the queue stays empty
            t0 = time.perf_counter()
            op = stub.CreateLearningJob(request, timeout=DEADLINE_S)
            single.append(time.perf_counter() - t0)
            ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=10)
        time.sleep(2)  # let the runner observe the cancellations
        rss_before = proc.rss_kib() / 1024
        codes, latencies, accepted = burst(f"127.0.0.1:{proc.port}", create, count=count, deadline_s=DEADLINE_S)
        for op in accepted:
            ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=10)
        rss_after = proc.rss_kib() / 1024
    finally:
        proc.stop()
    print(f"  learner burst of {count}: {dict(codes)}, p50 {statistics.median(latencies):.3f} s, "
          f"max {max(latencies):.3f} s; RSS {rss_before:.0f} -> {rss_after:.0f} MiB", flush=True)
    if set(codes) - {"OK", "RESOURCE_EXHAUSTED"} or max(latencies) > DEADLINE_S + 0.5:
        raise AssertionError(f"burst contract broken: {dict(codes)}")
    return BenchResult(
        f"load_learner_burst_{count}", statistics.median(latencies), statistics.median(single),
        "one CreateLearningJob alone", unit="CreateLearningJob",
        notes="ours = p50 latency of a simultaneous burst against a queue of 8",
        extra={"codes": dict(codes), "max_s": max(latencies), "rss_before_mib": rss_before,
               "rss_after_mib": rss_after, "count": count})


def run(quick: bool) -> list[BenchResult]:
    with tempfile.TemporaryDirectory(prefix="ice-bench-load-") as tmp:
        folder = Path(tmp)
        bundle = _bundle(folder)
        clients, duration, count = (8, 10.0, 16) if quick else (32, 60.0, 64)
        return [_localizer(bundle, folder, clients, duration), _learner(bundle, folder, count)]


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(r)
