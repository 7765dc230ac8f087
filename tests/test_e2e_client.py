"""End to end on the real services: `ice serve` starts the real localizer, learner and evaluator as separate
processes on loopback (tiny bundle, ports bound by the services and read back); the SDK drives a full extraction
with a short schedule, the report links only files that exist; `ice extract --local` (in-process) gives the same
result for the same seed; the CLI's `score-masks`, `learn start --wait` and `batch` (sharded, stopped by SIGTERM
with a learning job in flight, resumed) run against the same services; Ctrl-C on `ice serve` stops them all."""

from __future__ import annotations

import hashlib
import html.parser
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
# the same options as flags (--quick is 2/2/1 steps, 2 class images, no checkpoint)
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


def _targets(info) -> list[str]:
    t = info["targets"]
    return ["--localizer", t["localizer"], "--learner", t["learner"], "--evaluator", t["evaluator"]]


@pytest.fixture(scope="module")
def served(tiny_bundle_dir, tmp_path_factory):
    from conftest import interruptible

    logs = tmp_path_factory.mktemp("serve-logs")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    serve = subprocess.Popen(  # --ports 0 0 0: each service binds a free port; the JSON says which
        [sys.executable, "-m", "client", "serve", "--bundle", str(tiny_bundle_dir), "--ports", "0", "0", "0",
         "--log-dir", str(logs), "--start-timeout", "900", "--json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=interruptible)
    lines = []
    for line in serve.stdout:  # the JSON document ends with a line "}" once every service is ready
        lines.append(line)
        if line.rstrip() == "}":
            break
    if not lines or serve.poll() is not None:
        serve.kill()
        pytest.fail(f"ice serve did not start:\n{serve.stderr.read()[-4000:]}")
    info = json.loads("".join(lines))
    ports = [int(info["targets"][name].rsplit(":", 1)[1]) for name in ("localizer", "learner", "evaluator")]
    yield serve, info, ports
    if serve.poll() is None:
        serve.kill()


@pytest.fixture(scope="module")
def service_extraction(served, photo_png, tmp_path_factory):
    """One extraction of the photo through the SDK against the three service processes."""
    _, info, _ = served
    out = tmp_path_factory.mktemp("x")
    updates = []
    with IceClient(**info["targets"]) as ice:
        bundle = ice.server_info("learner")["bundle"]
        x = ice.extract(photo_png, out_dir=out, options=SHORT, progress=updates.append)
    return x, out, updates, bundle


def test_services_as_processes_sdk_full_extraction(served, service_extraction, photo_png, tiny_bundle_dir):
    serve, info, ports = served
    x, out, updates, bundle = service_extraction
    assert sorted(info["targets"]) == ["evaluator", "learner", "localizer"]
    assert len(set(ports)) == 3 and all(info["targets"][n].startswith("127.0.0.1:") for n in info["targets"])
    assert bundle["name"].startswith("tiny")
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
    # the scores are the evaluator's metrics of exactly these images: recomputed here from the files written
    _check_scores_against_the_metrics_module(x, photo_png, tiny_bundle_dir)
    _check_report(out, n)
    assert "tiny" in (out / "report.html").read_text()  # the no-meaning note


def _check_scores_against_the_metrics_module(x, photo_png: bytes, bundle_dir: Path) -> None:
    """The evaluator's answer is the metrics module's on the very images the extraction holds."""
    from client.local import LocalIce
    from client.messages import evaluation_inputs

    composition = [g.image_png for g in x.generated if g.kind == "FREE"]
    expected = LocalIce(bundle_dir, device="cpu").evaluate(
        photo_png, evaluation_inputs(x.localization.concepts, x.generated), composition)
    assert [s.encoder for s in expected.scores] == [s.encoder for s in x.evaluation.scores]
    for want, got in zip(expected.scores, x.evaluation.scores, strict=True):
        for key in ("sim_i", "sim_c", "acc1", "acc3"):
            assert getattr(got, key) == pytest.approx(getattr(want, key), abs=1e-6), (got.encoder, key)
        assert [c.concept_id for c in got.concepts] == [c.concept_id for c in want.concepts]
        assert [c.sim_i for c in got.concepts] == pytest.approx([c.sim_i for c in want.concepts], abs=1e-6)
    assert any(s.sim_c is not None for s in x.evaluation.scores)  # the composition image was scored


def _digests(folder: Path, record: dict) -> dict[str, str]:
    """sha256 of every image the extraction wrote (masks, generated images), by its path in the folder."""
    names = [f"masks/{c['concept_id']}.png" for c in record["localization"]["concepts"]]
    names += [g["file"] for g in record["generated"]]
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def test_local_gives_the_result_of_the_services_for_the_same_seed(service_extraction, tiny_bundle_dir, photo_png,
                                                                  tmp_path, capsys, monkeypatch):
    import client.local

    x, served_out, _, _ = service_extraction
    monkeypatch.setattr(client.local, "DEFAULT_CLASS_IMAGES", tmp_path / "class-images")  # made afresh here
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

    local = json.loads((out / "extraction.json").read_text())
    remote = json.loads((served_out / "extraction.json").read_text())
    # stage 1: the same concepts, nouns and masks (byte for byte)
    assert [(c["concept_id"], c["noun"], c["area_fraction"]) for c in local["localization"]["concepts"]] == [
        (c["concept_id"], c["noun"], c["area_fraction"]) for c in remote["localization"]["concepts"]]
    # stage 2: the same tokens and the same learned weights (the artifacts' sha256)
    assert [(t["token"], t["role"], t["concept_id"]) for t in local["learning"]["tokens"]] == [
        (t["token"], t["role"], t["concept_id"]) for t in remote["learning"]["tokens"]]
    digest = {a["name"]: a["sha256"] for a in remote["learning"]["artifacts"]}
    for artifact in local["learning"]["artifacts"]:
        if artifact["name"] != "manifest.json":  # the manifest names its job
            assert artifact["sha256"] == digest[artifact["name"]], artifact["name"]
    # generation: the same images for the same seeds; evaluation: the same scores
    assert [(g["prompt"], g["seed"]) for g in local["generated"]] == [(g["prompt"], g["seed"])
                                                                    for g in remote["generated"]]
    assert _digests(out, local) == _digests(served_out, remote)
    for mine, theirs in zip(local["evaluation"]["scores"], remote["evaluation"]["scores"], strict=True):
        assert mine["encoder"] == theirs["encoder"]
        for key in ("sim_i", "sim_c", "acc1", "acc3"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-6), key


def _mask_png(mask: np.ndarray, path: Path) -> Path:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def test_score_masks_over_the_service_and_local_match_the_masks_module(served, tiny_bundle_dir, tmp_path, capsys):
    from services.evaluator.masks import score_masks

    _, info, _ = served
    rng = np.random.default_rng(5)
    truth = [rng.random((40, 60)) > 0.5, np.zeros((40, 60), bool)]
    truth[1][5:30, 10:50] = True
    predicted = [truth[1].copy(), rng.random((40, 60)) > 0.7]
    predicted[0][:, :20] = False
    files = {"gt": [_mask_png(m, tmp_path / f"gt{i}.png") for i, m in enumerate(truth)],
             "pred": [_mask_png(m, tmp_path / f"p{i}.png") for i, m in enumerate(predicted)]}
    expected = score_masks(predicted, truth)
    args = ["score-masks", "--predicted", *map(str, files["pred"]), "--ground-truth", *map(str, files["gt"]), "--json"]
    for backend in (["--evaluator", info["targets"]["evaluator"]], ["--local", "--bundle", str(tiny_bundle_dir)]):
        assert main([*args, *backend]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["miou"] == pytest.approx(expected.miou, abs=1e-9)
        assert got["recall"] == pytest.approx(expected.mean_recall, abs=1e-9)
        assert got["precision"] == pytest.approx(expected.mean_precision, abs=1e-9)
        assert [m["predicted_index"] for m in got["matches"]] == [m.predicted_index for m in expected.matches]
    # the masks were chosen so that the scores are not trivial, and recall differs from precision
    assert 0 < expected.miou < 1 and expected.mean_recall != pytest.approx(expected.mean_precision)


def test_learn_start_wait_trains_to_the_end_and_prints_the_tokens(served, tmp_path, capsys):
    _, info, _ = served
    photo = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photo)
    mask = np.zeros((48, 64), bool)
    mask[8:40, 10:40] = True
    _mask_png(mask, tmp_path / "m.png")
    start = ["learn", "start", str(photo), "--concept", f"cup={tmp_path / 'm.png'}", "--phase1-steps", "2",
             "--phase2-steps", "1", "--refinement-steps", "0", "--num-class-images", "0", *_targets(info)]
    assert main([*start, "--wait", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [t["token"] for t in result["tokens"]] == ["<*0>", "<&0>", "<#0>", "<%0>", "<$0>"]
    assert main(["learn", "status", result["job"], "--json", *_targets(info)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "SUCCEEDED" and status["step"] == status["total_steps"] == 3
    # without --wait the command returns at once with the job, still queued or running
    assert main([*start]) == 0
    job = capsys.readouterr().out.strip()
    assert job.startswith("operations/") and job != result["job"]
    assert main(["learn", "watch", job, "--no-progress", *_targets(info)]) == 0
    assert capsys.readouterr().out.startswith("SUCCEEDED")


def _photos(folder: Path, photo_png: bytes) -> Path:
    """a, b, c: the real photo, upside down, and at half size. The tiny bundle localizes one concept in each with
    SHORT_FLAGS (random noise or some crops give it nothing, and then no learning job, which this is about)."""
    from PIL import ImageOps

    folder.mkdir()
    im = Image.open(io.BytesIO(photo_png))
    for name, x in (("a", im), ("b", ImageOps.flip(im)), ("c", im.resize((300, 200)))):
        x.save(folder / f"{name}.png")
    return folder


def _jobs(learner: str) -> dict[str, str]:
    """{job id: state} of every job the learner knows."""
    with IceClient(learner=learner) as ice:
        return {j.job_id: j.state for j in ice.jobs()}


def test_batch_sharded_stopped_by_sigterm_and_resumed_against_the_services(served, photo_png, tiny_bundle_dir,
                                                                            tmp_path):
    from tests.reliability.harness import ServiceProcess

    _, info, _ = served
    photos = _photos(tmp_path / "photos", photo_png)
    # the served localizer and evaluator, and a learner with a gate in its training step: the second job to reach
    # step 1 (shard 0's second item, c) waits there until the test opens it, however fast the machine is
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "hold-at").write_text("1")
    (gate / "closed-1-2").touch()
    learner = ServiceProcess("learner", tiny_bundle_dir, tmp_path / "learner.log", gate=gate,
                             args=["--job-store", str(tmp_path / "store"), "--class-image-steps", "2"])
    try:
        learner.wait_ready()
        target = f"127.0.0.1:{learner.port}"
        _batch_stopped_and_resumed(info, target, photos, tmp_path / "out", gate)
    finally:
        (gate / "closed-1-2").unlink(missing_ok=True)
        learner.stop()


def _batch_stopped_and_resumed(info, learner: str, photos: Path, out: Path, gate: Path) -> None:
    from tests.reliability.harness import PATIENCE, wait_for

    t = info["targets"]
    flags = [*SHORT_FLAGS, "--max-concepts", "1", "--no-composition", "--localizer", t["localizer"],
             "--learner", learner, "--evaluator", t["evaluator"]]

    def shard(index: int) -> list[str]:
        return [sys.executable, "-m", "client", "batch", str(photos), "--out", str(out), "--concurrency", "1",
                "--shard-index", str(index), "--shard-count", "2", "--json", *flags]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # shard 0 holds a and c; it is stopped by SIGTERM (as an evicted pod is) while c's job is held at the gate
    batch = subprocess.Popen(shard(0), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (gate / "held-1-2").exists() or batch.poll() is not None, PATIENCE,
                 "shard 0 did not start its second learning job")
        assert batch.poll() is None, batch.communicate()  # it ended: did a or c localize no concept?
        assert (out / "a" / ".done").exists()
        batch.send_signal(signal.SIGTERM)
        stdout, stderr = batch.communicate(timeout=PATIENCE)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 143, stderr
    summary = json.loads((out / "batch-summary-shard-0.json").read_text())
    assert summary["interrupted"] and summary["done_now"] == ["a"] and summary["pending"] == ["c"]
    jobs = _jobs(learner)
    c_job = json.loads((out / ".ice-batch" / "jobs" / "c.json").read_text())["name"].split("/")[-1]
    assert len(jobs) == 2 and jobs[c_job] == "RUNNING"  # a's (done), and c's handed back: left running, held
    assert [h["id"] for h in summary["handed_back"]] == ["c"]
    before = (out / "a" / ".done").stat().st_mtime_ns, (out / "a" / "report.html").stat().st_mtime_ns

    (gate / "closed-1-2").unlink()  # c's job goes on; the retried shard picks it up instead of starting another
    done = subprocess.run(shard(0), cwd=REPO, env=env, capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["skipped"] == ["a"] and summary["done_now"] == ["c"] and not summary["pending"]
    assert "picking up learning job" in done.stderr
    assert ((out / "a" / ".done").stat().st_mtime_ns, (out / "a" / "report.html").stat().st_mtime_ns) == before
    assert sorted(_jobs(learner)) == sorted(jobs)  # c's job was picked up, not started again
    done = subprocess.run(shard(1), cwd=REPO, env=env, capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["done_now"] == ["b"]
    assert sorted(p.parent.name for p in out.glob("*/.done")) == ["a", "b", "c"]
    jobs = _jobs(learner)
    assert len(jobs) == 3 and set(jobs.values()) == {"SUCCEEDED"}  # one learning job per item, in all
    for name in "abc":
        record = json.loads((out / name / "extraction.json").read_text())
        assert record["learning"]["job_id"] in jobs
        assert record["evaluation"]["scores"] and (out / name / "report.html").is_file()
        source = Image.open(io.BytesIO((photos / f"{name}.png").read_bytes()))
        assert (record["localization"]["width"], record["localization"]["height"]) == source.size


def test_cli_against_the_services_then_ctrl_c_stops_them_all(served, photo_png, tmp_path, capsys):
    serve, info, ports = served
    photo = tmp_path / "photo.png"
    photo.write_bytes(photo_png)
    code = main(["localize", str(photo), "--localizer", info["targets"]["localizer"], "--max-concepts", "1",
                 "--merge-threshold", "0.0008", "--min-area-fraction", "0", "--json"])
    assert code == 0
    assert len(json.loads(capsys.readouterr().out)["concepts"]) == 1
    serve.send_signal(signal.SIGINT)
    assert serve.wait(timeout=180) == 0
    assert not any(_port_open(p) for p in ports)


def _kill_writers_of(folder: Path) -> None:
    """SIGKILL every process whose standard output is a file in `folder` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "fd" / "1")).parent == folder:
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                continue


def test_services_stop_when_ice_serve_is_killed(tiny_bundle_dir, tmp_path):
    """SIGKILL cannot be handled by `ice serve`: its services stop by themselves (SIGTERM on the parent's death)."""
    from conftest import interruptible

    from tests.reliability.harness import wait_for

    serve = subprocess.Popen(
        [sys.executable, "-m", "client", "serve", "--bundle", str(tiny_bundle_dir), "--ports", "0", "0", "0",
         "--log-dir", str(tmp_path / "logs"), "--start-timeout", "900", "--json"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=interruptible)
    try:
        lines = []
        for line in serve.stdout:
            lines.append(line)
            if line.rstrip() == "}":
                break
        info = json.loads("".join(lines))
        ports = [int(info["targets"][name].rsplit(":", 1)[1]) for name in ("localizer", "learner", "evaluator")]
        assert all(_port_open(p) for p in ports)
    finally:
        serve.kill()
        serve.wait(30)
    try:  # a graceful stop takes seconds; 300 s only bounds the failure (a service that never stops)
        wait_for(lambda: not any(_port_open(p) for p in ports), 300, "a service outlived the killed ice serve")
    finally:
        _kill_writers_of(tmp_path / "logs")  # whatever outlived it, so that a failure leaves nothing running
    for name in ("localizer", "learner", "evaluator"):  # each stopped in order, not killed
        assert "shutting down" in (tmp_path / "logs" / f"{name}.log").read_text(), name
