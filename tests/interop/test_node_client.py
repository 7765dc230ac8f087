"""The contract from another language: tests/interop/node/client.js (Node.js, @grpc/grpc-js + @grpc/proto-loader,
googleapis from google-proto-files) loads only the .proto files and calls the real services (tiny bundle):
Localize a real photo, CreateLearningJob + WatchLearningJob with a tiny schedule, GetOperation with its Any
response unpacked, Generate, Evaluate."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"


def test_node_client_calls_every_service(interop_services, photo_file):
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("node and tests/interop/node/node_modules are needed: `make test` installs them (npm ci)")
    t = interop_services.targets
    done = subprocess.run([node, str(NODE_DIR / "client.js"), "--localizer", t["localizer"], "--learner", t["learner"],
                           "--evaluator", t["evaluator"], "--image", str(photo_file)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr + interop_services.log_tail()
    out = json.loads(done.stdout)

    loc = out["localize"]
    assert (loc["width"], loc["height"]) == (600, 400)
    assert len(loc["concepts"]) == 1 and loc["concepts"][0]["noun"] and loc["concepts"][0]["mask_is_png"]
    assert 0 < loc["concepts"][0]["area_fraction"] <= 1
    assert loc["stop_reason"].startswith("STOP_REASON_") and {"retrieve", "attention", "segment"} <= set(loc["timings"])

    create = out["create"]
    assert create["name"].startswith("operations/") and not create["done"]
    assert create["metadata_type"] == "ice.learner.v1.LearningJobMetadata"
    assert create["state"] in ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING")

    watch = out["watch"]
    assert watch["states"][-1] == "JOB_STATE_SUCCEEDED" and watch["updates"] >= 2
    assert {"PHASE_OBJECT_LEVEL", "PHASE_INTRINSIC", "PHASE_REFINEMENT"} <= set(watch["phases"])
    last = watch["last"]
    assert last["done"] and last["result"] == "response" and last["step"] == last["total_steps"] == 5
    assert "<&0>" in last["tokens"] and len(last["tokens"]) >= 5  # instance, concept and three intrinsic tokens

    operation = out["operation"]
    assert operation["done"] and operation["result"] == "response"
    assert operation["response_type"] == "ice.learner.v1.LearningJobResult"
    assert "learned_embeds.safetensors" in operation["artifacts"]

    (image,) = out["generate"]
    assert image["is_png"] and image["concept_id"] == loc["concepts"][0]["concept_id"] and "<&0>" in image["prompt"]

    scores = {s["encoder"]: s for s in out["evaluate"]}
    assert set(scores) == {"ENCODER_CLIP", "ENCODER_DINO"}
    for s in scores.values():
        assert -1 <= s["sim_i"] <= 1 and 0 <= s["acc1"] <= 1 and s["concepts"] == [loc["concepts"][0]["concept_id"]]
