"""LocalizerService through real gRPC on loopback, on the tiny bundle: a real photo, bad inputs, server info."""

from __future__ import annotations

import io
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc
from services.common.server import start_server
from services.common.settings import LocalizerSettings, from_sources
from services.localizer.server import SERVICE, build_spec

# The tiny bundle's random UNet attends almost uniformly (all KL distances ~1e-3): a small merge threshold keeps
# several segments, so that the noun wins some and masks are produced.
TINY_OPTIONS = localizer_pb2.LocalizeOptions(merge_threshold=0.0008, min_area_fraction=0.0, max_rounds=3)


@pytest.fixture(scope="module")
def stub(tiny_bundle_dir):
    settings = from_sources(env={}, cls=LocalizerSettings, bundle=tiny_bundle_dir, host="127.0.0.1", port=-1,
                            metrics_port=0)
    running = start_server(build_spec(settings), settings)
    assert running.wait_ready(600), running.load_error
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield localizer_pb2_grpc.LocalizerServiceStub(channel)
    channel.close()
    running.stop(grace=0)


def _mask(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.mode == "L"
    return np.asarray(img)


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature and IHDR declaring a huge canvas, with a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_localizes_a_real_photo_masks_at_its_size(stub, photo_png):
    response = stub.Localize(localizer_pb2.LocalizeRequest(image=photo_png, options=TINY_OPTIONS), timeout=120)
    assert (response.width, response.height) == (600, 400)
    assert response.concepts, "the small merge threshold should give the noun some segments"
    assert response.stop_reason != localizer_pb2.STOP_REASON_UNSPECIFIED
    assert 1 <= response.rounds <= 3
    covered = np.zeros((400, 600), dtype=bool)
    for i, concept in enumerate(response.concepts):
        mask = _mask(concept.mask)
        assert mask.shape == (400, 600)
        assert set(np.unique(mask)) <= {0, 255}
        assert concept.concept_id == f"c{i}"
        assert concept.area_fraction == pytest.approx((mask > 0).mean(), abs=1e-6)
        assert 0 < concept.area_fraction <= 1
        assert concept.noun in [w.word for w in concept.retrieval] and len(concept.retrieval) <= 5
        assert all(w.weight >= 0 for w in concept.retrieval)
        # the centre-crop square of a 600x400 photo is columns 100..499: nothing outside it
        assert not mask[:, :100].any() and not mask[:, 500:].any()
        covered |= mask > 0
    assert response.uncovered_fraction == pytest.approx(1 - covered.mean(), abs=1e-6)
    rounds = [c.round for c in response.concepts]
    assert rounds == sorted(rounds)
    stages = [t.stage for t in response.timings]
    assert stages[0] == "decode" and stages[-1] == "encode" and "retrieve" in stages
    assert all(t.seconds >= 0 for t in response.timings)


def test_identical_requests_give_identical_results_and_max_concepts_caps(stub, photo_png):
    request = localizer_pb2.LocalizeRequest(image=photo_png, options=TINY_OPTIONS)
    a, b = stub.Localize(request, timeout=120), stub.Localize(request, timeout=120)
    assert len(a.concepts) >= 2
    assert [(c.noun, c.mask) for c in a.concepts] == [(c.noun, c.mask) for c in b.concepts]
    options = localizer_pb2.LocalizeOptions()
    options.CopyFrom(TINY_OPTIONS)
    options.max_concepts = 1
    capped = stub.Localize(localizer_pb2.LocalizeRequest(image=photo_png, options=options), timeout=120)
    assert len(capped.concepts) == 1
    assert capped.stop_reason == localizer_pb2.STOP_REASON_MAX_CONCEPTS
    assert capped.concepts[0].area_fraction == max(c.area_fraction for c in a.concepts if c.round == 0)


def _field_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    return ""


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (localizer_pb2.LocalizeRequest(), "image"),
        (localizer_pb2.LocalizeRequest(image=b"definitely not an image"), "image"),
        (localizer_pb2.LocalizeRequest(image=_bomb_png()), "image"),
        (localizer_pb2.LocalizeRequest(image=b"x", options={"refinement": 7}), "options.refinement"),
        (localizer_pb2.LocalizeRequest(image=b"x", options={"max_rounds": 0}), "options.max_rounds"),
        (localizer_pb2.LocalizeRequest(image=b"x", options={"max_concepts": 65}), "options.max_concepts"),
        (localizer_pb2.LocalizeRequest(image=b"x", options={"l1_penalty": 0.0}), "options.l1_penalty"),
        (localizer_pb2.LocalizeRequest(image=b"x", options={"merge_threshold": float("nan")}), "options.merge_threshold"),
        (localizer_pb2.LocalizeRequest(image=b"x", options={"remaining_fraction_threshold": 1.0}),
         "options.remaining_fraction_threshold"),
        (localizer_pb2.LocalizeRequest(image=b"x", options={"min_area_fraction": -0.1}), "options.min_area_fraction"),
        (localizer_pb2.LocalizeRequest(image=b"x", options={"merge_rounds": 11}), "options.merge_rounds"),
        (localizer_pb2.LocalizeRequest(image=b"x", options={"timestep": 1000}), "options.timestep"),
    ],
)
def test_bad_inputs_are_invalid_argument_naming_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        stub.Localize(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field_of(info.value) == field


def test_keeps_serving_after_bad_inputs(stub, photo_png):
    for bad in (b"", b"garbage", _bomb_png()):
        with pytest.raises(grpc.RpcError):
            stub.Localize(localizer_pb2.LocalizeRequest(image=bad), timeout=30)
    ok = stub.Localize(localizer_pb2.LocalizeRequest(image=photo_png, options=TINY_OPTIONS), timeout=120)
    assert (ok.width, ok.height) == (600, 400)


def _small_png() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.coffee()).resize((96, 64)).save(buf, format="PNG")
    return buf.getvalue()


