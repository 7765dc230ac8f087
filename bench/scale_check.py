"""Real-size check: SD-2.1-base, ViT-B-32 and ViT-S/16 (random weights) through the three services, with the time and
the peak memory of every stage.

    make scale-check                   # or: .venv/bin/python bench/scale_check.py [--work build/scale-check]

Stages, each in its own process so that its peak resident memory is its own (the services run one at a time):

1. `weights`: random weights with the real configurations (`bench/real_size.py`);
2. `assemble`: `ice-bundle assemble --precision float16` (weights converted, the VAE kept float32);
3. the localizer: start, one round of Localize on a 512 px photo;
4. the learner: start, one job with a few steps of each phase, ending in full-UNet refinement (not LoRA) with
   prior preservation (one class image); its announced memory estimate is compared with the peak it reached;
   the learner's memory after the job is compared with its idle footprint; then Generate;
5. the evaluator: start, Evaluate the generated images against the localizer's mask.

Prints a table and writes `bench/results/scale-check.json`. Needs about 20 GB of free memory (it refuses to
start with less than `--min-free-gib`) and about 20 minutes on 2 CPU cores; not part of `make test`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1 << 30
BUDGET_SECONDS = 20 * 60
BUDGET_BYTES = 20 * 10**9


# -- measuring processes ------------------------------------------------------------------------------------------


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss(pid: int) -> int:
    return _status(pid, "VmRSS")


def peak(pid: int) -> int:
    return _status(pid, "VmHWM")


def reset_peak(pid: int) -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_measured(cmd: list[str], log_path: Path) -> tuple[float, int]:
    """Run a command to its end: (seconds, peak resident bytes of that process)."""
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log_path}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT),
                HF_HUB_DISABLE_TELEMETRY="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One service as its own process on loopback."""

    def __init__(self, name: str, bundle: Path, log_path: Path, *extra: str):
        self.name, self.port = name, free_port()
        cmd = [sys.executable, "-m", f"services.{name}", "--bundle", str(bundle), "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", "0", *extra]
        self.log = open(log_path, "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()
        self.start_seconds = time.perf_counter() - t0
        self.start_peak = peak(self.proc.pid)
        self.address = f"127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 900) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the {self.name} exited while starting ({self.proc.returncode})")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service="readiness"),
                                  timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"the {self.name} was not ready after {timeout:.0f} s")
                time.sleep(0.5)
        finally:
            channel.close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Sampler:
    """Resident memory of a process every 0.2 s, the maximum per label (e.g. the learning phase)."""

    def __init__(self, pid: int):
        self.pid, self.label, self.maxima = pid, "", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = rss(self.pid)
            except OSError:
                return
            if self.label:
                self.maxima[self.label] = max(self.maxima.get(self.label, 0), value)
            self._stop.wait(0.2)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.maxima


# -- the check ----------------------------------------------------------------------------------------------------


