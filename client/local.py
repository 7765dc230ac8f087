"""The extraction in-process, without servers (`ice extract --local --bundle DIR`, notebooks, one machine).

`LocalIce` is a back-end of `client.pipeline.run_extraction` with the same methods `IceClient` offers it, built
directly on the services' algorithm modules (`services.localizer.pipeline`, `services.learner.trainer`,
`.generate`, `.artifacts`, `services.evaluator.metrics`, `.masks`): one implementation of each step, whether it
runs behind gRPC or here. Models load on first use and stay loaded. Not thread-safe: one item at a time.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from client.errors import IceClientError, JobFailed
from client.options import (
    ExtractOptions,
    GenerateOptions,
    LocalizeOptions,
    few_class_images,
    image_bytes,
    mask_png,
)
from client.types import (
    ArtifactFile,
    Concept,
    ConceptScore,
    EncoderScores,
    EvaluationResult,
    GeneratedImage,
    JobProgress,
    LearnedToken,
    LearningResult,
    LocalizeResult,
    MaskMatch,
    MaskScores,
    SetEvaluationResult,
)

DEFAULT_CLASS_IMAGES = Path(os.environ.get("ICE_CLASS_IMAGES_DIR", Path.home() / ".cache" / "ice" / "class-images"))


def _as_sent(x: float) -> float:
    """`x` as the services send it: protobuf `float` fields are 32-bit, and `--local` reports what they would."""
    import struct

    return struct.unpack("f", struct.pack("f", float(x)))[0]


def _encoder_scores(name: str, s) -> EncoderScores:
    """An SDK EncoderScores from the evaluator module's Scores (as the service encodes them)."""
    return EncoderScores(name.upper(), s.sim_i, s.sim_c, s.acc1, s.acc3,
                         [ConceptScore(c.concept_id, c.sim_i, c.acc1, c.acc3, c.rank) for c in s.concepts],
                         accuracy_scope=s.scope.upper(), concepts_in_scope=s.concepts_in_scope,
                         sim_c_absent_reason=s.sim_c_absent_reason)


