"""A closed-loop load generator for the reliability test and `bench/bench_load.py`.

Each client is a thread with its own channel (its own HTTP/2 connection). It sends a request, waits for the
answer, records the status code and latency, and sends the next; after RESOURCE_EXHAUSTED (shed load) it backs
off 50-150 ms, as a well-behaved client does. A call is "late" when it took longer than its deadline plus a
small slack: the contract is that every call answers OK or RESOURCE_EXHAUSTED within its deadline.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

LATE_SLACK_S = 0.5


@dataclass
class LoadResult:
    clients: int
    duration_s: float
    deadline_s: float
    codes: Counter = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)
    shed_latencies: list[float] = field(default_factory=list)
    late: int = 0

    @property
    def calls(self) -> int:
        return sum(self.codes.values())

    @property
    def throughput(self) -> float:
        """Successful calls per second."""
        return self.codes["OK"] / self.duration_s

    @property
    def shed_fraction(self) -> float:
        return self.codes["RESOURCE_EXHAUSTED"] / max(self.calls, 1)

    def percentile(self, q: float, latencies: list[float] | None = None) -> float:
        values = sorted(self.ok_latencies if latencies is None else latencies)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]

    def unexpected(self) -> dict[str, int]:
        return {c: n for c, n in self.codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")}

    def summary(self) -> str:
        return (f"{self.clients} clients x {self.duration_s:.0f} s: {self.calls} calls, {self.codes['OK']} OK "
                f"({self.throughput:.2f}/s), shed {100 * self.shed_fraction:.0f}%, p50 {self.percentile(50):.3f} s, "
                f"p99 {self.percentile(99):.3f} s, late {self.late}, other codes {self.unexpected() or 'none'}")


def run_load(target: str, make_call: Callable[[grpc.Channel], Callable[[float], object]], *, clients: int,
             duration_s: float, deadline_s: float, seed: int = 0) -> LoadResult:
    """`make_call(channel)` returns `call(timeout)`; run `clients` closed loops of it for `duration_s`."""
    result = LoadResult(clients, duration_s, deadline_s)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with grpc.insecure_channel(target) as channel:
            call = make_call(channel)
            start.wait()
            while time.monotonic() < stop_at[0]:
                t0 = time.monotonic()
                try:
                    value = call(deadline_s)
                    if hasattr(value, "__next__"):
                        list(value)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                elapsed = time.monotonic() - t0
                with lock:
                    result.codes[code] += 1
                    if elapsed > deadline_s + LATE_SLACK_S:
                        result.late += 1
                    (result.ok_latencies if code == "OK" else result.shed_latencies).append(elapsed)
                if code == "RESOURCE_EXHAUSTED":
                    time.sleep(rng.uniform(0.05, 0.15))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at.append(time.monotonic() + duration_s)
    start.wait()
    began = time.monotonic()
    for t in threads:
        t.join(duration_s + deadline_s + 30)
    result.duration_s = time.monotonic() - began  # includes the tail of the last in-flight calls
    return result


def burst(target: str, call: Callable[[grpc.Channel, int, float], object], *, count: int,
          deadline_s: float) -> tuple[Counter, list[float], list[object]]:
    """`count` calls released at the same instant, one channel each: (codes, latencies, OK values)."""
    codes: Counter = Counter()
    latencies: list[float] = []
    values: list[object] = []
    lock = threading.Lock()
    gate = threading.Barrier(count)

    def one(index: int) -> None:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            gate.wait()
            t0 = time.monotonic()
            try:
                value, code = call(channel, index, deadline_s), "OK"
            except grpc.RpcError as err:
                value, code = None, err.code().name
            with lock:
                codes[code] += 1
                latencies.append(time.monotonic() - t0)
                if value is not None:
                    values.append(value)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline_s + 60)
    return codes, latencies, values
