"""`ice batch` over object storage, against a local S3-compatible server (moto's server mode on a free loopback
port, started here) and the contract doubles of the three services: images, manifests and results in a bucket,
the `.done` markers written create-only, a run stopped by SIGTERM and resumed with nothing redone or lost and no
second learning job started, and a full server (RESOURCE_EXHAUSTED) waited out instead of failing items."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from client.batch import list_items, request_id, run_batch  # noqa: E402
from client.options import ExtractOptions, GenerateOptions, Schedule  # noqa: E402
from client.storage import Store  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUCKET = "ice-batch-test"
QUICK = ["--quick", "--num-images", "1", "--inference-steps", "2"]


def _png(seed: int, size=(48, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class S3:
    def __init__(self, client, env):
        self.client, self.env = client, env

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def etag(self, key: str) -> tuple[str, object]:
        head = self.client.head_object(Bucket=BUCKET, Key=key)
        return head["ETag"], head["LastModified"]


@pytest.fixture(scope="module")
def s3():
    from conftest import free_port
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield S3(client, env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def fakes():
    from test_client import FakeIce

    ice = FakeIce(steps=3, step_seconds=0.05)
    yield ice
    ice.stop()


def _targets(fakes) -> list[str]:
    t = fakes.targets()
    return ["--localizer", t["localizer"], "--learner", t["learner"], "--evaluator", t["evaluator"]]


def _options() -> ExtractOptions:
    return ExtractOptions(schedule=Schedule.quick(), generate=GenerateOptions(num_images=1, num_inference_steps=2))


# --- the store ------------------------------------------------------------------------------------------------
def test_markers_are_create_only_on_the_bucket(s3):
    store = Store(f"s3://{BUCKET}/store-test")
    assert store.write_bytes("a/.done", b"first", exclusive=True) is True
    assert store.write_bytes("a/.done", b"second", exclusive=True) is False  # the server refused the PUT (412)
    assert s3.get("store-test/a/.done") == b"first"
    store.write_bytes("summary.json", b"1")
    store.write_bytes("summary.json", b"2")  # an ordinary write replaces
    assert s3.get("store-test/summary.json") == b"2"
    assert store.read_many(["a/.done", "missing/.done"]) == {"a/.done": b"first"}
    store.remove_tree("a")
    assert s3.keys("store-test/") == ["store-test/summary.json"]


def test_items_from_a_bucket_folder_and_a_bucket_manifest(s3):
    for i in range(3):
        s3.put(f"listing/photos/p{i}.png", _png(i))
    s3.put("listing/photos/notes.txt", b"not an image")
    items = list_items(f"s3://{BUCKET}/listing/photos")
    assert [(i.id, i.image) for i in items] == [(f"p{i}", f"s3://{BUCKET}/listing/photos/p{i}.png") for i in range(3)]
    manifest = "\n".join(["# relative entries are under the manifest's folder", "photos/p0.png",
                          f"s3://{BUCKET}/listing/photos/p1.png", json.dumps({"image": "photos/p2.png", "id": "two"})])
    s3.put("listing/manifest.txt", manifest.encode())
    items = list_items(f"s3://{BUCKET}/listing/manifest.txt")
    assert [i.image for i in items] == [f"s3://{BUCKET}/listing/photos/p{i}.png" for i in range(3)]
    assert [i.id for i in items][2] == "two"
    with pytest.raises(FileNotFoundError):
        list_items(f"s3://{BUCKET}/listing/absent.txt")


# --- a whole batch, in a bucket ---------------------------------------------------------------------------------
def test_a_batch_reads_and_writes_the_bucket(s3, fakes):
    for i in range(3):
        s3.put(f"run-a/photos/img{i}.png", _png(10 + i))
    items = list_items(f"s3://{BUCKET}/run-a/photos")
    out = f"s3://{BUCKET}/run-a/results"
    with fakes.client() as ice:
        summary = run_batch(ice, items, out, _options(), concurrency=2, log=lambda line: None)
    assert summary["failed"] == [] and sorted(summary["done_now"]) == ["img0", "img1", "img2"]
    keys = s3.keys("run-a/results/")
    for i in range(3):
        marker = json.loads(s3.get(f"run-a/results/img{i}/.done"))
        assert marker["image"] == f"s3://{BUCKET}/run-a/photos/img{i}.png" and marker["job"]
        assert f"run-a/results/img{i}/report.html" in keys and f"run-a/results/img{i}/overlay.png" in keys
        # the job each item started is recorded with its derived request_id, for a retry to pick up
        record = json.loads(s3.get(f"run-a/results/.ice-batch/jobs/img{i}.json"))
        assert record["name"] == marker["job"] and record["request_id"] == request_id(out, f"img{i}", 0)
    assert json.loads(s3.get("run-a/results/batch-summary.json"))["done"] == 3
    index = s3.get("run-a/results/index.html").decode()
    assert all(f'href="img{i}/report.html"' in index for i in range(3))
    # A rerun finds every marker in the bucket and redoes nothing.
    before = {k: s3.etag(k) for k in keys}
    with fakes.client() as ice:
        again = run_batch(ice, items, out, _options(), concurrency=2, log=lambda line: None)
    assert again["skipped"] == ["img0", "img1", "img2"] and again["done_now"] == []
    assert {k: s3.etag(k) for k in keys if not k.endswith(("batch-summary.json", "index.html"))} == {
        k: v for k, v in before.items() if not k.endswith(("batch-summary.json", "index.html"))}


def test_sigterm_then_resume_redoes_nothing_loses_nothing_and_starts_no_second_job(s3, fakes):
    names = [f"s{i}" for i in range(5)]
    for i, name in enumerate(names):
        s3.put(f"run-b/images/{name}.png", _png(20 + i))
    s3.put("run-b/manifest.txt", "\n".join(f"images/{n}.png" for n in names).encode())
    source, out = f"s3://{BUCKET}/run-b/manifest.txt", f"s3://{BUCKET}/run-b/results"
    ids = [f"images_{n}" for n in names]  # an item's id is its manifest entry without the suffix
    env = {**os.environ, **s3.env, "PYTHONPATH": str(REPO)}
    jobs_before = len(fakes.learner.jobs)
    fakes.learner.step_seconds = 0.3
    try:
        batch = subprocess.Popen([sys.executable, "-m", "client", "batch", source, "--out", out, "--concurrency", "1",
                                  *QUICK, *_targets(fakes)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while len([k for k in s3.keys("run-b/results/") if k.endswith("/.done")]) < 2:
            assert batch.poll() is None, batch.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # wait until the next item's learning job is started and recorded, so that there is one to hand back
        while len(s3.keys("run-b/results/.ice-batch/jobs/")) < 3:
            assert time.monotonic() < deadline, batch.poll()
            time.sleep(0.02)
        batch.send_signal(signal.SIGTERM)  # eviction, or the Job deleted
        stdout, stderr = batch.communicate(timeout=60)
    finally:
        fakes.learner.step_seconds = 0.05
    assert batch.returncode == 143, stderr
    summary = json.loads(s3.get("run-b/results/batch-summary.json"))
    first = sorted(k.split("/")[2] for k in s3.keys("run-b/results/") if k.endswith("/.done"))
    assert summary["interrupted"] and summary["stopped_by"] == "SIGTERM" and sorted(summary["done_now"]) == first
    assert set(first) | set(summary["pending"]) == set(ids)  # every item accounted for
    (handed,) = summary["handed_back"]  # the job in flight was left running, not cancelled
    job = fakes.learner.jobs[handed["job"].removeprefix("operations/")]
    assert not job.cancel
    markers = {k: s3.etag(k) for k in s3.keys("run-b/results/") if k.endswith("/.done")}

    done = subprocess.run([sys.executable, "-m", "client", "batch", source, "--out", out, "--concurrency", "2",
                           "--json", *QUICK, *_targets(fakes)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    assert again["skipped"] == first and sorted(again["skipped"] + again["done_now"]) == ids  # nothing lost
    assert {k: s3.etag(k) for k in markers} == markers  # nothing redone
    # One learning job per item over both runs: the resumed run waited for the handed-back job.
    assert len(fakes.learner.jobs) == jobs_before + len(names)
    assert json.loads(s3.get(f"run-b/results/{handed['id']}/.done"))["job"] == handed["job"]
    assert "picking up learning job" in done.stderr


def test_a_full_server_is_waited_out_not_failed(fakes, tmp_path):
    from test_client import FakeIce

    # Servers that take one call at a time (gRPC's maximum_concurrent_rpcs): with two items in flight, each
    # service refuses calls with RESOURCE_EXHAUSTED while the other item's call (a watch stream) holds it.
    busy = FakeIce(steps=2, step_seconds=0.05, max_concurrent_rpcs=1)
    try:
        photos = tmp_path / "photos"
        photos.mkdir()
        for i in range(3):
            (photos / f"b{i}.png").write_bytes(_png(40 + i))
        lines: list[str] = []
        with busy.client() as ice:
            summary = run_batch(ice, list_items(photos), tmp_path / "out", _options(), concurrency=2,
                                log=lines.append)
    finally:
        busy.stop()
    assert summary["failed"] == [] and sorted(summary["done_now"]) == ["b0", "b1", "b2"], summary
    assert any("is full; retrying" in line for line in lines), lines
    assert len(busy.learner.jobs) == 3


def test_an_unwritable_bucket_is_one_clear_line_before_any_work(s3, fakes, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(_png(50))
    calls = fakes.localizer.calls
    done = subprocess.run([sys.executable, "-m", "client", "batch", str(photos), "--out", "s3://no-such-ice-bucket/r",
                           *QUICK, *_targets(fakes)], cwd=REPO, env={**os.environ, **s3.env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ice: cannot write to the output location s3://no-such-ice-bucket/r")
    assert fakes.localizer.calls == calls  # refused before any call


def test_file_urls_are_local_folders(fakes, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        (photos / f"f{i}.png").write_bytes(_png(60 + i))
    items = list_items(f"file://{photos}")
    assert [i.id for i in items] == ["f0", "f1"] and items[0].image == f"file://{photos}/f0.png"
    out = tmp_path / "out"
    with fakes.client() as ice:
        summary = run_batch(ice, items, f"file://{out}", _options(), concurrency=2, log=lambda line: None)
    assert summary["failed"] == [] and summary["done"] == 2
    assert json.loads((out / "f0" / ".done").read_text())["image"] == f"file://{photos}/f0.png"
    assert (out / "f1" / "report.html").is_file() and (out / "index.html").is_file()
    assert Store(f"file://{out}").local  # written in place, atomically, like a plain path
