"""The EvaluatorService through real gRPC on loopback against the tiny bundle: good requests agree with the
metrics modules, bad ones are answered INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the field, and the service
keeps serving afterwards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from skimage import data

from ice.common.v1 import common_pb2
from ice.evaluator.v1 import evaluator_pb2 as pb
from ice.evaluator.v1 import evaluator_pb2_grpc
from services.common.images import decode_image, decode_mask, encode_mask, encode_png
from services.common.server import start_server
from services.common.settings import EvaluatorSettings, from_sources
from services.evaluator.encoders import CLIP, DINO, Embedder, load_encoders
from services.evaluator.masks import score_masks
from services.evaluator.metrics import ConceptInput, ItemInput, Protocol, SetEvaluation, source_region
from services.evaluator.server import build_spec

SIZE = (120, 80)  # width, height of the test source images


@pytest.fixture(scope="module")
def running(tiny_bundle_dir):
    settings = from_sources(env={}, cls=EvaluatorSettings, bundle=tiny_bundle_dir, host="127.0.0.1",
                            port=-1, metrics_port=0, batch_size=4, max_images_per_concept=8)
    server = start_server(build_spec(settings), settings)
    assert server.wait_ready(600), server.load_error
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, evaluator_pb2_grpc.EvaluatorServiceStub(channel)
    channel.close()
    server.stop(grace=0)


@pytest.fixture(scope="module")
def stub(running):
    return running[1]


def photo(seed: int) -> Image.Image:
    crops = [data.coffee(), data.astronaut(), data.chelsea()]
    return Image.fromarray(crops[seed % 3]).resize(SIZE)


def masks() -> list[np.ndarray]:
    out = []
    for top, left, bottom, right in [(5, 5, 40, 50), (30, 60, 78, 118), (45, 0, 80, 40)]:
        m = np.zeros((SIZE[1], SIZE[0]), bool)
        m[top:bottom, left:right] = True
        out.append(m)
    return out


def concepts_for(img: Image.Image, picks: list[list[int]], protocol: Protocol | None = None) -> list[pb.ConceptSamples]:
    """Concept k with images that copy the source regions `picks[k]` of this image."""
    protocol = protocol or Protocol()
    ms = masks()
    regions = [encode_png(source_region(img, m, protocol)) for m in ms]
    return [pb.ConceptSamples(concept_id=f"c{k}", mask=encode_mask(ms[k]), images=[regions[j] for j in js])
            for k, js in enumerate(picks)]


def good_request(**options) -> pb.EvaluateRequest:
    img = photo(0)
    return pb.EvaluateRequest(source_image=encode_png(img), concepts=concepts_for(img, [[0, 0], [1], [2, 2]]),
                              composition_images=[encode_png(img)], options=pb.EvaluateOptions(**options))


def violation(err: grpc.RpcError) -> str:
    bad_request = error_details_pb2.BadRequest()
    assert rpc_status.from_call(err).details[0].Unpack(bad_request)
    return bad_request.field_violations[0].field


def assert_refused(call, code, field):
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert violation(err.value) == field
    else:
        assert field in err.value.details()


def test_server_info(stub, tiny_bundle):
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).info
    assert info.service == "ice.evaluator.v1.EvaluatorService"
    assert info.bundle.sha256 == tiny_bundle.digest and info.bundle.precision == "fp32"
    assert info.device == "cpu"


def test_evaluate_identical_copies_score_one_per_encoder(stub):
    response = stub.Evaluate(good_request(), timeout=60)
    assert [s.encoder for s in response.scores] == [common_pb2.ENCODER_CLIP, common_pb2.ENCODER_DINO]
    for s in response.scores:
        assert s.sim_i == pytest.approx(1.0, abs=1e-5) and s.sim_c == pytest.approx(1.0, abs=1e-5)
        assert s.acc1 == 1.0 and s.acc3 == 1.0
        assert [(c.concept_id, c.rank) for c in s.concepts] == [("c0", 1), ("c1", 1), ("c2", 1)]


def test_evaluate_options_select_encoders_and_sim_c_is_unset_without_composition(stub):
    request = good_request(encoders=[common_pb2.ENCODER_DINO], background_fill=pb.BACKGROUND_FILL_WHITE,
                           crop=pb.CROP_NONE)
    del request.composition_images[:]
    response = stub.Evaluate(request, timeout=60)
    assert [s.encoder for s in response.scores] == [common_pb2.ENCODER_DINO]
    assert not response.scores[0].HasField("sim_c")
    # the regions were made with black fill + box crop, so under white fill + no crop they are no longer copies
    assert response.scores[0].sim_i < 1 - 1e-4


def _bad_requests():
    def mask_size(r):
        r.concepts[1].mask = encode_mask(np.ones((10, 10), bool))

    def no_images(r):
        del r.concepts[0].images[:]

    def corrupt(r):
        r.concepts[0].images.extend([r.concepts[0].images[0], encode_png(photo(1))[:200]])

    def empty_mask(r):
        r.concepts[2].mask = encode_mask(np.zeros((SIZE[1], SIZE[0]), bool))

    def duplicate_id(r):
        r.concepts[2].concept_id = "c0"

    def no_concepts(r):
        del r.concepts[:]

    def bad_source(r):
        r.source_image = b"not an image"

    def bad_fill(r):
        r.options.background_fill = 99

    def bad_crop(r):
        r.options.crop = 7

    def unspecified_encoder(r):
        r.options.encoders.append(common_pb2.ENCODER_UNSPECIFIED)

    def twice(r):
        r.options.encoders.extend([common_pb2.ENCODER_CLIP, common_pb2.ENCODER_CLIP])

    def bad_composition(r):
        r.composition_images.append(b"\x89PNG\r\n\x1a\n garbage")

    return [
        (mask_size, "concepts[1].mask"), (no_images, "concepts[0].images"), (corrupt, "concepts[0].images[3]"),
        (empty_mask, "concepts[2].mask"), (duplicate_id, "concepts[2].concept_id"), (no_concepts, "concepts"),
        (bad_source, "source_image"), (bad_fill, "options.background_fill"), (bad_crop, "options.crop"),
        (unspecified_encoder, "options.encoders"), (twice, "options.encoders"),
        (bad_composition, "composition_images[1]"),
    ]


@pytest.mark.parametrize("spoil,field", _bad_requests(), ids=[f for _, f in _bad_requests()])
def test_bad_inputs_are_invalid_argument_and_the_service_keeps_serving(stub, spoil, field):
    request = good_request()
    spoil(request)
    assert_refused(lambda: stub.Evaluate(request, timeout=60), grpc.StatusCode.INVALID_ARGUMENT, field)
    assert stub.Evaluate(good_request(encoders=[common_pb2.ENCODER_CLIP]), timeout=60).scores[0].acc1 == 1.0


def test_limits_are_resource_exhausted(stub):
    request = good_request()
    request.concepts[1].images.extend([request.concepts[1].images[0]] * 8)  # 9 > max_images_per_concept 8
    assert_refused(lambda: stub.Evaluate(request, timeout=60), grpc.StatusCode.RESOURCE_EXHAUSTED, "concepts[1].images")


def test_max_images_per_request_and_max_set_items_are_the_settings_limits(tiny_bundle_dir):
    """--max-images-per-request (generated + composition images of a request, or of a set's item) and
    --max-set-items, at values other than their defaults: the limit is exactly the setting."""
    settings = from_sources(env={}, cls=EvaluatorSettings, bundle=tiny_bundle_dir, host="127.0.0.1", port=-1,
                            metrics_port=0, batch_size=4, max_images_per_request=6, max_set_items=2)
    server = start_server(build_spec(settings), settings)
    try:
        assert server.wait_ready(600), server.load_error
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            limited = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
            at_limit = good_request()  # 5 generated + 1 composition image
            assert limited.Evaluate(at_limit, timeout=120).scores
            over = good_request()
            over.composition_images.append(over.composition_images[0])
            assert_refused(lambda: limited.Evaluate(over, timeout=120), grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "7 images exceed the limit of 6")
            options = pb.EvaluateSetRequest(options=pb.EvaluateOptions())
            items = [pb.EvaluateSetRequest(item=it) for it in set_items()]  # 6, 6 and 4 images
            assert limited.EvaluateSet(iter([options, *items[:2]]), timeout=120).item_count == 2
            assert_refused(lambda: limited.EvaluateSet(iter([options, *items]), timeout=120),
                           grpc.StatusCode.RESOURCE_EXHAUSTED, "more than 2 items in one set")
            heavy = pb.EvaluateSetRequest(item=set_items()[0])
            heavy.item.composition_images.append(heavy.item.composition_images[0])
            assert_refused(lambda: limited.EvaluateSet(iter([options, heavy]), timeout=120),
                           grpc.StatusCode.RESOURCE_EXHAUSTED, "7 images exceed the limit of 6 per item")
    finally:
        server.stop(grace=0)


# ----------------------------------------------------------------------------------------------------------------
# EvaluateSet


def set_items():
    """Three items; some concepts carry copies of another concept's region (wrong on purpose)."""
    picks = [[[0, 0], [1, 2], [2]], [[1], [1, 1], [0, 2]], [[0], [2], [2, 1]]]
    items = []
    for i, p in enumerate(picks):
        img = photo(i)
        items.append(pb.EvaluateSetItem(item_id=f"img{i}" if i != 1 else "", source_image=encode_png(img),
                                        concepts=concepts_for(img, p, Protocol("gray", "mask_box")),
                                        composition_images=[encode_png(photo(i + 1))] if i != 2 else []))
    return items


def test_evaluate_set_streams_items_and_matches_the_metrics_module(stub, tiny_bundle):
    options = pb.EvaluateOptions(background_fill=pb.BACKGROUND_FILL_GRAY)
    items = set_items()
    stream = [pb.EvaluateSetRequest(options=options)] + [pb.EvaluateSetRequest(item=it) for it in items]
    response = stub.EvaluateSet(iter(stream), timeout=120)
    assert (response.item_count, response.concept_count) == (3, 9)
    assert [s.item_id for s in response.item_scores] == ["img0", "1", "img2"]

    evaluation = SetEvaluation(Embedder(load_encoders(tiny_bundle, "cpu"), 4), (CLIP, DINO), Protocol("gray", "mask_box"))
    for i, it in enumerate(items):
        source = decode_image(it.source_image)
        concepts = [ConceptInput(c.concept_id, decode_mask(c.mask), [decode_image(b) for b in c.images])
                    for c in it.concepts]
        evaluation.add(ItemInput(it.item_id or str(i), source, concepts, [decode_image(b) for b in it.composition_images]))
    direct = evaluation.result()
    for got, name in zip(response.scores, (CLIP, DINO), strict=True):
        want = direct[name].overall
        assert got.acc1 == pytest.approx(want.acc1) and got.acc3 == pytest.approx(want.acc3)
        assert got.sim_i == pytest.approx(want.sim_i, abs=1e-6) and got.sim_c == pytest.approx(want.sim_c, abs=1e-6)
        assert [c.rank for c in got.concepts] == [c.rank for c in want.concepts]
        assert 0 < got.acc1 < 1  # the wrong copies count
    for k, item in enumerate(response.item_scores):
        want = direct[DINO].items[k][1]
        assert item.scores[1].acc1 == pytest.approx(want.acc1)
        assert item.scores[1].HasField("sim_c") == (want.sim_c is not None)


def test_accuracy_scope_is_reported_per_request_and_per_set(stub):
    """Evaluate ranks among one image's own concepts (flagged REQUEST: with 3 concepts ACC^3 is 1 whatever the
    images); EvaluateSet ranks among the whole set's (SET), which is the paper's protocol."""
    items = set_items()
    wrong = pb.EvaluateRequest(source_image=items[1].source_image, concepts=items[1].concepts)  # copies of others
    single = stub.Evaluate(wrong, timeout=60)
    for s in single.scores:
        assert s.accuracy_scope == pb.ACCURACY_SCOPE_REQUEST and s.concepts_in_scope == 3
        assert s.acc3 == 1.0  # any image ranks its own concept among the first 3 of 3
        assert not s.HasField("sim_c") and s.sim_c_absent_reason == "no composition images were sent"
    stream = [pb.EvaluateSetRequest(options=pb.EvaluateOptions())] + [pb.EvaluateSetRequest(item=it) for it in items]
    whole = stub.EvaluateSet(iter(stream), timeout=120)
    for s in [*whole.scores, *(e for item in whole.item_scores for e in item.scores)]:
        assert s.accuracy_scope == pb.ACCURACY_SCOPE_SET and s.concepts_in_scope == 9
    assert whole.scores[0].sim_c_absent_reason == ""  # two of the items sent composition images
    assert whole.item_scores[2].scores[0].sim_c_absent_reason == "no composition images were sent"


def test_sim_c_is_defined_for_an_image_with_one_concept(stub):
    img = photo(0)
    request = pb.EvaluateRequest(source_image=encode_png(img), concepts=concepts_for(img, [[0, 0]])[:1],
                                 composition_images=[encode_png(photo(1)), encode_png(img)])
    for s in stub.Evaluate(request, timeout=60).scores:
        assert s.HasField("sim_c") and s.sim_c_absent_reason == ""
        assert -1 <= s.sim_c < 1 and s.concepts_in_scope == 1


def test_sdk_evaluate_set_matches_the_service(running, tiny_bundle):
    from client import IceClient

    server, stub = running
    items = set_items()
    sdk_items = [(it.item_id or str(k), it.source_image,
                  [(c.concept_id, c.mask, list(c.images)) for c in it.concepts], list(it.composition_images))
                 for k, it in enumerate(items)]
    with IceClient(evaluator=f"127.0.0.1:{server.port}") as ice:
        result = ice.evaluate_set(iter(sdk_items), background_fill="gray")
    stream = [pb.EvaluateSetRequest(options=pb.EvaluateOptions(background_fill=pb.BACKGROUND_FILL_GRAY))]
    direct = stub.EvaluateSet(iter(stream + [pb.EvaluateSetRequest(item=it) for it in items]), timeout=120)
    assert (result.item_count, result.concept_count) == (3, 9)
    assert [s.encoder for s in result.scores] == ["CLIP", "DINO"]
    for got, want in zip(result.scores, direct.scores, strict=True):
        assert got.acc1 == pytest.approx(want.acc1) and got.acc3 == pytest.approx(want.acc3)
        assert got.accuracy_scope == "SET" and got.concepts_in_scope == 9 and not got.per_request
    assert [i for i, _ in result.items] == ["img0", "1", "img2"]


def test_evaluate_set_stream_errors(stub):
    item = pb.EvaluateSetRequest(item=set_items()[0])
    options = pb.EvaluateSetRequest(options=pb.EvaluateOptions())
    cases = [
        ([item], "options"),
        ([options], "items"),
        ([options, item, options], "items[1]"),
        ([options, item, item], "items[1].item_id"),
    ]
    for stream, field in cases:
        assert_refused(lambda s=stream: stub.EvaluateSet(iter(s), timeout=60), grpc.StatusCode.INVALID_ARGUMENT, field)
    bad = pb.EvaluateSetRequest(item=set_items()[1])
    bad.item.concepts[0].images.append(b"junk")
    assert_refused(lambda: stub.EvaluateSet(iter([options, item, bad]), timeout=60),
                   grpc.StatusCode.INVALID_ARGUMENT, "items[1].concepts[0].images[1]")
    assert stub.EvaluateSet(iter([options, item]), timeout=60).item_count == 1


# ----------------------------------------------------------------------------------------------------------------
# ScoreMasks


def test_score_masks_matches_the_masks_module(stub):
    rng = np.random.default_rng(0)
    gt = masks()
    pred = [np.roll(m, int(rng.integers(-8, 8)), axis=1) for m in gt[::-1]] + [np.zeros_like(gt[0])]
    response = stub.ScoreMasks(pb.ScoreMasksRequest(predicted=[encode_mask(m) for m in pred],
                                                    ground_truth=[encode_mask(m) for m in gt]), timeout=30)
    want = score_masks(pred, gt)
    assert response.miou == pytest.approx(want.miou)
    assert response.recall == pytest.approx(want.mean_recall)
    assert response.precision == pytest.approx(want.mean_precision)
    assert [(m.predicted_index, m.ground_truth_index) for m in response.matches] == [(2, 0), (1, 1), (0, 2)]


def test_score_masks_bad_inputs(stub):
    gt = [encode_mask(m) for m in masks()]
    small = encode_mask(np.ones((10, 10), bool))
    empty = encode_mask(np.zeros((SIZE[1], SIZE[0]), bool))
    cases = [
        (pb.ScoreMasksRequest(predicted=gt), "ground_truth"),
        (pb.ScoreMasksRequest(predicted=[gt[0], small], ground_truth=gt), "predicted[1]"),
        (pb.ScoreMasksRequest(ground_truth=[gt[0], small]), "ground_truth[1]"),
        (pb.ScoreMasksRequest(ground_truth=[gt[0], empty]), "ground_truth[1]"),
        (pb.ScoreMasksRequest(ground_truth=[b"nope"]), "ground_truth[0]"),
    ]
    for request, field in cases:
        assert_refused(lambda r=request: stub.ScoreMasks(r, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, field)
    assert_refused(lambda: stub.ScoreMasks(pb.ScoreMasksRequest(predicted=[gt[0]] * 257, ground_truth=gt), timeout=30),
                   grpc.StatusCode.RESOURCE_EXHAUSTED, "predicted")
    assert stub.ScoreMasks(pb.ScoreMasksRequest(ground_truth=gt), timeout=30).miou == 0.0
