"""The evaluator's gRPC servicer: decode and validate requests, call `metrics` / `masks`, encode responses.

Field paths in errors follow the request: `concepts[1].mask`, `concepts[0].images[3]`, `options.encoders`; in
`EvaluateSet` an item's fields are prefixed with its 0-based position among the items, e.g.
`items[4].concepts[0].images[2]`.

A request is refused before it costs anything it does not need: first its shape (options, counts, limits, ids:
nothing is decoded), then its source image and masks, then every generated and composition image is decoded
(and so checked) before any encoder runs. `PendingItem` holds what was decoded: the first images up to
`DECODED_BYTES` of pixels are kept for the encoders, the others are decoded again when their embedding batch
comes, so a request of a thousand images holds no more than that. An `EvaluateSet` item may continue in
`continuation` messages: each is checked as it arrives, and an item is scored only once the next item (checked
the same way) or the end of the stream shows that it is complete, so a set whose next item is refused has spent
no encoder pass on the item before it either.
"""

from __future__ import annotations

import logging

from ice.common.v1 import common_pb2
from ice.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.common.bundle import Bundle
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.images import decode_image, decode_mask
from services.common.server import ServiceSpec
from services.common.service import resolve_device, server_info, server_version
from services.common.settings import EvaluatorSettings
from services.common.tracing import tracer
from services.evaluator.encoders import CLIP, DINO, Embedder, load_encoders
from services.evaluator.masks import score_masks
from services.evaluator.metrics import ConceptInput, ItemInput, Protocol, Scores, SetEvaluation, evaluate

log = logging.getLogger("ice.evaluator")

SERVICE = evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].full_name
TRACER = tracer("evaluator")
MAX_MASKS = 256  # per side of a ScoreMasks request (the proto's limit)
MAX_CONCEPT_ID_CHARS = 64  # as the learner allows
DECODED_BYTES = 256 << 20  # decoded pixels of one request (or set item) kept from the check for the encoders