def photo_png() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).convert("RGB").save(buf, format="PNG")  # 512 x 512
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "scale-check")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale-check.json")
    ap.add_argument("--steps", default="2,2,2", help="object-level, intrinsic, refinement steps (default 2,2,2)")
    ap.add_argument("--min-free-gib", type=float, default=20.0)
    ap.add_argument("--keep-weights", action="store_true", help="reuse weights and bundle from an earlier run")
    args = ap.parse_args(argv)
    phase1, phase2, refinement = (int(x) for x in args.steps.split(","))
    if mem_available() < args.min_free_gib * GIB:
        print(f"scale-check: {mem_available() / GIB:.1f} GiB of memory is available, {args.min_free_gib:.0f} GiB "
              "is needed (stop other work, or pass --min-free-gib)", file=sys.stderr)
        return 2

    from client import IceClient, Schedule
    from client.options import GenerateOptions, LocalizeOptions

    work = args.work
    weights, bundle, logs = work / "weights", work / "bundle", work / "logs"
    if not args.keep_weights:
        shutil.rmtree(work, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.perf_counter()

    def row(stage: str, seconds: float, peak_bytes: int, **extra) -> None:
        rows.append({"stage": stage, "seconds": round(seconds, 1), "peak_rss_gib": round(peak_bytes / GIB, 2),
                     **extra})
        note = "  ".join(f"{k}={v}" for k, v in extra.items())
        print(f"  {stage:<34} {seconds:8.1f} s  {peak_bytes / GIB:6.2f} GiB  {note}", flush=True)

    print(f"scale-check in {work} ({mem_available() / GIB:.1f} GiB available)", flush=True)
    if not (weights / "done.json").is_file():
        row("weights (random, real configs)", *run_measured(
            [sys.executable, str(ROOT / "bench" / "real_size.py"), "--out", str(weights)], logs / "weights.log"))
    paths = json.loads((weights / "done.json").read_text())
    if not (bundle / "bundle.json").is_file():
        seconds, peak_bytes = run_measured(
            [str(Path(sys.executable).with_name("ice-bundle")), "assemble", "--out", str(bundle),
             "--diffusion", paths["diffusion"], "--open-clip-config", paths["open_clip_config"],
             "--open-clip-weights", paths["open_clip_weights"], "--dino", paths["dino"], "--precision", "float16",
             "--force"], logs / "assemble.log")
        source = sum(p.stat().st_size for p in Path(paths["diffusion"]).rglob("*.safetensors"))
        stored = sum(p.stat().st_size for p in (bundle / "diffusion").rglob("*.safetensors"))
        row("assemble --precision float16", seconds, peak_bytes,
            diffusion_gib=f"{source / GIB:.2f}->{stored / GIB:.2f}")
    image = photo_png()

    # -- localizer: one round ---------------------------------------------------------------------------------
    svc = Service("localizer", bundle, logs / "localizer.log")
    row("localizer: start (load)", svc.start_seconds, svc.start_peak)
    try:
        with IceClient(localizer=svc.address) as ice:
            reset_peak(svc.proc.pid)
            t0 = time.perf_counter()
            loc = ice.localize(image, LocalizeOptions(max_rounds=1, seed=0))
            stages = {name: round(s, 1) for name, s in loc.timings}
            row("localizer: Localize, 1 round, 512 px", time.perf_counter() - t0, peak(svc.proc.pid),
                concepts=len(loc.concepts), **stages)
    finally:
        svc.stop()
    concepts = [(c.noun, c.mask_png) for c in loc.concepts[:1]]
    if not concepts:  # random weights may segment nothing: a central box stands in
        import numpy as np

        from services.common.images import encode_mask

        box = np.zeros((512, 512), bool)
        box[128:384, 128:384] = True
        concepts = [("object", encode_mask(box))]

    # -- learner: a job ending in full refinement, then Generate ----------------------------------------------
    svc = Service("learner", bundle, logs / "learner.log", "--job-store", str(work / "jobs"), "--class-image-steps", "2")
    row("learner: start (load)", svc.start_seconds, svc.start_peak)
    estimate = None
    try:
        with IceClient(learner=svc.address) as ice:
            time.sleep(2)
            idle = rss(svc.proc.pid)
            reset_peak(svc.proc.pid)
            schedule = Schedule(phase1_steps=phase1, phase2_steps=phase2, refinement_steps=refinement,
                                num_class_images=1, checkpoint_every=0)
            t0 = time.perf_counter()
            job = ice.create_job(image, concepts, schedule=schedule, refinement_delta="full", seed=0)
            created = time.perf_counter() - t0
            sampler = Sampler(svc.proc.pid)
            phase_start, phase_times = {}, {}

            def progress(p) -> None:
                nonlocal estimate
                label = "queued" if p.phase in ("", "UNSPECIFIED") else p.phase.lower()  # no phase before it runs
                if label not in phase_start:
                    phase_start[label] = time.perf_counter()
                sampler.label = label
                estimate = estimate or _estimate(svc.address, job.name)

            result = ice.wait(job, progress=progress)
            job_seconds = time.perf_counter() - t0
            maxima = sampler.stop()
            job_peak = peak(svc.proc.pid)
            ordered = sorted(phase_start.items(), key=lambda kv: kv[1])
            for (label, at), nxt in zip(ordered, [*[t for _, t in ordered[1:]], t0 + job_seconds], strict=True):
                phase_times[label] = nxt - at
            for label, _ in ordered:
                row(f"learner: {label}", phase_times[label], maxima.get(label, 0))
            time.sleep(2)
            after = rss(svc.proc.pid)
            files = {f.name: f.size_bytes for f in result.artifacts}
            row("learner: whole job", job_seconds, job_peak, create_s=round(created, 1),
                delta_gib=round(files.get("unet_delta.safetensors", 0) / GIB, 2))
            reset_peak(svc.proc.pid)
            t0 = time.perf_counter()
            generated = ice.generate(job, "object_level", options=GenerateOptions(num_images=1, num_inference_steps=4,
                                                                                   seed=0))
            row("learner: Generate 1 image, 4 steps", time.perf_counter() - t0, peak(svc.proc.pid))
    finally:
        svc.stop()
    memory = {"learner_idle_gib": round(idle / GIB, 2), "learner_after_job_gib": round(after / GIB, 2),
              "job_peak_above_idle_gib": round((job_peak - idle) / GIB, 2),
              "job_estimate_gib": round((estimate or 0) / GIB, 2)}
    print(f"  learner memory: idle {idle / GIB:.2f} GiB, after the job {after / GIB:.2f} GiB; the job's peak "
          f"{(job_peak - idle) / GIB:.2f} GiB above idle against its estimate of {(estimate or 0) / GIB:.2f} GiB")

    # -- evaluator --------------------------------------------------------------------------------------------
    svc = Service("evaluator", bundle, logs / "evaluator.log")
    row("evaluator: start (load)", svc.start_seconds, svc.start_peak)
    try:
        with IceClient(evaluator=svc.address) as ice:
            reset_peak(svc.proc.pid)
            t0 = time.perf_counter()
            scores = ice.evaluate(image, [("c0", concepts[0][1], [g.image_png for g in generated])])
            row("evaluator: Evaluate", time.perf_counter() - t0, peak(svc.proc.pid),
                encoders="+".join(s.encoder for s in scores.scores))
    finally:
        svc.stop()

    total = time.perf_counter() - started
    worst = max(r["peak_rss_gib"] for r in rows) * GIB
    failures = []
    if "unet_delta.safetensors" not in files:
        failures.append("the job produced no full-UNet delta")
    if estimate is None or job_peak - idle > estimate:
        failures.append(f"the job's peak ({(job_peak - idle) / GIB:.2f} GiB above idle) exceeded its estimate "
                        f"({(estimate or 0) / GIB:.2f} GiB)")
    if total > BUDGET_SECONDS:
        failures.append(f"took {total / 60:.1f} min (budget {BUDGET_SECONDS / 60:.0f})")
    if worst > BUDGET_BYTES:
        failures.append(f"a stage peaked at {worst / 1e9:.1f} GB (budget {BUDGET_BYTES / 1e9:.0f})")
    report = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine(),
              "steps": [phase1, phase2, refinement], "total_seconds": round(total, 1), "stages": rows, **memory,
              "failures": failures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"scale-check: {total / 60:.1f} min, largest stage peak {worst / GIB:.2f} GiB; wrote {args.out}")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


def _estimate(address: str, name: str) -> int | None:
    """The job's announced memory estimate (LearningJobMetadata.memory_estimate_bytes)."""
    import grpc
    from google.longrunning import operations_pb2, operations_pb2_grpc

    from ice.learner.v1 import learner_pb2

    with grpc.insecure_channel(address) as channel:
        op = operations_pb2_grpc.OperationsStub(channel).GetOperation(
            operations_pb2.GetOperationRequest(name=name), timeout=30)
    md = learner_pb2.LearningJobMetadata()
    op.metadata.Unpack(md)
    return md.memory_estimate_bytes if md.HasField("memory_estimate_bytes") else None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{cpu}, {os.cpu_count()} cores, {total / GIB:.0f} GiB RAM"


if __name__ == "__main__":
    sys.exit(main())
