"""`AsyncIceClient` (grpc.aio) through real gRPC on loopback, against the test doubles of tests/test_client.py,
as the synchronous client is tested there: the extraction, the job lifecycle, errors, retries, deadlines, the
bearer token and mutual TLS. Plus what only asyncio has: cancelling the task cancels the learning job, and
both clients send the same requests (they share `client.messages`)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import uuid

import grpc
import numpy as np
import pytest
from test_client import QUICK, FakeIce, png_image

from client import AsyncIceClient, ChannelConfig, IceClient, ServiceError, ServiceUnavailable
from client.channel import RetryPolicy
from client.errors import JobFailed
from client.options import ExtractOptions, GenerateOptions, Schedule
from ice.learner.v1 import learner_pb2


@pytest.fixture(scope="module")
def fakes():
    ice = FakeIce()
    yield ice
    ice.stop()


def run(coro):
    return asyncio.run(coro)


def test_the_async_client_has_the_surface_of_the_sync_one():
    public = {n for n in dir(IceClient) if not n.startswith("_")}
    assert public <= {n for n in dir(AsyncIceClient) if not n.startswith("_")}
    for name in public - {"close"}:
        fn = getattr(AsyncIceClient, name)
        assert inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn), name
    for name in ("watch", "iter_generate"):
        assert inspect.isasyncgenfunction(getattr(AsyncIceClient, name))


def test_extract_runs_every_stage_and_writes_the_report(fakes, tmp_path):
    updates = []

    async def go():
        async with AsyncIceClient(**fakes.targets()) as ice:
            return await ice.extract(png_image(), out_dir=tmp_path, progress=updates.append, options=QUICK)

    x = run(go())
    assert [c.noun for c in x.localization.concepts] == ["bowl", "cup"]
    assert x.localization.concepts[0].mask().shape == (64, 96)
    assert [u.step for u in updates] == sorted(u.step for u in updates)
    assert updates[-1].done and updates[-1].state == "SUCCEEDED"
    assert x.learning.attributes("c0") == ["texture", "material", "color"]
    kinds = [r.kind for r in fakes.learner.generate_requests[-3:]]
    assert kinds == [learner_pb2.PROMPT_KIND_OBJECT_LEVEL, learner_pb2.PROMPT_KIND_INTRINSIC,
                     learner_pb2.PROMPT_KIND_FREE]
    assert fakes.learner.generate_requests[-1].prompts == ["a photo of <&0> and <&1>"]
    assert len(x.images_for("c0", "OBJECT_LEVEL")) == 2 and len(x.images_for("c1", "INTRINSIC", "material")) == 2
    request = fakes.evaluator.requests[-1]
    assert [c.concept_id for c in request.concepts] == ["c0", "c1"] and len(request.composition_images) == 2
    assert x.evaluation.by_encoder()["CLIP"].sim_c == 0.5
    assert set(x.seconds) == {"localize", "learn", "generate", "evaluate", "report"}
    assert (tmp_path / "report.html").is_file() and (tmp_path / "masks" / "c1.png").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["scores"][0]["encoder"] == "CLIP"


def test_both_clients_send_the_same_requests(fakes):
    """Request building is shared: the same extraction through either client reaches the services identically."""
    options = ExtractOptions(schedule=Schedule(phase1_steps=3, lambda_attention=0.5), anchors=("color",), seed=11,
                             generate=GenerateOptions(num_images=1, num_inference_steps=3, guidance_scale=2.0, seed=5))
    image = png_image(seed=3)

    def without(message, field):  # a copy without the field that differs by design between two runs
        copy = type(message)()
        copy.CopyFrom(message)
        copy.ClearField(field)
        return copy

    def captured():
        job = fakes.learner.jobs[list(fakes.learner.jobs)[-1]].request
        return (without(job, "request_id"), [without(r, "name") for r in fakes.learner.generate_requests[-3:]],
                fakes.evaluator.requests[-1])

    with IceClient(**fakes.targets()) as ice:
        ice.extract(image, options=options, progress=False)
    sync = captured()

    async def go():
        async with AsyncIceClient(**fakes.targets()) as ice:
            await ice.extract(image, options=options, progress=False)

    run(go())
    again = captured()
    assert again == sync and again[0].schedule.lambda_attention == 0.5 and len(again[1]) == 3


def test_job_lifecycle_watch_cancel_and_artifacts(fakes, tmp_path):
    async def lifecycle():
        async with AsyncIceClient(**fakes.targets()) as ice:
            image = png_image()
            concepts = [("bowl", np.ones((64, 96), bool))]
            request_id = str(uuid.uuid4())
            job = await ice.create_job(image, concepts, request_id=request_id)
            assert (await ice.create_job(image, concepts, request_id=request_id)).name == job.name
            assert (await ice.job(job)).job_id == job.job_id
            assert job.name in {f"operations/{p.job_id}" for p in await ice.jobs()}
            updates = ice.watch(job)
            first = await updates.__anext__()
            assert not first.done
            await ice.cancel(job)
            last = [p async for p in updates][-1]
            assert last.done and last.state == "CANCELLED" and last.error_code == "CANCELLED"
            with pytest.raises(JobFailed, match="CANCELLED"):
                await ice.wait(job)
            with pytest.raises(ServiceError) as err:
                await ice.artifacts(job, tmp_path)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION

    fakes.learner.step_seconds = 0.2
    try:
        run(lifecycle())
    finally:
        fakes.learner.step_seconds = 0.05

    async def success():
        async with AsyncIceClient(**fakes.targets()) as ice:
            job = await ice.create_job(png_image(), [("bowl", np.ones((64, 96), bool))])
            result = await ice.wait(job)
            files = await ice.artifacts(job, tmp_path / "art")
            assert sorted(f.name for f in files) == sorted(a.name for a in result.artifacts)
            for a in result.artifacts:
                assert hashlib.sha256((tmp_path / "art" / a.name).read_bytes()).hexdigest() == a.sha256
            images = await ice.generate(job, "intrinsic", options=GenerateOptions(num_images=1))
            assert {g.attribute for g in images} == {"texture", "material", "color", ""}
            with pytest.raises(ServiceError) as err:
                await ice.job("operations/nope")
            assert err.value.code == grpc.StatusCode.NOT_FOUND

    run(success())


def test_cancelling_the_task_cancels_the_learning_job(fakes):
    fakes.learner.step_seconds = 0.3
    names = []

    async def go():
        async with AsyncIceClient(**fakes.targets()) as ice:
            task = asyncio.create_task(ice.learn(png_image(), [("bowl", np.ones((64, 96), bool))],
                                                 ExtractOptions(), progress=False, on_job=names.append))
            while not names:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await ice.wait(names[0])

    try:
        with pytest.raises(JobFailed, match="CANCELLED"):
            run(go())
    finally:
        fakes.learner.step_seconds = 0.05
    job = fakes.learner.jobs[names[0].removeprefix("operations/")]
    assert job.cancel and job.state == learner_pb2.JOB_STATE_CANCELLED and job.step < job.steps


def test_bad_input_names_the_field_and_is_not_retried(fakes):
    before = fakes.localizer.calls

    async def go():
        async with AsyncIceClient(**fakes.targets()) as ice:
            await ice.localize(b"not an image")

    with pytest.raises(ServiceError) as err:
        run(go())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.value.violations] == ["image"]
    assert "the localizer at 127.0.0.1:" in str(err.value)
    assert fakes.localizer.calls == before + 1


def test_unavailable_is_retried_and_unreachable_says_which(fakes, refusing_port):
    fakes.localizer.calls, fakes.localizer.fail_first = 0, 2

    async def localize(**kw):
        async with AsyncIceClient(**kw) as ice:
            return await ice.localize(png_image())

    try:
        assert len(run(localize(**fakes.targets())).concepts) == 2
        assert fakes.localizer.calls == 3
    finally:
        fakes.localizer.fail_first = 0
    port = refusing_port
    with pytest.raises(ServiceUnavailable) as err:
        run(localize(localizer=f"127.0.0.1:{port}", config=ChannelConfig(retry=RetryPolicy(max_attempts=2))))
    assert str(err.value).startswith(f"cannot reach the localizer at 127.0.0.1:{port}: ")


def test_deadline(fakes):
    fakes.localizer.gate.clear()  # the call waits until the client has given up

    async def go():
        async with AsyncIceClient(**fakes.targets(), config=ChannelConfig(timeout=0.3, seconds_per_round=0.0)) as ice:
            await ice.localize(png_image())

    try:
        with pytest.raises(ServiceError) as err:
            run(go())
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        fakes.localizer.gate.set()


def test_bearer_token_plaintext_and_over_mutual_tls(tmp_path):
    from test_runtime import _make_ca

    async def localize(targets, **kw):
        async with AsyncIceClient(**targets, **kw) as ice:
            return await ice.localize(png_image())

    secured = FakeIce(auth_token="s3cret")
    try:
        with pytest.raises(ServiceError) as err:
            run(localize(secured.targets()))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert len(run(localize(secured.targets(), token="s3cret")).concepts) == 2
    finally:
        secured.stop()

    ca_pem, leaf = _make_ca(tmp_path, "ca")
    for name, data in zip(("server.key", "server.pem"), leaf("localhost", server=True), strict=True):
        (tmp_path / name).write_bytes(data)
    for name, data in zip(("client.key", "client.pem"), leaf("client", server=False), strict=True):
        (tmp_path / name).write_bytes(data)
    tls = FakeIce(auth_token="s3cret", tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key",
                  tls_client_ca=tmp_path / "ca-ca.pem")
    try:
        targets = {k: v.replace("127.0.0.1", "localhost") for k, v in tls.targets().items()}
        mtls = dict(root_certificates=tmp_path / "ca-ca.pem", client_certificate=tmp_path / "client.pem",
                    client_key=tmp_path / "client.key")
        assert len(run(localize(targets, token="s3cret", **mtls)).concepts) == 2
        with pytest.raises(ServiceError) as err:
            run(localize(targets, token="wrong", **mtls))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        tls.stop()
