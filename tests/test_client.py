"""The SDK through real gRPC on loopback, against fast test doubles of the three services.

The doubles (`FakeIce`) implement the real contracts (localizer, learner with google.longrunning, evaluator)
with trivial "algorithms", and are served by the production runtime (`start_server`), so the SDK's channel
set-up, retries, auth, TLS, deadlines, streaming and error mapping are exercised for real. The end-to-end
test with the real services is tests/test_e2e_client.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import status_pb2
from PIL import Image

from client import ChannelConfig, IceClient, Schedule, ServiceError, ServiceUnavailable
from client.channel import RetryPolicy, channel_options
from client.errors import JobFailed
from client.options import ExtractOptions, GenerateOptions
from ice.common.v1 import common_pb2
from ice.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.images import decode_image, decode_mask, encode_mask, encode_png
from services.common.server import ServiceSpec, start_server
from services.common.settings import from_sources


# --- test doubles -------------------------------------------------------------------------------------------
class FakeLocalizer(localizer_pb2_grpc.LocalizerServiceServicer):
    """Two concepts: the left and the right half of the image."""

    def __init__(self):
        self.calls = 0
        self.fail_first = 0  # answer UNAVAILABLE this many times first
        self.gate = threading.Event()  # a call waits while it is clear (a "slow model", released by the test)
        self.gate.set()

    def Localize(self, request, context):
        self.calls += 1
        if self.calls <= self.fail_first:
            raise Unavailable("warming up")
        self.gate.wait(600)
        img = decode_image(request.image, "image")
        w, h = img.size
        concepts = []
        for i, (noun, cols) in enumerate((("bowl", slice(0, w // 2)), ("cup", slice(w // 2, w)))):
            mask = np.zeros((h, w), bool)
            mask[:, cols] = True
            concepts.append(common_pb2.Concept(concept_id=f"c{i}", noun=noun, mask=encode_mask(mask),
                                               area_fraction=float(mask.mean()), round=i,
                                               retrieval=[common_pb2.WordWeight(word=noun, weight=0.5)]))
        return localizer_pb2.LocalizeResponse(
            concepts=concepts, rounds=2, remaining_fraction=0.0, width=w, height=h,
            stop_reason=localizer_pb2.STOP_REASON_REMAINING_FRACTION,
            timings=[common_pb2.StageTiming(stage="segment", seconds=0.01)])


class _FakeJob:
    def __init__(self, job_id, request, steps):
        self.id = job_id
        self.request = request
        self.steps = steps
        self.step = 0
        self.state = learner_pb2.JOB_STATE_QUEUED
        self.cancel = False
        self.changed = threading.Condition()
        self.artifacts = {"manifest.json": json.dumps({"job": job_id}).encode(),
                          "learned_embeds.safetensors": bytes(range(256)) * 5000}

    def metadata(self):
        percent = 100.0 if self.state == learner_pb2.JOB_STATE_SUCCEEDED else 100.0 * self.step / (self.steps + 1)
        phase = learner_pb2.PHASE_OBJECT_LEVEL if self.state == learner_pb2.JOB_STATE_RUNNING else 0
        return learner_pb2.LearningJobMetadata(job_id=self.id, state=self.state, phase=phase, step=self.step,
                                               total_steps=self.steps, percent=percent,
                                               losses={"total": 1.0 / (1 + self.step)},
                                               cancel_requested=self.cancel)

    def tokens(self):
        anchors = list(self.request.intrinsic_anchors) or ["texture", "material", "color"]
        out = []
        for i, c in enumerate(self.request.concepts):
            cid = c.concept_id if c.HasField("concept_id") else f"c{i}"
            out.append(learner_pb2.LearnedToken(token=f"<*{i}>", role=learner_pb2.TOKEN_ROLE_INSTANCE,
                                                concept_id=cid, noun=c.noun))
            out.append(learner_pb2.LearnedToken(token=f"<&{i}>", role=learner_pb2.TOKEN_ROLE_CONCEPT,
                                                concept_id=cid, noun=c.noun))
            for symbol, anchor in zip("#%$!", anchors, strict=False):
                out.append(learner_pb2.LearnedToken(token=f"<{symbol}{i}>", role=learner_pb2.TOKEN_ROLE_INTRINSIC,
                                                    concept_id=cid, noun=c.noun, attribute=anchor))
        return out

    def result(self):
        files = [learner_pb2.ArtifactFile(name=n, size_bytes=len(b), sha256=hashlib.sha256(b).hexdigest())
                 for n, b in self.artifacts.items()]
        return learner_pb2.LearningJobResult(job_id=self.id, tokens=self.tokens(), artifacts=files,
                                             bundle=common_pb2.BundleInfo(name="fake", image_size=64))

    def done(self):
        return self.state in (learner_pb2.JOB_STATE_SUCCEEDED, learner_pb2.JOB_STATE_CANCELLED)

    def operation(self):
        op = operations_pb2.Operation(name=f"operations/{self.id}", done=self.done())
        op.metadata.Pack(self.metadata())
        if self.state == learner_pb2.JOB_STATE_SUCCEEDED:
            op.response.Pack(self.result())
        elif self.state == learner_pb2.JOB_STATE_CANCELLED:
            op.error.CopyFrom(status_pb2.Status(code=grpc.StatusCode.CANCELLED.value[0], message="cancelled"))
        return op


class FakeLearner(learner_pb2_grpc.LearnerServiceServicer, operations_pb2_grpc.OperationsServicer):
    """Jobs of `steps` steps of `step_seconds` each; cancellation honoured at the next step."""

    def __init__(self, steps=3, step_seconds=0.05):
        self.steps = steps
        self.step_seconds = step_seconds
        self.jobs: dict[str, _FakeJob] = {}
        self.by_request_id: dict[str, str] = {}
        self.generate_requests = []

    def _run(self, job):
        with job.changed:
            job.state = learner_pb2.JOB_STATE_RUNNING
            job.changed.notify_all()
        while job.step < job.steps:
            time.sleep(self.step_seconds)
            with job.changed:
                if job.cancel:
                    job.state = learner_pb2.JOB_STATE_CANCELLED
                    job.changed.notify_all()
                    return
                job.step += 1
                job.changed.notify_all()
        with job.changed:
            job.state = learner_pb2.JOB_STATE_SUCCEEDED
            job.changed.notify_all()

    def _job(self, name):
        job = self.jobs.get(name.removeprefix("operations/"))
        if job is None:
            raise NotFound(f"no job {name}")
        return job

    def CreateLearningJob(self, request, context):
        if not request.concepts:
            raise InvalidArgument("at least one concept", field="concepts")
        img = decode_image(request.image, "image")
        for i, c in enumerate(request.concepts):
            decode_mask(c.mask, f"concepts[{i}].mask", expected_size=img.size)
        if request.request_id in self.by_request_id:
            return self.jobs[self.by_request_id[request.request_id]].operation()
        job = _FakeJob(uuid.uuid4().hex[:12], request, self.steps)
        self.jobs[job.id] = job
        if request.request_id:
            self.by_request_id[request.request_id] = job.id
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return job.operation()

    def WatchLearningJob(self, request, context):
        job = self._job(request.name)
        last = None
        while context.is_active():
            with job.changed:
                current = (job.state, job.step)
                if current == last:
                    job.changed.wait(0.5)
                    continue
                last = current
                done = job.done()
                response = learner_pb2.WatchLearningJobResponse(metadata=job.metadata(), done=done)
                if job.state == learner_pb2.JOB_STATE_SUCCEEDED:
                    response.response.CopyFrom(job.result())
                elif job.state == learner_pb2.JOB_STATE_CANCELLED:
                    response.error.CopyFrom(status_pb2.Status(code=grpc.StatusCode.CANCELLED.value[0],
                                                              message="cancelled by a caller"))
            yield response
            if done:
                return

    def GetArtifacts(self, request, context):
        job = self._job(request.name)
        if job.state != learner_pb2.JOB_STATE_SUCCEEDED:
            raise FailedPrecondition("the job has not succeeded")
        for name in request.files or list(job.artifacts):
            data = job.artifacts[name]
            for offset in range(0, len(data), 1 << 20):
                chunk = data[offset: offset + (1 << 20)]
                last = offset + len(chunk) >= len(data)
                yield learner_pb2.GetArtifactsResponse(
                    file_name=name, offset=offset, chunk=chunk, last_chunk=last, size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest() if last else "")

    def Generate(self, request, context):
        job = self._job(request.name)
        if job.state != learner_pb2.JOB_STATE_SUCCEEDED:
            raise FailedPrecondition("the job has not succeeded")
        self.generate_requests.append(request)
        tokens = job.tokens()
        prompts = []  # (prompt, concept_id, attribute)
        concepts = [t for t in tokens if t.role == learner_pb2.TOKEN_ROLE_CONCEPT]
        if request.kind == learner_pb2.PROMPT_KIND_FREE:
            prompts = [(p, "", "") for p in request.prompts]
        for c in concepts:
            intrinsic = [t for t in tokens if t.concept_id == c.concept_id and t.role == learner_pb2.TOKEN_ROLE_INTRINSIC]
            if request.kind == learner_pb2.PROMPT_KIND_OBJECT_LEVEL:
                prompts.append(("a photo of " + c.token + "".join(t.token for t in intrinsic), c.concept_id, ""))
            elif request.kind == learner_pb2.PROMPT_KIND_INTRINSIC:
                prompts += [(f"a {t.token} {t.attribute}", c.concept_id, t.attribute) for t in intrinsic]
                prompts.append((f"a {c.token}", c.concept_id, ""))
        n = request.num_images if request.HasField("num_images") else 8
        seed = request.seed if request.HasField("seed") else 1234
        for p, (prompt, cid, attribute) in enumerate(prompts):
            for i in range(n):
                rng = np.random.default_rng(seed + 100 * p + i)
                pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
                yield learner_pb2.GenerateResponse(prompt=prompt, index=i, image=encode_png(Image.fromarray(pixels)),
                                                   concept_id=cid, attribute=attribute, seed=seed + 100 * p + i)

    def GetOperation(self, request, context):
        return self._job(request.name).operation()

    def ListOperations(self, request, context):
        return operations_pb2.ListOperationsResponse(operations=[j.operation() for j in self.jobs.values()])

    def CancelOperation(self, request, context):
        job = self._job(request.name)
        with job.changed:
            job.cancel = True
            job.changed.notify_all()
        from google.protobuf import empty_pb2

        return empty_pb2.Empty()


class FakeEvaluator(evaluator_pb2_grpc.EvaluatorServiceServicer):
    """Scores = the mean grey level of each concept's images (something that depends on the input)."""

    def __init__(self):
        self.requests = []

    def Evaluate(self, request, context):
        self.requests.append(request)
        concepts = []
        for c in request.concepts:
            mean = float(np.mean([np.asarray(decode_image(i)).mean() for i in c.images])) / 255
            concepts.append(evaluator_pb2.ConceptScore(concept_id=c.concept_id, sim_i=mean, acc1=1.0, acc3=1.0,
                                                       rank=1))
        scores = []
        for encoder in (common_pb2.ENCODER_CLIP, common_pb2.ENCODER_DINO):
            s = evaluator_pb2.EncoderScores(encoder=encoder, sim_i=float(np.mean([c.sim_i for c in concepts])),
                                            acc1=1.0, acc3=1.0, concepts=concepts,
                                            accuracy_scope=evaluator_pb2.ACCURACY_SCOPE_REQUEST,
                                            concepts_in_scope=len(concepts))
            if request.composition_images:
                s.sim_c = 0.5
            else:
                s.sim_c_absent_reason = "no composition images were sent"
            scores.append(s)
        return evaluator_pb2.EvaluateResponse(scores=scores)

    def ScoreMasks(self, request, context):
        return evaluator_pb2.ScoreMasksResponse(miou=0.25, recall=0.5, precision=0.5)


