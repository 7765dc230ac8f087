"""The gRPC servicer of the localizer: decode and validate the request, run the loop, encode the response."""

from __future__ import annotations

import math
import threading
import time

from prometheus_client import Histogram

from ice.common.v1 import common_pb2
from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc
from services.common.bundle import Bundle
from services.common.errors import (
    InvalidArgument,
    Unavailable,
)
from services.common.images import decode_image, encode_mask
from services.common.interceptors import ensure_active
from services.common.server import ServiceSpec
from services.common.service import compute_dtype, precision_name, resolve_device, server_info
from services.common.settings import LocalizerSettings
from services.common.tracing import record_localize_stages, timed_span, tracer
from services.localizer.pipeline import LocalizeOptions, Localizer
from services.localizer.retriever import onnx_providers

SERVICE = localizer_pb2.DESCRIPTOR.services_by_name["LocalizerService"].full_name
TRACER = tracer("localizer")

STAGE_SECONDS = Histogram(
    "ice_localizer_stage_seconds",
    "Seconds spent per stage of Localize (decode, retrieve, attention, segment, masks, encode; per round).",
    ("stage",),
    # one attention pass of an SD-2.1-size UNet takes 13 s on a quiet 2-core CPU and 64 s on a busy one
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)

_STOP_REASON = {
    "remaining_fraction": localizer_pb2.STOP_REASON_REMAINING_FRACTION,
    "max_rounds": localizer_pb2.STOP_REASON_MAX_ROUNDS,
    "max_concepts": localizer_pb2.STOP_REASON_MAX_CONCEPTS,
    "no_progress": localizer_pb2.STOP_REASON_NO_PROGRESS,
    "no_new_noun": localizer_pb2.STOP_REASON_NO_NEW_NOUN,
    "no_concept": localizer_pb2.STOP_REASON_NO_CONCEPT,
}
_REFINEMENT = {
    localizer_pb2.REFINEMENT_UNSPECIFIED: "kmeans",
    localizer_pb2.REFINEMENT_NONE: "none",
    localizer_pb2.REFINEMENT_KMEANS: "kmeans",
}


def _ranged(msg, name: str, default, low, high, *, low_open: bool = False, high_open: bool = False):
    """The field's value (default when unset), or InvalidArgument naming `options.<name>` when out of range."""
    if not msg.HasField(name):
        return default
    value = getattr(msg, name)
    bad = (isinstance(value, float) and not math.isfinite(value)) or value < low or value > high
    bad = bad or (low_open and value == low) or (high_open and value == high)
    if bad:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise InvalidArgument(f"{value} is outside {interval}", field=f"options.{name}")
    return value


def options_from_proto(msg: localizer_pb2.LocalizeOptions, default_max_concepts: int = 0,
                       defaults: LocalizeOptions | None = None) -> LocalizeOptions:
    """Validate every option (ranges of localizer.proto) and fill the unset ones from `defaults` (the published
    values, or the bundle's recommended ones)."""
    d = defaults or LocalizeOptions()
    if msg.refinement not in _REFINEMENT:
        raise InvalidArgument(f"unknown value {msg.refinement}", field="options.refinement")
    return LocalizeOptions(
        max_concepts=_ranged(msg, "max_concepts", default_max_concepts or None, 1, 64),
        max_rounds=_ranged(msg, "max_rounds", d.max_rounds, 1, 32),
        remaining_fraction_threshold=_ranged(
            msg, "remaining_fraction_threshold", d.remaining_fraction_threshold, 0.0, 1.0, high_open=True
        ),
        l1_penalty=_ranged(msg, "l1_penalty", d.l1_penalty, 0.0, 10.0, low_open=True),
        min_area_fraction=_ranged(msg, "min_area_fraction", d.min_area_fraction, 0.0, 1.0, high_open=True),
        merge_threshold=_ranged(msg, "merge_threshold", d.merge_threshold, 0.0, 10.0, low_open=True),
        merge_rounds=_ranged(msg, "merge_rounds", d.merge_rounds, 1, 10),
        timestep=_ranged(msg, "timestep", d.timestep, 0, 999),
        refinement=_REFINEMENT[msg.refinement],
    )