pb = evaluator_pb2
_FILLS = {
    pb.BACKGROUND_FILL_UNSPECIFIED: "black",
    pb.BACKGROUND_FILL_BLACK: "black",
    pb.BACKGROUND_FILL_WHITE: "white",
    pb.BACKGROUND_FILL_GRAY: "gray",
    pb.BACKGROUND_FILL_MEAN: "mean",
}
_CROPS = {pb.CROP_UNSPECIFIED: "mask_box", pb.CROP_NONE: "none", pb.CROP_MASK_BOX: "mask_box"}
_ENCODERS = {common_pb2.ENCODER_CLIP: CLIP, common_pb2.ENCODER_DINO: DINO}
_ENCODER_ENUMS = {name: value for value, name in _ENCODERS.items()}


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServiceServicer):
    def __init__(self, settings: EvaluatorSettings):
        self.settings = settings
        self.bundle: Bundle | None = None
        self.embedder: Embedder | None = None
        self.device = "cpu"

    def load(self) -> None:
        s = self.settings
        self.device = resolve_device(s.device)
        self.bundle = Bundle.open(s.bundle, verify_hashes=s.verify_bundle_hashes)
        encoders = load_encoders(self.bundle, self.device, s.clip_backend, s.onnx_providers)
        self.embedder = Embedder(encoders, s.batch_size)
        log.info("evaluator: encoders %s on %s, batch %d", sorted(encoders), self.device, s.batch_size)

    # -- requests ---------------------------------------------------------------------------------------------

    def _options(self, options: pb.EvaluateOptions, field: str) -> tuple[Protocol, list[str]]:
        names: list[str] = []
        for value in options.encoders:
            name = _ENCODERS.get(value)
            if name is None:
                raise InvalidArgument(f"unknown or unspecified encoder value {value}", field=f"{field}.encoders")
            if name not in self.embedder.encoders:
                raise InvalidArgument(f"the bundle has no {name} encoder", field=f"{field}.encoders")
            if name in names:
                raise InvalidArgument(f"encoder {name} is listed twice", field=f"{field}.encoders")
            names.append(name)
        if not names:
            names = [n for n in (CLIP, DINO) if n in self.embedder.encoders]
        if options.background_fill not in _FILLS:
            raise InvalidArgument(f"unknown value {options.background_fill}", field=f"{field}.background_fill")
        if options.crop not in _CROPS:
            raise InvalidArgument(f"unknown value {options.crop}", field=f"{field}.crop")
        return Protocol(_FILLS[options.background_fill], _CROPS[options.crop]), names

    def _check_shape(self, concepts, composition: int, prefix: str, complete: bool) -> None:
        """Counts, limits and ids, before anything is decoded. `complete`: the item has all its images (an
        `EvaluateSet` item may still get some in `continuation` messages: only the upper limits hold until then)."""
        s = self.settings
        if complete and not concepts:
            raise InvalidArgument("at least one concept is required", field=f"{prefix}concepts")
        if len(concepts) > s.max_concepts_per_request:
            raise ResourceExhausted(f"{len(concepts)} concepts exceed the limit of {s.max_concepts_per_request}",
                                    field=f"{prefix}concepts")
        total = sum(len(c.images) for c in concepts) + composition
        if total > s.max_images_per_request:
            raise ResourceExhausted(f"{total} images exceed the limit of {s.max_images_per_request} per "
                                    f"{'item' if prefix else 'request'}", field=f"{prefix}concepts")
        seen = set()
        for i, c in enumerate(concepts):
            field = f"{prefix}concepts[{i}]"
            if not c.concept_id:
                raise InvalidArgument("is required", field=f"{field}.concept_id")
            if len(c.concept_id) > MAX_CONCEPT_ID_CHARS:
                raise InvalidArgument(f"is longer than {MAX_CONCEPT_ID_CHARS} characters", field=f"{field}.concept_id")
            if c.concept_id in seen:
                raise InvalidArgument(f"{c.concept_id!r} is not unique", field=f"{field}.concept_id")
            seen.add(c.concept_id)
            if complete and not c.images:
                raise InvalidArgument("at least one generated image is required", field=f"{field}.images")
            if len(c.images) > s.max_images_per_concept:
                raise ResourceExhausted(f"{len(c.images)} images exceed the limit of {s.max_images_per_concept}",
                                        field=f"{field}.images")

    def _pending(self, item_id: str, source_image: bytes, concepts, composition_images, prefix: str = "",
                 complete: bool = True) -> PendingItem:
        """The item checked: its shape, then its source image and masks, then every image it carries."""
        self._check_shape(concepts, len(composition_images), prefix, complete)
        source = decode_image(source_image, field=f"{prefix}source_image")
        item = PendingItem(item_id, prefix, source)
        for i, c in enumerate(concepts):
            field = f"{prefix}concepts[{i}]"
            mask = decode_mask(c.mask, field=f"{field}.mask", expected_size=source.size)
            if not mask.any():
                raise InvalidArgument("has no pixel inside", field=f"{field}.mask")
            item.add_concept(c.concept_id, mask)
        for c in concepts:  # the images last: the largest part to decode
            item.add_images(c.concept_id, c.images)
        item.add_images(None, composition_images)
        return item

    # -- RPCs -------------------------------------------------------------------------------------------------

    def Evaluate(self, request: pb.EvaluateRequest, context) -> pb.EvaluateResponse:
        protocol, names = self._options(request.options, "options")
        item = self._pending("", request.source_image, request.concepts, request.composition_images).complete()
        with TRACER.start_as_current_span("evaluate", attributes={
                "ice.concepts": len(item.concepts), "ice.encoders": list(names)}):
            scores = evaluate(item, self.embedder, names, protocol)
        return pb.EvaluateResponse(scores=[_encoder_scores(n, scores[n]) for n in names])

    def EvaluateSet(self, request_iterator, context) -> pb.EvaluateSetResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "options":
            raise InvalidArgument("the first message of the stream must carry the options", field="options")
        protocol, names = self._options(first.options, "options")
        evaluation = SetEvaluation(self.embedder, names, protocol)
        item_ids: set[str] = set()
        pending: PendingItem | None = None  # an item whose parts may still come
        index, parts = -1, 0

        for message in request_iterator:
            kind = message.WhichOneof("payload")
            if kind == "continuation":
                if pending is None:
                    raise InvalidArgument("a continuation must follow an item", field=f"items[{index + 1}]")
                self._continue(pending, message.continuation, parts)
                parts += 1
                continue
            index += 1
            prefix = f"items[{index}]."
            if kind != "item":
                raise InvalidArgument("only the first message may carry options; later ones carry items",
                                      field=f"items[{index}]")
            if index >= self.settings.max_set_items:
                raise ResourceExhausted(f"more than {self.settings.max_set_items} items in one set", field="items")
            item = message.item
            item_id = item.item_id or str(index)
            if item_id in item_ids:
                raise InvalidArgument(f"{item_id!r} is not unique in the set", field=f"{prefix}item_id")
            item_ids.add(item_id)
            # this item is checked before the one before it is scored: a refused item costs no encoder pass
            checked = self._pending(item_id, item.source_image, item.concepts, item.composition_images, prefix,
                                    complete=False)
            if pending is not None:
                evaluation.add(pending.complete())
            pending, parts = checked, 0
        if pending is not None:
            evaluation.add(pending.complete())
        if evaluation.item_count == 0:
            raise InvalidArgument("the stream carried no item", field="items")
        results = evaluation.result()
        item_scores = [
            pb.ItemScores(item_id=item_id, scores=[_encoder_scores(n, results[n].items[k][1]) for n in names])
            for k, (item_id, _) in enumerate(results[names[0]].items)
        ]
        return pb.EvaluateSetResponse(
            scores=[_encoder_scores(n, results[n].overall) for n in names],
            item_count=evaluation.item_count,
            concept_count=evaluation.concept_count,
            item_scores=item_scores,
        )

    def _continue(self, item: PendingItem, part: pb.EvaluateSetImages, number: int) -> None:
        """Append a `continuation` message to its item, checked as it arrives (the item never grows past its
        limits, and its images are decoded now, before any earlier item is scored)."""
        if part.concept_id and part.concept_id not in item.images:
            raise InvalidArgument(f"the item has no concept {part.concept_id!r}",
                                  field=f"{item.prefix}continuation[{number}].concept_id")
        key = part.concept_id or None
        s = self.settings
        if key is not None and len(item.images[key]) + len(part.images) > s.max_images_per_concept:
            index = list(item.masks).index(key)
            raise ResourceExhausted(f"{len(item.images[key]) + len(part.images)} images exceed the limit of "
                                    f"{s.max_images_per_concept}", field=f"{item.prefix}concepts[{index}].images")
        total = item.image_count + len(part.images)
        if total > s.max_images_per_request:
            raise ResourceExhausted(f"{total} images exceed the limit of {s.max_images_per_request} per item",
                                    field=f"{item.prefix}concepts")
        item.add_images(key, part.images)

    def ScoreMasks(self, request: pb.ScoreMasksRequest, context) -> pb.ScoreMasksResponse:
        if not request.ground_truth:
            raise InvalidArgument("at least one ground-truth mask is required", field="ground_truth")
        for name in ("ground_truth", "predicted"):
            if len(getattr(request, name)) > MAX_MASKS:
                raise ResourceExhausted(f"{len(getattr(request, name))} masks exceed the limit of {MAX_MASKS}",
                                        field=name)
        first = decode_mask(request.ground_truth[0], field="ground_truth[0]")
        size = (first.shape[1], first.shape[0])
        truth = [first] + [decode_mask(m, field=f"ground_truth[{i}]", expected_size=size)
                           for i, m in enumerate(request.ground_truth) if i > 0]
        for i, m in enumerate(truth):
            if not m.any():
                raise InvalidArgument("has no pixel inside (its scores would be undefined)", field=f"ground_truth[{i}]")
        predicted = [decode_mask(m, field=f"predicted[{i}]", expected_size=size) for i, m in enumerate(request.predicted)]
        result = score_masks(predicted, truth, objective="iou")
        return pb.ScoreMasksResponse(
            miou=result.miou,
            recall=result.mean_recall,
            precision=result.mean_precision,
            matches=[pb.MaskMatch(predicted_index=m.predicted_index, ground_truth_index=m.ground_truth_index,
                                  iou=m.iou) for m in result.matches],
        )

    def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(info=server_info(SERVICE, self.bundle, self.settings, self.device, "fp32"))


