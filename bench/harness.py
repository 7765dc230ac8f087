"""Shared benchmark plumbing: timing, the result record, the device name.

A benchmark module `bench/bench_*.py` defines `run(quick: bool) -> list[BenchResult]`. Every result compares
our implementation with a reference formulation measured in the same run on the same inputs, because
absolute times on a shared 2-core machine are noisy; the ratio is what we track.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class BenchResult:
    name: str
    ours_s: float  # median seconds per call of our implementation
    reference_s: float  # median seconds per call of the reference formulation
    reference: str  # what the reference is
    unit: str = "call"
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """reference / ours: > 1 means ours is faster."""
        return self.reference_s / self.ours_s if self.ours_s > 0 else float("inf")

    def to_json(self, device: str, date: str) -> dict:
        out = asdict(self)
        out.update(ratio=self.ratio, device=device, date=date)
        return out


def timeit(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, min_time: float = 0.0,
           clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of `fn` over `repeat` runs after `warmup` runs (syncs CUDA when in use). `clock`: wall time by
    default; `cpu_clock` counts only the CPU this process got, which stays meaningful on a busy machine."""
    sync = _cuda_sync()
    for _ in range(warmup):
        fn()
    sync()
    times = []
    started = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - started) < min_time:
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return statistics.median(times)


def cpu_clock() -> float:
    """CPU seconds of this process, every thread (on CUDA, wall time: the device's work is not CPU time)."""
    try:
        import torch

        if torch.cuda.is_available():
            return time.perf_counter()
    except ImportError:
        pass
    return time.process_time()


def load_average() -> float:
    """The 1-minute load average, recorded beside CPU-time figures taken on a shared machine."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def _cuda_sync() -> Callable[[], None]:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.synchronize
    except ImportError:
        pass
    return lambda: None


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    import os

    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"
