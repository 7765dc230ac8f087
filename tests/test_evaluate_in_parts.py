"""Evaluations larger than one message: the SDK sends an image's concepts and generated images to EvaluateSet in
parts (`continuation`), so the documented limits (64 concepts, 64 images each, 1,024 in all) are reachable under a
small message limit, and the scores are the ones the metrics module computes on everything at once."""

from __future__ import annotations

import socket

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from client import IceClient
from client.channel import ChannelConfig
from client.errors import ServiceError
from ice.evaluator.v1 import evaluator_pb2 as pb
from ice.evaluator.v1 import evaluator_pb2_grpc
from services.common.images import decode_image, decode_mask, encode_mask, encode_png
from services.common.server import start_server
from services.common.settings import EvaluatorSettings, from_sources
from services.evaluator.encoders import CLIP, DINO, Embedder, load_encoders
from services.evaluator.metrics import ConceptInput, ItemInput, SetEvaluation
from services.evaluator.server import build_spec

LIMIT = 256 << 10  # the message limit of the server and the client in this module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def evaluator(tiny_bundle_dir):
    settings = from_sources(env={}, cls=EvaluatorSettings, bundle=tiny_bundle_dir, host="127.0.0.1",
                            port=_free_port(), metrics_port=0, max_message_bytes=LIMIT, batch_size=64)
    server = start_server(build_spec(settings), settings)
    assert server.wait_ready(120), server.load_error
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=0)