class PendingItem:
    """A request's item as it is checked: its source and masks decoded, and every image decoded as it is added
    (a corrupt one is refused then, before any encoder runs). The first images, up to `DECODED_BYTES` of pixels,
    are kept for the encoders; the others are decoded again when their batch is embedded."""

    def __init__(self, item_id: str, prefix: str, source):
        self.item_id, self.prefix, self.source = item_id, prefix, source
        self.masks: dict[str, object] = {}
        self.images: dict[str | None, list] = {None: []}  # concept id (None: composition) -> image loaders
        self.kept = 0  # bytes of decoded pixels held

    @property
    def image_count(self) -> int:
        return sum(len(v) for v in self.images.values())

    def add_concept(self, concept_id: str, mask) -> None:
        self.masks[concept_id] = mask
        self.images[concept_id] = []

    def add_images(self, concept_id: str | None, images) -> None:
        loaders = self.images[concept_id]
        for data in images:
            if concept_id is None:
                field = f"{self.prefix}composition_images[{len(loaders)}]"
            else:
                index = list(self.masks).index(concept_id)
                field = f"{self.prefix}concepts[{index}].images[{len(loaders)}]"
            image = decode_image(data, field=field)
            size = image.width * image.height * 3
            if self.kept + size <= DECODED_BYTES:
                self.kept += size
                loaders.append(lambda image=image: image)
            else:
                del image
                loaders.append(lambda data=data, field=field: decode_image(data, field=field))

    def complete(self) -> ItemInput:
        """The item for the metrics, once it has all its parts (at least one image per concept)."""
        for i, concept_id in enumerate(self.masks):
            if not self.images[concept_id]:
                raise InvalidArgument("at least one generated image is required",
                                      field=f"{self.prefix}concepts[{i}].images")
        concepts = [ConceptInput(cid, mask, self.images[cid]) for cid, mask in self.masks.items()]
        return ItemInput(self.item_id, self.source, concepts, self.images[None])