class FakeIce:
    """The three doubles, each on its own loopback port through the production runtime."""

    def __init__(self, steps=3, step_seconds=0.05, **settings):
        self.localizer = FakeLocalizer()
        self.learner = FakeLearner(steps, step_seconds)
        self.evaluator = FakeEvaluator()
        self.servers = {}

        def spec(name, service, register):
            return ServiceSpec(name=name, service_names=[service], register=register)

        specs = {
            "localizer": spec("localizer", "ice.localizer.v1.LocalizerService",
                              lambda s: localizer_pb2_grpc.add_LocalizerServiceServicer_to_server(self.localizer, s)),
            "learner": spec("learner", "ice.learner.v1.LearnerService", self._register_learner),
            "evaluator": spec("evaluator", "ice.evaluator.v1.EvaluatorService",
                              lambda s: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(self.evaluator, s)),
        }
        for name, s in specs.items():
            cfg = from_sources(env={}, **{"host": "127.0.0.1", "port": -1, "metrics_port": 0,  # any free port
                                          "grace_seconds": 0.0, **settings})
            self.servers[name] = start_server(s, cfg)
            assert self.servers[name].wait_ready(600)

    def _register_learner(self, server):
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(self.learner, server)
        operations_pb2_grpc.add_OperationsServicer_to_server(self.learner, server)

    def targets(self):
        return {name: f"127.0.0.1:{s.port}" for name, s in self.servers.items()}

    def client(self, **kw):
        return IceClient(**self.targets(), **kw)

    def stop(self):
        for s in self.servers.values():
            s.stop(grace=0)