class LocalError(IceClientError):
    """A step refused its input (the same checks the services make, e.g. an undecodable image). `code` is the
    gRPC status code's name a service would have answered with (the CLI's exit code follows it)."""

    def __init__(self, message: str, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code


def _domain_errors(fn):
    """Turn the algorithm modules' domain errors (services.common.errors) into SDK errors."""
    from functools import wraps

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from services.common.errors import IceError

        try:
            return fn(*args, **kwargs)
        except IceError as exc:
            raise LocalError(f"{exc.code}: {exc.message}", exc.code) from exc

    return wrapper


class LocalIce:
    def __init__(self, bundle_dir: str | Path, device: str = "auto", work_dir: str | Path | None = None,
                 class_images_dir: str | Path | None = None):
        from services.common.bundle import Bundle
        from services.common.service import resolve_device

        self.bundle = Bundle.open(Path(bundle_dir))
        self.device = resolve_device(device)
        self.work_dir = Path(work_dir) if work_dir else None
        self.class_images_dir = Path(class_images_dir) if class_images_dir else DEFAULT_CLASS_IMAGES
        self._localizer = None
        self._embedder = None
        self._pipes: dict[str, Any] = {}
        self._jobs: dict[str, Path] = {}  # job id -> artifact folder
        self._cancel = threading.Event()

    def _dtype(self):
        from services.common.service import compute_dtype

        return compute_dtype(self.device)

    def _bundle_info(self) -> dict[str, Any]:
        from services.common.service import precision_name

        b = self.bundle
        return {"name": b.name, "version": b.version, "sha256": b.digest, "image_size": b.image_size,
                "precision": precision_name(self._dtype())}

    # --- localize ------------------------------------------------------------------------------------------
    @_domain_errors
    def localize(self, image: bytes, options: LocalizeOptions | None = None) -> LocalizeResult:
        from services.common.images import decode_image, encode_mask
        from services.localizer import pipeline

        image = decode_image(image, "image")  # a bad image is refused before the models load (seconds)
        if self._localizer is None:
            self._localizer = pipeline.Localizer(self.bundle, self.device, self._dtype())
        known = {f.name for f in dataclasses.fields(pipeline.LocalizeOptions)}
        given = {k: v for k, v in (options or LocalizeOptions()).set_fields().items() if k in known}
        r = self._localizer.localize(image, dataclasses.replace(self._localizer.defaults, **given))
        concepts = [Concept(f"c{i}", c.noun, _as_sent(c.area_fraction), c.round,
                            [(w, _as_sent(x)) for w, x in c.retrieval], encode_mask(c.mask))
                    for i, c in enumerate(r.concepts)]
        return LocalizeResult(concepts, r.width, r.height, r.rounds, _as_sent(r.remaining_fraction),
                              r.stop_reason.upper(), list(r.timings), _as_sent(r.uncovered_fraction))

    # --- learn ---------------------------------------------------------------------------------------------
    def _spec(self, image: bytes, concepts: Sequence[Concept], options: ExtractOptions):
        """The job's inputs, decoded and checked by the learner's own request parser (as the service does)."""
        from client.sdk import learning_request
        from services.common.settings import LearnerSettings
        from services.learner.server import parse_request

        request = learning_request(image, concepts, anchors=options.anchors, schedule=options.schedule,
                                   seed=options.seed)
        return parse_request(request, self.bundle, LearnerSettings())

    @_domain_errors
    def learn(self, image: bytes, concepts: Sequence[Concept], options: ExtractOptions,
              progress: Callable[[JobProgress], None], on_job: Callable[[str], None]) -> LearningResult:
        from services.learner import artifacts, trainer
        from services.learner.tokens import by_concept

        job_id = f"local-{uuid.uuid4().hex[:12]}"
        on_job(job_id)
        root = (self.work_dir or Path.cwd() / "ice-local") / "job"
        folder = (self.work_dir or Path.cwd() / "ice-local") / "artifacts"
        spec = self._spec(image, concepts, options)
        if options.few_class_images:  # as the services' client scales them (ClientCore.scaled_schedule)
            schedule = dataclasses.replace(options.schedule,
                                           num_class_images=few_class_images(spec.schedule.total_steps))
            spec = self._spec(image, concepts, dataclasses.replace(options, schedule=schedule))
        total = spec.schedule.total_steps
        self._cancel.clear()
        last = {"step": 0, "losses": {}}

        def report(phase: str) -> None:  # shaped like the learner's progress (100% only once succeeded)
            progress(JobProgress(job_id, "RUNNING", phase.upper(), last["step"], total,
                                 99.0 * last["step"] / max(total, 1), last["losses"], None, 0,
                                 self._cancel.is_set(), False))

        def on_step(info):
            last["step"] = info.step
            last["losses"] = {k: v for k, v in info.losses.items() if k != "step_seconds"}
            report(info.phase)
            if self._cancel.is_set():
                raise trainer.Interrupted()

        def should_stop():  # also while the class images are made (after each denoising step)
            if self._cancel.is_set():
                raise trainer.Interrupted()

        job = trainer.Trainer(self.bundle, spec, root, device=self.device, class_images_dir=self.class_images_dir,
                              on_step=on_step, on_phase=report, should_stop=should_stop)
        try:
            result = job.run(resume=False)
        except trainer.Interrupted:
            raise JobFailed(job_id, "CANCELLED", "CANCELLED", "cancelled") from None
        files = artifacts.write_artifacts(folder, result, spec, self.bundle.digest)
        self._jobs[job_id] = folder
        manifest = artifacts.read_manifest(folder)
        tokens = [LearnedToken(t["token"], t["role"].upper(), t["concept_id"], t["noun"], t.get("attribute", ""))
                  for t in by_concept(manifest["tokens"])]
        learning = LearningResult(job_id, tokens, [ArtifactFile(f.name, f.size_bytes, f.sha256) for f in files],
                                  self._bundle_info())
        progress(JobProgress(job_id, "SUCCEEDED", "FINISHING", total, total, 100.0, {}, None, 0, False, True,
                             result=learning))
        return learning

    def cancel_job(self, job_id: str) -> None:
        self._cancel.set()

    # --- generate ------------------------------------------------------------------------------------------
    @_domain_errors
    def generate_for(self, job_id: str, kind: str, options: GenerateOptions,
                     prompts: Sequence[str] = ()) -> list[GeneratedImage]:
        from services.common.images import encode_png
        from services.learner import artifacts, generate

        folder = self._jobs[job_id]
        if job_id not in self._pipes:
            self._pipes = {job_id: generate.load_pipeline(self.bundle, folder, self.device)}  # one job's weights
        manifest = artifacts.read_manifest(folder)
        concept_ids = [c["concept_id"] for c in manifest["concepts"]]
        if kind == "free":
            chosen = [generate.Prompt(p) for p in prompts]
        elif kind == "intrinsic":
            chosen = generate.intrinsic_prompts(manifest, concept_ids)
        else:
            chosen = generate.object_level_prompts(manifest, concept_ids)
        seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little")
        d = generate.generation_defaults(self.bundle)
        out = []
        for prompt, index, image_seed, image in generate.generate(
                self._pipes[job_id], chosen, options.num_images or d.num_images, seed,
                options.num_inference_steps or d.num_inference_steps,
                d.guidance_scale if options.guidance_scale is None else options.guidance_scale):
            out.append(GeneratedImage(prompt.text, index, prompt.concept_id, prompt.attribute, image_seed,
                                      kind.upper(), encode_png(image)))
        return out

    # --- evaluate ------------------------------------------------------------------------------------------
    def _embedder_for(self):
        if self._embedder is None:
            from services.evaluator.encoders import Embedder, load_encoders

            self._embedder = Embedder(load_encoders(self.bundle, self.device))
        return self._embedder

    @_domain_errors
    def evaluate(self, source_image: bytes, concepts: Sequence[tuple[str, bytes, Sequence[bytes]]],
                 composition_images: Sequence[bytes] = (), encoders: Sequence[str] = (),
                 background_fill: str | None = None, crop: str | None = None) -> EvaluationResult:
        from services.common.images import decode_image, decode_mask
        from services.evaluator import metrics

        source = decode_image(source_image, "source_image")
        embedder = self._embedder_for()
        names = [e.lower() for e in encoders] or [n for n in ("clip", "dino") if n in embedder.encoders]
        item = metrics.ItemInput(
            "", source,
            [metrics.ConceptInput(cid, decode_mask(mask, f"concepts[{i}].mask", source.size),
                                  [decode_image(im, f"concepts[{i}].images") for im in images])
             for i, (cid, mask, images) in enumerate(concepts)],
            [decode_image(im, "composition_images") for im in composition_images])
        protocol = metrics.Protocol(background_fill or "black", crop or "mask_box")
        scores = metrics.evaluate(item, embedder, names, protocol)
        return EvaluationResult([_encoder_scores(n, scores[n]) for n in names])

    @_domain_errors
    def evaluate_set(self, items, encoders: Sequence[str] = (), background_fill: str | None = None,
                     crop: str | None = None) -> SetEvaluationResult:
        """UCE metrics of a whole set, accuracy among all its concepts (as `IceClient.evaluate_set`)."""
        from services.common.errors import InvalidArgument
        from services.common.images import decode_image, decode_mask
        from services.evaluator import metrics

        embedder = self._embedder_for()
        names = [e.lower() for e in encoders] or [n for n in ("clip", "dino") if n in embedder.encoders]
        evaluation = metrics.SetEvaluation(embedder, names, metrics.Protocol(background_fill or "black",
                                                                             crop or "mask_box"))
        for k, (item_id, source_image, concepts, composition) in enumerate(items):
            prefix = f"items[{k}]."
            source = decode_image(image_bytes(source_image), f"{prefix}source_image")
            evaluation.add(metrics.ItemInput(
                item_id or str(k), source,
                [metrics.ConceptInput(cid, decode_mask(mask_png(mask), f"{prefix}concepts[{i}].mask", source.size),
                                      [decode_image(image_bytes(im), f"{prefix}concepts[{i}].images")
                                       for im in images])
                 for i, (cid, mask, images) in enumerate(concepts)],
                [decode_image(image_bytes(im), f"{prefix}composition_images") for im in composition]))
        if evaluation.item_count == 0:
            raise InvalidArgument("the set has no item", field="items")
        results = evaluation.result()
        first = results[names[0]]
        return SetEvaluationResult(
            [_encoder_scores(n, results[n].overall) for n in names], evaluation.item_count,
            evaluation.concept_count,
            [(item_id, [_encoder_scores(n, results[n].items[k][1]) for n in names])
             for k, (item_id, _) in enumerate(first.items)])

    @_domain_errors
    def score_masks(self, predicted: Sequence[bytes], ground_truth: Sequence[bytes]) -> MaskScores:
        from services.common.images import decode_mask
        from services.evaluator import masks

        truth = [decode_mask(m, f"ground_truth[{i}]") for i, m in enumerate(ground_truth)]
        shape = (truth[0].shape[1], truth[0].shape[0])
        pred = [decode_mask(m, f"predicted[{i}]", shape) for i, m in enumerate(predicted)]
        r = masks.score_masks(pred, truth)
        return MaskScores(r.miou, r.mean_recall, r.mean_precision,
                          [MaskMatch(m.predicted_index, m.ground_truth_index, m.iou) for m in r.matches])
