"""One `ice extract` (the SDK's `IceClient.extract`) is one trace across the three real services: the client's
spans (traced_extract.py) and the services' spans (the in-memory exporter of serve_traced.py) share one trace id,
every server span's parent is the client span of the same call and arrived over the wire (a remote parent: the
processes share nothing but gRPC metadata), and the stage spans sit where they belong: retrieve, attention and
segment inside the Localize call, the learning job and its phases under CreateLearningJob, generate and evaluate
inside their calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_one_extract_is_one_trace_across_the_three_services(interop_services, photo_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, str(HERE / "traced_extract.py"), "--targets",
                           json.dumps(interop_services.targets), "--image", str(photo_file), "--out", str(tmp_path)],
                          cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:] + interop_services.log_tail()
    result = json.loads(done.stdout)
    client = result["spans"]
    assert (tmp_path / "report.html").is_file() and result["concepts"] >= 1

    # the client: one root, `ice.extract`; a span per stage under it; every call's CLIENT span under a stage
    (root,) = [s for s in client if s["parent_id"] is None]
    assert root["name"] == "ice.extract"
    trace_id = root["trace_id"]
    assert {s["trace_id"] for s in client} == {trace_id}
    by_id = {s["span_id"]: s for s in client}
    stages = {s["name"]: s for s in client if s["parent_id"] == root["span_id"]}
    assert set(stages) == {"extract.localize", "extract.learn", "extract.generate", "extract.evaluate", "extract.report"}
    calls = [s for s in client if s["kind"] == "CLIENT"]
    assert all(by_id[s["parent_id"]]["name"].startswith("extract.") for s in calls)
    assert {s["name"] for s in calls} >= {"ice.localizer.v1.LocalizerService/Localize",
                                          "ice.learner.v1.LearnerService/CreateLearningJob",
                                          "ice.learner.v1.LearnerService/WatchLearningJob",
                                          "ice.learner.v1.LearnerService/Generate",
                                          "ice.evaluator.v1.EvaluatorService/Evaluate"}

    # the services: the same trace, every call's SERVER span a remote child of its CLIENT span
    server = [s for s in interop_services.spans() if s["trace_id"] == trace_id]
    assert {s["scope"] for s in server} == {"ice.localizer", "ice.learner", "ice.evaluator"}
    rpcs = [s for s in server if s["kind"] == "SERVER"]
    assert sorted(s["parent_id"] for s in rpcs) == sorted(s["span_id"] for s in calls)  # each call reached a server
    for s in rpcs:
        assert s["parent_remote"] is True and by_id[s["parent_id"]]["name"] == s["name"]
        assert s["attributes"]["rpc.grpc.status_code"] == 0 and s["status"] != "ERROR"
    by_id.update({s["span_id"]: s for s in server})

    def parent(span):
        return by_id[span["parent_id"]]

    names = Counter((s["scope"], s["name"]) for s in server if s["kind"] != "SERVER")
    # localizer: decode, then retrieve -> attention -> segment inside each round, then masks and encode
    localize = next(s for s in rpcs if s["name"].endswith("/Localize"))
    for stage in ("retrieve", "attention", "segment"):
        spans = [s for s in server if s["name"] == stage]
        assert spans and all(parent(s)["name"] == "localize.round" and parent(parent(s)) is localize for s in spans)
        for s in spans:  # rebuilt from the loop's own timings: inside the call, after the round began
            assert localize["start"] <= parent(s)["start"] <= s["start"] <= s["end"] <= localize["end"]
    assert names[("ice.localizer", "decode")] == names[("ice.localizer", "encode")] == 1
    # learner: the job runs after CreateLearningJob returned, yet in its trace; its phases under it
    create = next(s for s in rpcs if s["name"].endswith("/CreateLearningJob"))
    (learn,) = [s for s in server if s["name"] == "learn"]
    assert parent(learn) is create and learn["attributes"]["ice.job_state"] == "succeeded"
    phases = sorted((s for s in server if s["name"].startswith("learn.")), key=lambda s: s["start"])
    assert [s["name"] for s in phases] == ["learn.preparing", "learn.object_level", "learn.intrinsic",
                                           "learn.refinement", "learn.finishing"]
    assert all(parent(s) is learn and learn["start"] <= s["start"] <= s["end"] <= learn["end"] for s in phases)
    # generate: one span per Generate call (object-level, intrinsic, and the composition when 2 concepts)
    generates = [s for s in server if s["name"] == "generate"]
    assert len(generates) == len([s for s in rpcs if s["name"].endswith("/Generate")]) >= 2
    assert all(parent(s)["name"].endswith("/Generate") for s in generates)
    # evaluator
    (evaluate,) = [s for s in server if s["name"] == "evaluate"]
    assert parent(evaluate)["name"] == "ice.evaluator.v1.EvaluatorService/Evaluate"
    assert evaluate["attributes"]["ice.encoders"] == ["clip", "dino"]