SMALL = _small_png()


def _handled(code: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("grpc_server_handled_total", {
        "grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Localize", "grpc_code": code}) or 0.0


def test_a_deadline_passing_mid_round_stops_the_loop_on_the_server_before_the_next_round(stub, monkeypatch):
    """The server checks the call between rounds: a call whose deadline passed during round 1 runs no round 2.
    A gate in the round's attention pass holds round 1 until the client has given up (no timing involved)."""
    import threading

    from services.localizer import pipeline

    original = pipeline.capture_attention
    passes, gate, entered = [], threading.Event(), threading.Event()

    def gated(*args, **kwargs):
        passes.append(1)
        entered.set()
        assert gate.wait(600), "the test never opened the gate"
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "capture_attention", gated)
    request = localizer_pb2.LocalizeRequest(image=SMALL, options=localizer_pb2.LocalizeOptions(
        merge_threshold=0.0008, min_area_fraction=0.0, max_rounds=2, remaining_fraction_threshold=0.0))
    gate.set()
    uninterrupted = stub.Localize(request, timeout=600)
    assert uninterrupted.rounds == 2 and len(passes) == 2  # without a deadline this request runs two rounds
    gate.clear()
    entered.clear()
    exceeded = _handled("DEADLINE_EXCEEDED")
    call = stub.Localize.future(request, timeout=5)
    assert entered.wait(600)  # round 1 is in the model, held
    with pytest.raises(grpc.RpcError) as info:
        call.result()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.set()  # round 1 completes on the server after the client gave up
    deadline = time.monotonic() + 600
    while _handled("DEADLINE_EXCEEDED") < exceeded + 1:
        assert time.monotonic() < deadline, "the server never ended the call"
        time.sleep(0.02)
    assert len(passes) == 3, "the server ran round 2 for a call whose deadline had passed"


def test_refinement_none_skips_kmeans_and_gives_other_segments(stub, monkeypatch):
    from services.localizer import segmentor

    calls = []
    original = segmentor.kmeans

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(segmentor, "kmeans", counted)
    options = localizer_pb2.LocalizeOptions(merge_threshold=0.0008, min_area_fraction=0.0, max_rounds=1)
    results = {}
    for name, value in (("kmeans", localizer_pb2.REFINEMENT_KMEANS), ("none", localizer_pb2.REFINEMENT_NONE),
                        ("unspecified", localizer_pb2.REFINEMENT_UNSPECIFIED)):
        options.refinement = value
        before = len(calls)
        response = stub.Localize(localizer_pb2.LocalizeRequest(image=SMALL, options=options), timeout=600)
        results[name] = ([c.mask for c in response.concepts], len(calls) - before)
    assert results["kmeans"][1] == 1 and results["unspecified"][1] == 1  # one refinement per round (the default)
    assert results["none"][1] == 0  # NONE: the merged proposals are used as they are
    assert results["none"][0] != results["kmeans"][0]  # and that changes the segments
    assert results["unspecified"][0] == results["kmeans"][0]