_SCOPES = {"request": pb.ACCURACY_SCOPE_REQUEST, "set": pb.ACCURACY_SCOPE_SET}


def _encoder_scores(name: str, scores: Scores) -> pb.EncoderScores:
    out = pb.EncoderScores(
        encoder=_ENCODER_ENUMS[name],
        sim_i=scores.sim_i,
        acc1=scores.acc1,
        acc3=scores.acc3,
        concepts=[pb.ConceptScore(concept_id=c.concept_id, sim_i=c.sim_i, acc1=c.acc1, acc3=c.acc3, rank=c.rank)
                  for c in scores.concepts],
        accuracy_scope=_SCOPES[scores.scope],
        concepts_in_scope=scores.concepts_in_scope,
        sim_c_absent_reason=scores.sim_c_absent_reason,
    )
    if scores.sim_c is not None:
        out.sim_c = scores.sim_c
    return out


def build_spec(settings: EvaluatorSettings) -> ServiceSpec:
    servicer = EvaluatorServicer(settings)
    return ServiceSpec(
        name="evaluator",
        service_names=[SERVICE],
        register=lambda server: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(servicer, server),
        load=servicer.load,
        version=server_version(),
        bundle_digest=lambda: servicer.bundle.digest if servicer.bundle else "",
    )
