"""End to end: `ice serve` starts the real localizer, learner and evaluator as separate processes on loopback
(tiny bundle), the SDK drives a full extraction with a short schedule, the report links only files that
exist, Ctrl-C stops the services; and the same extraction runs in-process (`ice extract --local`)."""

from __future__ import annotations

import html.parser
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from client import ExtractOptions, GenerateOptions, IceClient, LocalizeOptions, Schedule
from client.cli import main

REPO = Path(__file__).resolve().parent.parent
SHORT = ExtractOptions(
    # the tiny bundle's random attention needs a small merge threshold to give the noun segments
    localize=LocalizeOptions(max_concepts=2, max_rounds=2, merge_threshold=0.0008, min_area_fraction=0.0),
    schedule=Schedule(phase1_steps=2, phase2_steps=2, refinement_steps=1, num_class_images=2, checkpoint_every=0),
    generate=GenerateOptions(num_images=1, num_inference_steps=2, seed=0),
    seed=0,
)
SHORT_FLAGS = ["--max-concepts", "2", "--max-rounds", "2", "--merge-threshold", "0.0008", "--min-area-fraction", "0",
               "--quick", "--num-images", "1", "--inference-steps", "2",
               "--generate-seed", "0", "--seed", "0"]


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href")]


def _check_report(folder: Path, n_concepts: int) -> None:
    parser = _Refs()
    parser.feed((folder / "report.html").read_text())
    assert parser.refs
    for ref in parser.refs:
        assert "://" not in ref and (folder / ref).is_file(), ref
    record = json.loads((folder / "extraction.json").read_text())
    assert len(record["localization"]["concepts"]) == n_concepts
    grids = record["files"]["grids"]
    for c in record["localization"]["concepts"]:  # object-level and every intrinsic attribute per concept
        cid = c["concept_id"]
        assert {f"{cid}_object", f"{cid}_texture", f"{cid}_material", f"{cid}_color"} <= set(grids)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def served(tiny_bundle_dir, tmp_path_factory):
    from conftest import free_port, interruptible

    ports = [free_port() for _ in range(3)]
    logs = tmp_path_factory.mktemp("serve-logs")
    serve = subprocess.Popen(
        [sys.executable, "-m", "client", "serve", "--bundle", str(tiny_bundle_dir), "--ports", *map(str, ports),
         "--log-dir", str(logs), "--json"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=interruptible)
    lines = []
    for line in serve.stdout:  # the JSON document ends with a line "}" once every service is ready
        lines.append(line)
        if line.rstrip() == "}":
            break
    if not lines or serve.poll() is not None:
        serve.kill()
        pytest.fail(f"ice serve did not start:\n{serve.stderr.read()[-4000:]}")
    info = json.loads("".join(lines))
    yield serve, info, ports
    if serve.poll() is None:
        serve.kill()


def test_services_as_processes_sdk_full_extraction(served, photo_png, tmp_path):
    serve, info, ports = served
    assert info["targets"] == {"localizer": f"127.0.0.1:{ports[0]}", "learner": f"127.0.0.1:{ports[1]}",
                               "evaluator": f"127.0.0.1:{ports[2]}"}
    updates = []
    with IceClient(**info["targets"]) as ice:
        assert ice.server_info("learner")["bundle"]["name"].startswith("tiny")
        x = ice.extract(photo_png, out_dir=tmp_path / "x", options=SHORT, progress=updates.append)
    n = len(x.localization.concepts)
    assert 1 <= n <= 2 and x.localization.width == 600 and x.localization.height == 400
    assert updates and updates[-1].done and updates[-1].state == "SUCCEEDED"
    assert updates[-1].total_steps == 5 and updates[-1].step == 5
    assert x.learning.bundle["name"].startswith("tiny")
    for c in x.localization.concepts:
        assert len(x.images_for(c.concept_id, "OBJECT_LEVEL")) == 1
        assert {g.attribute for g in x.generated if g.concept_id == c.concept_id and g.kind == "INTRINSIC"} == {
            "texture", "material", "color", ""}
    assert x.evaluation is not None and {s.encoder for s in x.evaluation.scores} == {"CLIP", "DINO"}
    for s in x.evaluation.scores:
        assert -1 <= s.sim_i <= 1 and 0 <= s.acc1 <= 1 and [c.concept_id for c in s.concepts] == [
            c.concept_id for c in x.localization.concepts]
    _check_report(tmp_path / "x", n)
    assert "tiny" in (tmp_path / "x" / "report.html").read_text()  # the no-meaning note

    # the CLI against the same services, then Ctrl-C on `ice serve` stops all three
    photo = tmp_path / "photo.png"
    photo.write_bytes(photo_png)
    t = info["targets"]
    code = main(["localize", str(photo), "--localizer", t["localizer"], "--max-concepts", "1", "--json"])
    assert code == 0
    serve.send_signal(signal.SIGINT)
    assert serve.wait(timeout=180) == 0  # a graceful stop of three services; a loaded 2-core box took over 60 s
    assert not any(_port_open(p) for p in ports)


def test_local_extraction_without_servers(tiny_bundle_dir, photo_png, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    photo.write_bytes(photo_png)
    out = tmp_path / "local"
    code = main(["extract", str(photo), "--out", str(out), "--local", "--bundle", str(tiny_bundle_dir),
                 "--no-progress", "--json", *SHORT_FLAGS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    n = len(result["localization"]["concepts"])
    assert 1 <= n <= 2 and result["learning"]["bundle"]["name"].startswith("tiny")
    _check_report(out, n)
    assert (out / "artifacts" / "learned_embeds.safetensors").is_file()