def test_each_stop_reason_is_reported(stub, monkeypatch):
    from services.localizer import segmentor

    def ask(**options) -> localizer_pb2.LocalizeResponse:
        return stub.Localize(localizer_pb2.LocalizeRequest(image=SMALL, options=localizer_pb2.LocalizeOptions(
            merge_threshold=0.0008, min_area_fraction=0.0, **options)), timeout=600)

    capped = ask(max_rounds=1, remaining_fraction_threshold=0.0)  # the round cap, with pixels left
    assert capped.stop_reason == localizer_pb2.STOP_REASON_MAX_ROUNDS and capped.rounds == 1
    assert capped.concepts and capped.remaining_fraction > 0
    # a penalty so large that the lasso keeps no word: no noun to look for (the largest value allowed)
    wordless = ask(max_rounds=4, l1_penalty=10.0)
    assert wordless.stop_reason == localizer_pb2.STOP_REASON_NO_NEW_NOUN
    assert wordless.rounds == 1 and not wordless.concepts and wordless.remaining_fraction == 1.0
    # every segment voted "things" (the vote forced; the rest of the round is real): the round removes nothing
    monkeypatch.setattr(segmentor, "vote", lambda labels, maps: torch.ones(int(labels.max()) + 1, dtype=torch.long))
    stuck = ask(max_rounds=4, remaining_fraction_threshold=0.0)
    assert stuck.stop_reason == localizer_pb2.STOP_REASON_NO_PROGRESS
    assert stuck.rounds == 1 and not stuck.concepts and stuck.remaining_fraction == 1.0
    for answer in (capped, wordless, stuck):
        assert (answer.uncovered_fraction == 1.0) == (not answer.concepts)


def test_the_remaining_fraction_is_what_the_stop_test_compares_and_nothing_found_says_so(stub):
    """`remaining_fraction` is the quantity the stop test compares with the threshold (the pixels no round removed,
    as a noun or as background), so REMAINING_FRACTION always comes with a fraction at or below the threshold;
    an image the background takes whole is NO_CONCEPT, with nothing remaining and everything uncovered."""

    def ask(**options) -> localizer_pb2.LocalizeResponse:
        return stub.Localize(localizer_pb2.LocalizeRequest(image=SMALL, options=localizer_pb2.LocalizeOptions(
            **options)), timeout=600)

    answers = {}
    for threshold in (0.0, 0.5, 0.95):
        answers[threshold] = ask(merge_threshold=0.0008, min_area_fraction=0.0, max_rounds=3,
                                 remaining_fraction_threshold=threshold)
    answers["default"] = ask()  # the tiny random UNet's one segment is voted background: the whole image goes
    assert any(a.stop_reason == localizer_pb2.STOP_REASON_REMAINING_FRACTION for a in answers.values()), answers
    for threshold, a in answers.items():
        limit = 0.1 if threshold == "default" else threshold
        assert 0.0 <= a.remaining_fraction <= 1.0 and 0.0 <= a.uncovered_fraction <= 1.0
        if a.stop_reason == localizer_pb2.STOP_REASON_REMAINING_FRACTION:
            assert a.concepts and a.remaining_fraction <= limit, (threshold, a.remaining_fraction)
        elif a.stop_reason == localizer_pb2.STOP_REASON_MAX_ROUNDS:
            assert a.concepts and a.remaining_fraction > limit and a.rounds == 3, (threshold, a.remaining_fraction)
        # the concepts' pixels were removed with them: what remains is at most what no concept covers
        assert a.remaining_fraction <= a.uncovered_fraction + 1e-6, (threshold, a)
    nothing = answers["default"]
    assert not nothing.concepts and nothing.rounds == 1
    assert nothing.stop_reason == localizer_pb2.STOP_REASON_NO_CONCEPT
    assert nothing.remaining_fraction == 0.0 and nothing.uncovered_fraction == 1.0


def test_server_info(stub, tiny_bundle):
    info = stub.GetServerInfo(localizer_pb2.GetServerInfoRequest(), timeout=10).info
    assert info.service == SERVICE
    assert info.bundle.sha256 == tiny_bundle.digest
    assert info.bundle.image_size == 64
    assert info.device == "cpu" and info.bundle.precision == "fp32"