def png_image(w=96, h=64, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fakes():
    ice = FakeIce()
    yield ice
    ice.stop()


QUICK = ExtractOptions(schedule=Schedule.quick(), generate=GenerateOptions(num_images=2, num_inference_steps=2, seed=7))


# --- tests --------------------------------------------------------------------------------------------------
def test_extract_runs_every_stage_and_writes_the_report(fakes, tmp_path):
    updates = []
    with fakes.client() as ice:
        x = ice.extract(png_image(), out_dir=tmp_path, progress=updates.append, options=QUICK)
    assert [c.noun for c in x.localization.concepts] == ["bowl", "cup"]
    assert x.localization.concepts[0].mask().shape == (64, 96)
    assert x.localization.stop_reason == "REMAINING_FRACTION"
    # progress came from the watch stream: monotone steps, ending done with the result
    assert [u.step for u in updates] == sorted(u.step for u in updates)
    assert updates[-1].done and updates[-1].state == "SUCCEEDED"
    assert x.learning.attributes("c0") == ["texture", "material", "color"]
    # generation as docs/method.md#generation: one object-level prompt per concept, 3 intrinsic + "a <&i>", and the composition
    kinds = [r.kind for r in fakes.learner.generate_requests[-3:]]
    assert kinds == [learner_pb2.PROMPT_KIND_OBJECT_LEVEL, learner_pb2.PROMPT_KIND_INTRINSIC,
                     learner_pb2.PROMPT_KIND_FREE]
    assert fakes.learner.generate_requests[-1].prompts == ["a photo of <&0> and <&1>"]
    assert all(r.num_images == 2 and r.num_inference_steps == 2 for r in fakes.learner.generate_requests[-3:])
    assert len(x.images_for("c0", "OBJECT_LEVEL")) == 2
    assert len(x.images_for("c1", "INTRINSIC", "material")) == 2
    # evaluation got the object-level images of each concept and the composition images
    request = fakes.evaluator.requests[-1]
    assert [c.concept_id for c in request.concepts] == ["c0", "c1"]
    assert all(len(c.images) == 2 for c in request.concepts)
    assert len(request.composition_images) == 2
    assert x.evaluation.by_encoder()["CLIP"].sim_c == 0.5
    assert x.evaluation.by_encoder()["DINO"].concepts[1].concept_id == "c1"
    # the job got the schedule asked for
    job_request = fakes.learner.jobs[x.job_id.removeprefix("operations/")].request
    assert job_request.schedule.phase1_steps == 2 and job_request.schedule.num_class_images == 2
    assert not job_request.schedule.HasField("embedding_learning_rate")  # unset = server default
    assert (tmp_path / "report.html").is_file() and (tmp_path / "masks" / "c1.png").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["scores"][0]["encoder"] == "CLIP"
    assert json.loads(json.dumps(x.to_dict()))["localization"]["concepts"][1]["noun"] == "cup"


def test_job_lifecycle_watch_cancel_and_artifacts(fakes, tmp_path):
    fakes.learner.step_seconds = 0.2
    try:
        with fakes.client() as ice:
            image = png_image()
            concepts = [("bowl", np.ones((64, 96), bool))]
            request_id = str(uuid.uuid4())
            job = ice.create_job(image, concepts, request_id=request_id)
            # the same request_id returns the same job (a retried creation queues nothing)
            assert ice.create_job(image, concepts, request_id=request_id).name == job.name
            assert job.name.startswith("operations/")
            assert ice.job(job).job_id == job.job_id
            assert job.name in {f"operations/{p.job_id}" for p in ice.jobs()}
            stream = ice.watch(job)
            first = next(stream)
            assert not first.done
            ice.cancel(job)
            last = list(stream)[-1]
            assert last.done and last.state == "CANCELLED" and last.error_code == "CANCELLED"
            with pytest.raises(JobFailed, match="CANCELLED"):
                ice.wait(job)
            with pytest.raises(ServiceError) as err:
                ice.artifacts(job, tmp_path)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        fakes.learner.step_seconds = 0.05
    with fakes.client() as ice:
        job = ice.create_job(png_image(), [("bowl", np.ones((64, 96), bool))])
        result = ice.wait(job)
        files = ice.artifacts(job, tmp_path / "art")
        assert sorted(f.name for f in files) == sorted(a.name for a in result.artifacts)
        for a in result.artifacts:
            assert hashlib.sha256((tmp_path / "art" / a.name).read_bytes()).hexdigest() == a.sha256
        with pytest.raises(ServiceError) as err:
            ice.job("operations/nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_bad_input_names_the_field_and_is_not_retried(fakes):
    before = fakes.localizer.calls
    with fakes.client() as ice, pytest.raises(ServiceError) as err:
        ice.localize(b"not an image")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.value.violations] == ["image"]
    assert "the localizer at 127.0.0.1:" in str(err.value)
    assert fakes.localizer.calls == before + 1  # INVALID_ARGUMENT is not retried


def test_unavailable_is_retried_by_the_service_config(fakes):
    fakes.localizer.calls, fakes.localizer.fail_first = 0, 2
    try:
        with fakes.client() as ice:
            result = ice.localize(png_image())
        assert len(result.concepts) == 2
        assert fakes.localizer.calls == 3  # two UNAVAILABLE answers, retried by gRPC, then success
        fakes.localizer.calls = 0
        no_retry = ChannelConfig(retry=None)
        with IceClient(**fakes.targets(), config=no_retry) as ice, pytest.raises(ServiceUnavailable):
            ice.localize(png_image())
        assert fakes.localizer.calls == 1
    finally:
        fakes.localizer.fail_first = 0


def test_service_config_retries_only_unavailable_and_balances_round_robin():
    options = dict(channel_options(ChannelConfig(retry=RetryPolicy(max_attempts=4))))
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert {"service": "ice.learner.v1.LearnerService"} in method["name"]
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 64 << 20


def test_round_robin_spreads_calls_over_every_address():
    a, b = FakeIce(), FakeIce()
    try:
        target = f"ipv4:{a.targets()['localizer']},{b.targets()['localizer']}"
        with IceClient(localizer=target) as ice:
            # round robin picks among the connections that are READY: once both addresses have answered a call,
            # both are, and calls alternate strictly
            deadline = time.monotonic() + 600
            while not (a.localizer.calls and b.localizer.calls):
                assert time.monotonic() < deadline, "the second address never became ready"
                ice.localize(png_image(16, 16))
            first = a.localizer.calls, b.localizer.calls
            for _ in range(6):
                ice.localize(png_image(16, 16))
        assert (a.localizer.calls - first[0], b.localizer.calls - first[1]) == (3, 3)
        with IceClient(localizer=f"dns:///localhost:{a.servers['localizer'].port}") as ice:
            assert len(ice.localize(png_image(16, 16)).concepts) == 2
    finally:
        a.stop()
        b.stop()


def test_unreachable_service_says_which_and_where(refusing_port):
    port = refusing_port
    with IceClient(localizer=f"127.0.0.1:{port}", config=ChannelConfig(retry=RetryPolicy(max_attempts=2))) as ice:
        with pytest.raises(ServiceUnavailable) as err:
            ice.localize(png_image())
    assert str(err.value).startswith(f"cannot reach the localizer at 127.0.0.1:{port}: ")
    assert "\n" not in str(err.value)


def test_deadline(fakes):
    fakes.localizer.gate.clear()  # the call waits until the client has given up
    try:
        with IceClient(**fakes.targets(), config=ChannelConfig(timeout=0.3, seconds_per_round=0.0)) as ice, \
                pytest.raises(ServiceError) as err:
            ice.localize(png_image())
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        fakes.localizer.gate.set()


def test_bearer_token_plaintext_and_over_mutual_tls(tmp_path):
    from test_runtime import _make_ca

    secured = FakeIce(auth_token="s3cret")
    try:
        with secured.client() as ice, pytest.raises(ServiceError) as err:
            ice.localize(png_image())
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with secured.client(token="s3cret") as ice:
            assert len(ice.localize(png_image()).concepts) == 2
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
        with IceClient(**targets, token="s3cret", **mtls) as ice:
            assert len(ice.localize(png_image()).concepts) == 2
            assert ice.score_masks([np.ones((4, 4))], [np.ones((4, 4))]).miou == 0.25
        with IceClient(**targets, token="wrong", **mtls) as ice, pytest.raises(ServiceError) as err:
            ice.localize(png_image())
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        no_cert = ChannelConfig(root_certificates=tmp_path / "ca-ca.pem", token="s3cret",
                                retry=RetryPolicy(max_attempts=2))
        with IceClient(**targets, config=no_cert) as ice, pytest.raises(ServiceUnavailable):
            ice.localize(png_image())
    finally:
        tls.stop()


def test_artifact_names_cannot_escape_the_folder(tmp_path):
    from client.sdk import _safe_join

    assert _safe_join(tmp_path, "masks/c0.png") == tmp_path / "masks" / "c0.png"
    for bad in ("../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ValueError):
            _safe_join(tmp_path, bad)


def test_progress_line_without_tqdm(monkeypatch):
    import client.progress as progress
    from client.types import JobProgress

    monkeypatch.setattr(progress, "_tqdm", None)
    out = io.StringIO()
    with progress.progress_reporter(True, stream=out) as report:
        for step, phase in ((0, "PREPARING"), (1, "OBJECT_LEVEL"), (2, "OBJECT_LEVEL"), (3, "INTRINSIC")):
            report(JobProgress("j", "RUNNING", phase, step, 4, 25.0 * step, {"total": 0.5}, 3.0, 0, False, False))
        report(JobProgress("j", "SUCCEEDED", "FINISHING", 4, 4, 100.0, {}, None, 0, False, True))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("RUNNING PREPARING 0/4") and "OBJECT_LEVEL 1/4 (25%) loss 0.5 eta 3s" in lines[1]
    assert len(lines) == 4 and lines[-1].startswith("SUCCEEDED")  # one line per phase when not a terminal


def test_any_pack_roundtrip_of_progress():
    """`job()` decodes an Operation's packed metadata/response/error like the watch stream does."""
    from client.sdk import _operation_progress

    job = _FakeJob("abc", learner_pb2.CreateLearningJobRequest(concepts=[learner_pb2.ConceptInput(noun="x")]), 2)
    job.state = learner_pb2.JOB_STATE_SUCCEEDED
    p = _operation_progress(job.operation())
    assert p.done and p.state == "SUCCEEDED" and p.result.tokens[1].token == "<&0>"
    job.state = learner_pb2.JOB_STATE_CANCELLED
    p = _operation_progress(job.operation())
    assert p.done and p.result is None and p.error_code == "CANCELLED"


def test_sim_c_composition_prompt_covers_an_image_with_one_concept():
    from client.pipeline import composition_prompt
    from client.types import LearnedToken, LearningResult

    def learning(n: int) -> LearningResult:
        tokens = [t for i in range(n) for t in (LearnedToken(f"<*{i}>", "INSTANCE", f"c{i}", "cup", ""),
                                                LearnedToken(f"<&{i}>", "CONCEPT", f"c{i}", "cup", ""),
                                                LearnedToken(f"<#{i}>", "INTRINSIC", f"c{i}", "cup", "texture"))]
        return LearningResult("j", tokens, [], {})

    assert composition_prompt(learning(1)) == "a photo of <&0>"  # SIM^C is defined for one concept too
    assert composition_prompt(learning(2)) == "a photo of <&0> and <&1>"
    assert composition_prompt(learning(0)) is None