def _noise(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


def _source():
    rng = np.random.default_rng(99)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    masks = []
    for k in range(16):
        m = np.zeros((96, 128), bool)
        m[(k // 4) * 24: (k // 4) * 24 + 24, (k % 4) * 32: (k % 4) * 32 + 32] = True
        masks.append(m)
    return encode_png(image), masks


def _messages(name: str) -> float:
    return REGISTRY.get_sample_value("grpc_server_msg_received_total", {
        "grpc_type": "client_stream", "grpc_service": "ice.evaluator.v1.EvaluatorService",
        "grpc_method": name}) or 0.0


def _direct(tiny_bundle, items):
    evaluation = SetEvaluation(Embedder(load_encoders(tiny_bundle, "cpu"), 64), (CLIP, DINO))
    for item_id, source, concepts, composition in items:
        img = decode_image(source)
        evaluation.add(ItemInput(item_id, img, [ConceptInput(cid, decode_mask(encode_mask(m)),
                                                             [decode_image(b) for b in images])
                                                for cid, m, images in concepts],
                                 [decode_image(b) for b in composition]))
    return evaluation.result()


def test_the_documented_limit_of_1024_images_is_reachable_through_the_sdk(evaluator, tiny_bundle):
    source, masks = _source()
    concepts = [(f"c{k}", masks[k], [_noise(100 * k + j) for j in range(64)]) for k in range(16)]
    total = sum(len(b) for _, _, images in concepts for b in images)
    assert total > 40 * LIMIT  # 1,024 images: no single message under the limit could carry them
    before = _messages("EvaluateSet")
    with IceClient(evaluator=evaluator, config=ChannelConfig(max_message_bytes=LIMIT)) as ice:
        result = ice.evaluate(source, concepts)
    assert _messages("EvaluateSet") - before > 40  # options, the item, then its images in parts
    want = _direct(tiny_bundle, [("0", source, concepts, [])])
    for got in result.scores:
        w = want[got.encoder.lower()].overall
        assert got.accuracy_scope == "REQUEST" and got.concepts_in_scope == 16
        assert got.sim_i == pytest.approx(w.sim_i, abs=1e-6) and got.acc1 == pytest.approx(w.acc1)
        assert [c.rank for c in got.concepts] == [c.rank for c in w.concepts]


def test_evaluate_set_splits_a_large_item_and_scores_it_like_one_message(evaluator, tiny_bundle):
    source, masks = _source()
    small = ("small", source, [("a", masks[0], [_noise(1)]), ("b", masks[5], [_noise(2), _noise(3)])], [_noise(4)])
    large = ("large", source, [("a", masks[1], [_noise(10 + j) for j in range(30)]),
                               ("b", masks[6], [_noise(50 + j) for j in range(30)])],
             [_noise(90 + j) for j in range(20)])
    with IceClient(evaluator=evaluator, config=ChannelConfig(max_message_bytes=LIMIT)) as ice:
        result = ice.evaluate_set([small, large])
    assert (result.item_count, result.concept_count) == (2, 4)
    want = _direct(tiny_bundle, [small, large])
    for got in result.scores:
        w = want[got.encoder.lower()].overall
        assert got.sim_i == pytest.approx(w.sim_i, abs=1e-6) and got.sim_c == pytest.approx(w.sim_c, abs=1e-6)
        assert got.acc1 == pytest.approx(w.acc1) and [c.rank for c in got.concepts] == [c.rank for c in w.concepts]
    assert [item_id for item_id, _ in result.items] == ["small", "large"]


def _stub(evaluator):
    channel = grpc.insecure_channel(evaluator, options=[("grpc.max_send_message_length", LIMIT),
                                                        ("grpc.max_receive_message_length", LIMIT)])
    return channel, evaluator_pb2_grpc.EvaluatorServiceStub(channel)


def _refused(stub, messages) -> tuple[grpc.StatusCode, str]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with pytest.raises(grpc.RpcError) as e:
        stub.EvaluateSet(iter(messages), timeout=60)
    if e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a limit names its field first in the message
        return e.value.code(), e.value.details().partition(": ")[0]
    bad = error_details_pb2.BadRequest()
    status = rpc_status.from_call(e.value)
    fields = [v.field for d in status.details if d.Unpack(bad) for v in bad.field_violations] if status else []
    return e.value.code(), fields[0] if fields else ""


def test_parts_are_checked_like_the_item_they_complete(evaluator):
    source, masks = _source()
    options = pb.EvaluateSetRequest(options=pb.EvaluateOptions())
    item = pb.EvaluateSetRequest(item=pb.EvaluateSetItem(item_id="x", source_image=source, concepts=[
        pb.ConceptSamples(concept_id="a", mask=encode_mask(masks[0]))]))  # its images all come in parts
    more = lambda cid, n: pb.EvaluateSetRequest(continuation=pb.EvaluateSetImages(  # noqa: E731
        concept_id=cid, images=[_noise(7)] * n))
    channel, stub = _stub(evaluator)
    try:
        assert stub.EvaluateSet(iter([options, item, more("a", 2)]), timeout=60).concept_count == 1
        assert _refused(stub, [options, more("a", 1), item]) == (grpc.StatusCode.INVALID_ARGUMENT, "items[0]")
        assert _refused(stub, [options, item, more("z", 1)]) == (
            grpc.StatusCode.INVALID_ARGUMENT, "items[0].continuation[0].concept_id")
        assert _refused(stub, [options, item, *[more("a", 10)] * 7]) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, "items[0].concepts[0].images")  # 70 > 64 per concept
        assert _refused(stub, [options, item]) == (  # parts that never came: the concept has no image
            grpc.StatusCode.INVALID_ARGUMENT, "items[0].concepts[0].images")
    finally:
        channel.close()


def test_a_small_evaluation_stays_one_unary_call(evaluator):
    source, masks = _source()
    before = _messages("EvaluateSet")
    with IceClient(evaluator=evaluator, config=ChannelConfig(max_message_bytes=LIMIT)) as ice:
        result = ice.evaluate(source, [("a", masks[0], [_noise(3)]), ("b", masks[1], [_noise(4)])])
    assert _messages("EvaluateSet") == before
    assert {s.encoder for s in result.scores} == {"CLIP", "DINO"}
    assert all(s.accuracy_scope == "REQUEST" for s in result.scores)


def test_a_one_pass_iterable_still_streams(evaluator):
    source, masks = _source()
    items = (("i", source, [("a", masks[0], [_noise(k) for k in range(5)])], []) for _ in range(1))
    with IceClient(evaluator=evaluator, config=ChannelConfig(max_message_bytes=LIMIT)) as ice:
        assert ice.evaluate_set(items).item_count == 1
    with pytest.raises(ServiceError):
        with IceClient(evaluator=evaluator, config=ChannelConfig(max_message_bytes=LIMIT)) as ice:
            ice.evaluate_set([])
