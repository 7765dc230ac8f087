"""The bad-input corpus against the real LocalizerService (tiny bundle, one server for the module): hostile images,
every option out of range (negative, absurd, NaN, infinite, open bounds), unknown enum values, bytes that are not
the message, an oversized message. The answer is INVALID_ARGUMENT (localizer.proto: a bomb is INVALID_ARGUMENT too)
or RESOURCE_EXHAUSTED for the message size, never INTERNAL or UNKNOWN. A real Localize takes ~1 s on 2 CPU cores,
so after each case the server proves it still answers with GetServerInfo, and real Localize calls run before and
after the whole corpus (a lock left held or a poisoned model would fail them)."""

from __future__ import annotations

import math

import grpc
import pytest

from ice.localizer.v1 import localizer_pb2 as pb
from ice.localizer.v1 import localizer_pb2_grpc
from tests.reliability.corpus import INVALID, bad_images, encode, photo
from tests.reliability.harness import (
    TEST_MAX_MESSAGE_BYTES,
    assert_refused_well,
    outcome,
    raw_unary,
    start_inprocess,
)

IMAGE = encode(photo(96, 64), "PNG")
FAST = pb.LocalizeOptions(max_rounds=1)
EXHAUSTED = frozenset({"RESOURCE_EXHAUSTED"})

# option -> values outside its documented range (localizer.proto)
OUT_OF_RANGE = {
    "max_concepts": (0, -1, 65, 2**31 - 1, -(2**31)),
    "max_rounds": (0, -3, 33, 2**31 - 1),
    "remaining_fraction_threshold": (1.0, -0.01, 7.5, math.nan, math.inf, -math.inf),
    "l1_penalty": (0.0, -1.0, 10.5, math.nan, math.inf),
    "min_area_fraction": (1.0, -0.5, math.nan),
    "merge_threshold": (0.0, -2.0, 10.01, 3e38, math.nan),
    "merge_rounds": (0, -1, 11, 1_000_000),
    "timestep": (-1, 1000, 2**31 - 1),
}


def _cases():
    # localizer.proto: a header declaring more pixels than the limit is INVALID_ARGUMENT here
    cases = [(f"image/{c.name}", pb.LocalizeRequest(image=c.data, options=FAST), INVALID, "image") for c in bad_images()]
    for name, values in OUT_OF_RANGE.items():
        for v in values:
            cases.append((f"options.{name}={v}", pb.LocalizeRequest(image=IMAGE, options=pb.LocalizeOptions(**{name: v})),
                          INVALID, f"options.{name}"))
    for v in (3, 99, -1, 2**31 - 1):
        cases.append((f"options.refinement={v}", pb.LocalizeRequest(image=IMAGE, options=pb.LocalizeOptions(refinement=v)),
                      INVALID, "options.refinement"))
    cases.append(("oversized_message", pb.LocalizeRequest(image=b"\0" * (TEST_MAX_MESSAGE_BYTES + 1024)), EXHAUSTED,
                  None))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def localizer(tiny_bundle_dir):
    running = start_inprocess("localizer", tiny_bundle_dir)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield localizer_pb2_grpc.LocalizerServiceStub(channel), channel
    channel.close()
    running.stop(grace=0)


def _localize_works(stub) -> None:
    response = stub.Localize(pb.LocalizeRequest(image=IMAGE, options=FAST), timeout=120)
    assert (response.width, response.height) == (96, 64) and response.rounds == 1


def test_a_good_request_before_the_corpus(localizer):
    _localize_works(localizer[0])


@pytest.mark.parametrize("name,request_,expect,field", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused(localizer, name, request_, expect, field):
    stub, _ = localizer
    assert_refused_well(outcome(lambda: stub.Localize(request_, timeout=60)), expect, field)
    assert outcome(lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)).code == "OK"


@pytest.mark.parametrize("wire", [b"\xff\xff\xff\xff\xff", b"\x12\x02\x08", b"\x0a\x80\x80\x80\x80\x10"],
                         ids=["not_protobuf", "truncated_options", "length_beyond_the_message"])
def test_bytes_that_are_not_the_message_are_invalid_argument(localizer, wire):
    _, channel = localizer
    result = outcome(lambda: raw_unary(channel, "/ice.localizer.v1.LocalizerService/Localize")(wire, timeout=30))
    assert_refused_well(result, INVALID)


def test_a_good_request_after_the_corpus(localizer):
    _localize_works(localizer[0])
