"""The bad-input corpus against the real EvaluatorService (tiny bundle, one server for the module): every
Evaluate / EvaluateSet / ScoreMasks field that takes an image, a mask, a string, a number or an enum gets hostile
values; the answer is INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming the field (never INTERNAL or UNKNOWN), and the
same RPC's good request succeeds right after."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from ice.common.v1 import common_pb2
from ice.evaluator.v1 import evaluator_pb2 as pb
from ice.evaluator.v1 import evaluator_pb2_grpc
from tests.reliability.corpus import (
    INVALID,
    LENIENT,
    LONG_STRING,
    NON_UTF8,
    NUL_STRING,
    bad_images,
    bad_masks,
    corrupt_utf8,
    encode,
    mask_png,
    photo,
)
from tests.reliability.harness import (
    TEST_MAX_MESSAGE_BYTES,
    Outcome,
    assert_refused_well,
    outcome,
    raw_stream_unary,
    raw_unary,
    start_inprocess,
)

SIZE = (96, 64)
SOURCE = encode(photo(*SIZE), "PNG")
GENERATED = encode(photo(64, 64, seed=1), "JPEG")
MASK = mask_png(SIZE)
SERVICE = "/ice.evaluator.v1.EvaluatorService/"
EXHAUSTED = frozenset({"RESOURCE_EXHAUSTED"})


def concept(cid: str = "c0", mask: bytes = MASK, images=None) -> pb.ConceptSamples:
    return pb.ConceptSamples(concept_id=cid, mask=mask, images=[GENERATED] if images is None else images)


def evaluate(source: bytes = SOURCE, concepts=None, composition=(), options=None) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(source_image=source, concepts=[concept()] if concepts is None else concepts,
                              composition_images=list(composition), options=options)


def item(item_id: str = "", **kw) -> pb.EvaluateSetItem:
    request = evaluate(**kw)
    return pb.EvaluateSetItem(item_id=item_id, source_image=request.source_image, concepts=request.concepts,
                              composition_images=request.composition_images)


def stream(*items, options=None) -> list[pb.EvaluateSetRequest]:
    return [pb.EvaluateSetRequest(options=options or pb.EvaluateOptions())] + [
        pb.EvaluateSetRequest(item=i) for i in items]


def score_masks(predicted=(MASK,), ground_truth=(MASK,)) -> pb.ScoreMasksRequest:
    return pb.ScoreMasksRequest(predicted=list(predicted), ground_truth=list(ground_truth))


GOOD = {"Evaluate": evaluate(), "EvaluateSet": stream(item("a"), item("b")), "ScoreMasks": score_masks()}


class Send:
    """A typed request, or wire bytes for the raw path (non-UTF-8, not protobuf at all)."""

    def __init__(self, rpc: str, request, raw: bool = False):
        self.rpc, self.request, self.raw = rpc, request, raw

    def __call__(self, stub, channel) -> Outcome:
        if not self.raw:
            return outcome(lambda: getattr(stub, self.rpc)(
                iter(self.request) if self.rpc == "EvaluateSet" else self.request, timeout=60))
        if self.rpc == "EvaluateSet":
            return outcome(lambda: raw_stream_unary(channel, SERVICE + self.rpc)(iter(self.request), timeout=60))
        return outcome(lambda: raw_unary(channel, SERVICE + self.rpc)(self.request, timeout=60))


def _non_utf8(message) -> bytes:
    return corrupt_utf8(message.SerializeToString())


def _cases() -> list[tuple[str, Send, frozenset, str | None]]:
    cases: list[tuple[str, Send, frozenset, str | None]] = []

    def add(name, rpc, request, expect=INVALID, field=None, raw=False):
        cases.append((f"{rpc}:{name}", Send(rpc, request, raw), frozenset(expect), field))

    for c in bad_images():
        add(f"source_image/{c.name}", "Evaluate", evaluate(source=c.data), c.expect, "source_image")
        add(f"images[0]/{c.name}", "Evaluate", evaluate(concepts=[concept(images=[c.data])]), c.expect,
            "concepts[0].images[0]")
        add(f"composition_images[0]/{c.name}", "Evaluate", evaluate(composition=[GENERATED, c.data]), c.expect,
            "composition_images[1]")
        add(f"items[1].source_image/{c.name}", "EvaluateSet", stream(item("a"), item("b", source=c.data)),
            c.expect, "items[1].source_image")
    for m in bad_masks(SIZE):
        add(f"concepts[1].mask/{m.name}", "Evaluate", evaluate(concepts=[concept(), concept("c1", m.data)]),
            m.expect, "concepts[1].mask")
        add(f"items[0].concepts[0].mask/{m.name}", "EvaluateSet", stream(item(concepts=[concept(mask=m.data)])),
            m.expect, "items[0].concepts[0].mask")
        add(f"ground_truth[1]/{m.name}", "ScoreMasks", score_masks(ground_truth=[MASK, m.data]), m.expect,
            "ground_truth[1]")
        # an empty prediction is a valid prediction
        add(f"predicted[0]/{m.name}", "ScoreMasks", score_masks(predicted=[m.data]),
            LENIENT if m.name == "mask_all_zero" else m.expect, "predicted[0]")

    # enums and options
    for name, options, field in (
        ("background_fill_99", pb.EvaluateOptions(background_fill=99), "options.background_fill"),
        ("background_fill_negative", pb.EvaluateOptions(background_fill=-5), "options.background_fill"),
        ("crop_99", pb.EvaluateOptions(crop=99), "options.crop"),
        ("encoder_99", pb.EvaluateOptions(encoders=[99]), "options.encoders"),
        ("encoder_unspecified", pb.EvaluateOptions(encoders=[common_pb2.ENCODER_UNSPECIFIED]), "options.encoders"),
        ("encoder_twice", pb.EvaluateOptions(encoders=[common_pb2.ENCODER_CLIP] * 2), "options.encoders"),
    ):
        add(name, "Evaluate", evaluate(options=options), INVALID, field)
        add(name, "EvaluateSet", stream(item(), options=options), INVALID, field)

    # strings
    add("concept_id/non_utf8", "Evaluate", _non_utf8(evaluate(concepts=[concept(NON_UTF8)])), raw=True)
    add("item_id/non_utf8", "EvaluateSet", [m.SerializeToString() for m in stream(item())[:1]]
        + [_non_utf8(stream(item(NON_UTF8))[1])], raw=True)
    add("not_protobuf", "Evaluate", b"\xff\xff\xff\xff\x0f garbage", raw=True)
    add("not_protobuf", "ScoreMasks", b"\x0a\xff\xff\xff\xff\x0f", raw=True)
    add("concept_id/empty", "Evaluate", evaluate(concepts=[concept("")]), INVALID, "concepts[0].concept_id")
    add("concept_id/repeated", "Evaluate", evaluate(concepts=[concept(), concept()]), INVALID,
        "concepts[1].concept_id")
    add("concept_id/200k_chars", "Evaluate", evaluate(concepts=[concept(LONG_STRING)]), LENIENT)
    add("concept_id/nul_byte", "Evaluate", evaluate(concepts=[concept(NUL_STRING)]), LENIENT)
    add("item_id/repeated", "EvaluateSet", stream(item("x"), item("x")), INVALID, "items[1].item_id")

    # counts and limits
    add("no_concepts", "Evaluate", evaluate(concepts=[]), INVALID, "concepts")
    add("concept_without_images", "Evaluate", evaluate(concepts=[concept(images=[])]), INVALID,
        "concepts[0].images")
    add("65_concepts", "Evaluate", evaluate(concepts=[concept(f"c{i}") for i in range(65)]), EXHAUSTED)
    add("65_images_in_a_concept", "Evaluate", evaluate(concepts=[concept(images=[GENERATED] * 65)]), EXHAUSTED)
    add("no_ground_truth", "ScoreMasks", score_masks(ground_truth=[]), INVALID, "ground_truth")
    add("257_predicted", "ScoreMasks", score_masks(predicted=[MASK] * 257), EXHAUSTED)
    add("257_ground_truth", "ScoreMasks", score_masks(ground_truth=[MASK] * 257), EXHAUSTED)

    # the stream's shape
    add("item_before_options", "EvaluateSet", [pb.EvaluateSetRequest(item=item())], INVALID, "options")
    add("options_twice", "EvaluateSet", stream(item()) + [pb.EvaluateSetRequest(options=pb.EvaluateOptions())],
        INVALID, "items[1]")
    add("no_items", "EvaluateSet", stream(), INVALID, "items")
    add("empty_stream", "EvaluateSet", [], INVALID, "options")

    # a message above the server's max_message_bytes: refused by gRPC itself
    big = b"\0" * (TEST_MAX_MESSAGE_BYTES + 1024)
    add("oversized_message", "Evaluate", evaluate(source=big), EXHAUSTED)
    add("oversized_item", "EvaluateSet", stream(item("a"), item("b", source=big)), EXHAUSTED)
    add("oversized_message", "ScoreMasks", score_masks(predicted=[big]), EXHAUSTED)
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def evaluator(tiny_bundle_dir):
    running = start_inprocess("evaluator", tiny_bundle_dir)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield evaluator_pb2_grpc.EvaluatorServiceStub(channel), channel
    channel.close()
    running.stop(grace=0)


def test_good_requests_succeed(evaluator):
    stub, channel = evaluator
    for rpc, request in GOOD.items():
        result = Send(rpc, request)(stub, channel)
        assert result.code == "OK", f"{rpc}: {result}"


@pytest.mark.parametrize("name,send,expect,field", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_the_next_good_request_succeeds(evaluator, name, send: Callable, expect, field):
    stub, channel = evaluator
    assert_refused_well(send(stub, channel), expect, field)
    good = Send(send.rpc, GOOD[send.rpc])(stub, channel)
    assert good.code == "OK", f"the good request after {name} failed: {good}"


def corpus_counts() -> dict[str, int]:
    """Inputs tried per RPC (for docs/reliability.md)."""
    counts: dict[str, int] = {}
    for _, send, _, _ in CASES:
        counts[send.rpc] = counts.get(send.rpc, 0) + 1
    return counts


# refusals decided by counts, ids, options or the stream's structure: nothing needs decoding to make them (a
# repeated item_id and a second options message are not among them: the set's item before them was checked,
# so decoded, when it arrived)
SHAPE_CASES = {"no_concepts", "concept_without_images", "65_concepts", "65_images_in_a_concept", "concept_id/empty",
               "concept_id/repeated", "item_before_options", "no_items",
               "empty_stream", "background_fill_99", "background_fill_negative", "crop_99", "encoder_99",
               "encoder_unspecified", "encoder_twice"}


def test_a_refused_request_costs_no_encoder_pass_and_a_refused_shape_decodes_nothing(evaluator, monkeypatch):
    """Refusing is cheap: every Evaluate / EvaluateSet case of the corpus that is refused ran no encoder pass
    (not even on a set's earlier, valid item), and one refused for its shape decoded no image or mask."""
    from services.evaluator import encoders, server

    passes, decodes = [], []
    embed_pixels = encoders.ImageEncoder.embed_pixels
    monkeypatch.setattr(encoders.ImageEncoder, "embed_pixels",
                        lambda self, pixels: passes.append(len(pixels)) or embed_pixels(self, pixels))

    def counted(real):
        return lambda *args, **kwargs: decodes.append(1) or real(*args, **kwargs)

    for name in ("decode_image", "decode_mask"):
        monkeypatch.setattr(server, name, counted(getattr(server, name)))
    stub, channel = evaluator
    for rpc in ("Evaluate", "EvaluateSet"):  # the counters see the work a good request does
        assert Send(rpc, GOOD[rpc])(stub, channel).code == "OK" and passes and decodes
        passes.clear(), decodes.clear()
    shape_seen = 0
    for name, send, _, _ in CASES:
        if send.rpc == "ScoreMasks":
            continue
        passes.clear(), decodes.clear()
        result = send(stub, channel)
        if result.code == "OK":  # a lenient case: accepted, and rightly encoded
            continue
        assert not passes, f"{name}: refused ({result}) after {len(passes)} encoder passes"
        if name.split(":", 1)[1] in SHAPE_CASES:
            shape_seen += 1
            assert not decodes, f"{name}: refused for its shape ({result}) after {len(decodes)} decodes"
    assert shape_seen == len([c for c in CASES if c[1].rpc != "ScoreMasks" and c[0].split(":", 1)[1] in SHAPE_CASES])
    assert shape_seen >= len(SHAPE_CASES)  # each named case exists in the corpus