class LocalizerServicer(localizer_pb2_grpc.LocalizerServiceServicer):
    def __init__(self, settings: LocalizerSettings):
        self.settings = settings
        self.bundle: Bundle | None = None
        self.localizer: Localizer | None = None
        self.device = "cpu"
        self.dtype = None
        self._gpu = threading.Lock()  # one Localize computes at a time per process

    def load(self) -> None:
        self.bundle = Bundle.open(self.settings.bundle, verify_hashes=self.settings.verify_bundle_hashes)
        self.device = resolve_device(self.settings.device)
        self.dtype = compute_dtype(self.device)
        self.localizer = Localizer(
            self.bundle,
            device=self.device,
            dtype=self.dtype,
            onnx_providers=onnx_providers(self.settings.onnx_providers),
            kl_backend=self.settings.kl_backend,
        )

    def Localize(self, request: localizer_pb2.LocalizeRequest, context) -> localizer_pb2.LocalizeResponse:
        if self.localizer is None:
            raise Unavailable("the models are not loaded yet")
        options = options_from_proto(request.options, self.settings.max_concepts, self.localizer.defaults)
        t0, decode_ns = time.perf_counter(), time.time_ns()
        image = decode_image(request.image, field="image")
        timings = [("decode", time.perf_counter() - t0)]
        timed_span(TRACER, "decode", decode_ns)
        round_starts: list[int] = []  # wall-clock start of each round, for the stage spans

        def check() -> None:
            round_starts.append(time.time_ns())
            ensure_active(context)

        with self._gpu:
            ensure_active(context)  # a call that waited for the model past its deadline is dropped here
            result = self.localizer.localize(image, options, check=check)
        record_localize_stages(TRACER, result.timings, round_starts, time.time_ns())
        timings += result.timings
        ensure_active(context)  # the model is checked between rounds; the response is not encoded for nobody
        t0 = time.perf_counter()
        concepts = [
            common_pb2.Concept(
                concept_id=f"c{i}",
                noun=c.noun,
                mask=encode_mask(c.mask),
                area_fraction=c.area_fraction,
                round=c.round,
                retrieval=[common_pb2.WordWeight(word=w, weight=max(0.0, v)) for w, v in c.retrieval],
            )
            for i, c in enumerate(result.concepts)
        ]
        timings.append(("encode", time.perf_counter() - t0))
        timed_span(TRACER, "encode", time.time_ns() - int(timings[-1][1] * 1e9))
        for stage, seconds in timings:
            STAGE_SECONDS.labels(stage).observe(seconds)
        return localizer_pb2.LocalizeResponse(
            concepts=concepts,
            timings=[common_pb2.StageTiming(stage=s, seconds=t) for s, t in timings],
            rounds=result.rounds,
            remaining_fraction=result.remaining_fraction,
            width=result.width,
            height=result.height,
            stop_reason=_STOP_REASON[result.stop_reason],
            uncovered_fraction=result.uncovered_fraction,
        )

    def GetServerInfo(self, request, context) -> localizer_pb2.GetServerInfoResponse:
        precision = precision_name(self.dtype) if self.dtype is not None else "fp32"
        return localizer_pb2.GetServerInfoResponse(
            info=server_info(SERVICE, self.bundle, self.settings, self.device, precision)
        )


def build_spec(settings: LocalizerSettings) -> ServiceSpec:
    servicer = LocalizerServicer(settings)
    return ServiceSpec(
        name="localizer",
        service_names=[SERVICE],
        register=lambda server: localizer_pb2_grpc.add_LocalizerServiceServicer_to_server(servicer, server),
        load=servicer.load,
        bundle_digest=lambda: servicer.bundle.digest if servicer.bundle else "",
    )
