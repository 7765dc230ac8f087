"""Typed results of the SDK: plain dataclasses, independent of the protobuf messages.

Images and masks stay as encoded PNG bytes (as they travel); `.pil()` / `.array()` decode them when needed.
Everything here converts to JSON with `to_dict()` (bytes left out), which is what `ice --json` prints.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return None
    if isinstance(value, _Jsonable):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Jsonable:
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            if f.metadata.get("json") is False:
                continue
            value = getattr(self, f.name)
            if isinstance(value, bytes):
                continue
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, list | tuple):
                value = [v.to_dict() if hasattr(v, "to_dict") else _plain(v) for v in value]
            else:
                value = _plain(asdict(value) if hasattr(value, "__dataclass_fields__") else value)
            out[f.name] = value
        return out


def _no_json():
    return field(default=b"", repr=False, metadata={"json": False})


def decode_png(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# --- localizer ---------------------------------------------------------------------------------------------
@dataclass
class Concept(_Jsonable):
    concept_id: str
    noun: str
    area_fraction: float
    round: int
    retrieval: list[tuple[str, float]]
    mask_png: bytes = _no_json()

    def mask(self) -> np.ndarray:
        """The mask as a bool array [height, width]."""
        return np.asarray(decode_png(self.mask_png).convert("L")) > 0


@dataclass
class LocalizeResult(_Jsonable):
    concepts: list[Concept]
    width: int
    height: int
    rounds: int
    remaining_fraction: float  # of the pixels no round removed (as a noun or background): what the stop test used
    stop_reason: str  # e.g. "REMAINING_FRACTION"
    timings: list[tuple[str, float]] = field(default_factory=list)
    uncovered_fraction: float = 1.0  # of the image's pixels that no returned concept covers


# --- learner -----------------------------------------------------------------------------------------------
@dataclass
class Job(_Jsonable):
    """A learning job: `name` is its operation name, "operations/{job_id}"; `replica` the address of the learner
    replica that owns it, when the learner advertises one (later calls about the job go there).

    As text a job is its name, or "name@host:port" to carry the replica (what `ice learn start` prints)."""

    name: str
    replica: str = ""

    @property
    def job_id(self) -> str:
        return self.name.split("/", 1)[1] if self.name.startswith("operations/") else self.name

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.replica}" if self.replica else self.name

    @staticmethod
    def of(job: Job | str) -> Job:
        if isinstance(job, Job):
            return job
        name, _, replica = job.partition("@")
        return Job(name if name.startswith("operations/") else f"operations/{name}", replica)


@dataclass
class LearnedToken(_Jsonable):
    token: str
    role: str  # INSTANCE | CONCEPT | INTRINSIC
    concept_id: str
    noun: str
    attribute: str


@dataclass
class ArtifactFile(_Jsonable):
    name: str
    size_bytes: int
    sha256: str


@dataclass
class LearningResult(_Jsonable):
    job_id: str
    tokens: list[LearnedToken]
    artifacts: list[ArtifactFile]
    bundle: dict[str, Any]

    def attributes(self, concept_id: str) -> list[str]:
        return [t.attribute for t in self.tokens if t.concept_id == concept_id and t.role == "INTRINSIC"]


@dataclass
class ClassImages(_Jsonable):
    """A job's class images for prior preservation: it uses `count`; `ready` exist now; it had to generate
    `to_generate` (a plan: has to); `seconds_per_image` as this learner measured it (None: not yet)."""

    count: int
    ready: int
    to_generate: int
    source: str  # bundle | cache | bundle+cache
    inference_steps: int
    seconds_per_image: float | None = None

    @property
    def preparing(self) -> bool:
        """Some are still being made."""
        return self.ready < self.count


@dataclass
class JobPlan(_Jsonable):
    """What a learning job would do on a learner, were it created now (`IceClient.plan_job`)."""

    total_steps: int
    class_images: ClassImages | None
    class_images_seconds: float | None  # to generate the missing ones (None: not measured on this learner yet)
    training_seconds: float | None  # at this learner's step time (None: not timed yet)
    memory_estimate_bytes: int | None
    jobs_ahead: int

    def line(self) -> str:
        """One human line, e.g. "25 class images to generate (of 25 used; about 12 min at 29 s each on this
        learner), then 25 steps (about 6 s)"."""
        c = self.class_images
        if c is None:
            text = "no class images (prior preservation off)"
        elif not c.to_generate:
            text = f"{c.count} class images, all {'in the bundle' if c.source == 'bundle' else 'ready'}"
        else:
            text = f"{c.to_generate} class images to generate ({c.count} used, {c.inference_steps} denoising steps each; "
            if self.class_images_seconds is not None and c.seconds_per_image is not None:
                text += f"about {_duration(self.class_images_seconds)} at {c.seconds_per_image:.1f} s each on this learner)"
            else:
                text += "not timed on this learner yet)"
        text += f", then {self.total_steps} steps"
        if self.training_seconds is not None:
            text += f" (about {_duration(self.training_seconds)})"
        if self.jobs_ahead:
            text += f"; {self.jobs_ahead} job(s) ahead"
        return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class JobProgress(_Jsonable):
    job_id: str
    state: str  # QUEUED | RUNNING | SUCCEEDED | FAILED | CANCELLED
    phase: str  # PREPARING | OBJECT_LEVEL | INTRINSIC | REFINEMENT | FINISHING | UNSPECIFIED
    step: int
    total_steps: int
    percent: float
    losses: dict[str, float]
    eta_seconds: float | None
    queue_position: int
    cancel_requested: bool
    done: bool
    error_code: str | None = None  # set when done and not succeeded
    error_message: str | None = None
    result: LearningResult | None = None
    class_images: ClassImages | None = None

    def line(self) -> str:
        """One human line, e.g. "RUNNING OBJECT_LEVEL 12/30 (40%) loss 0.123 eta 14s", or while it makes its
        class images "RUNNING PREPARING class images 8/25"."""
        if self.state == "QUEUED":
            return f"QUEUED (position {self.queue_position})"
        c = self.class_images
        if self.state == "RUNNING" and self.phase == "PREPARING" and c is not None and c.preparing:
            text = f"{self.state} {self.phase} class images {c.ready}/{c.count}"
        else:
            text = f"{self.state} {self.phase} {self.step}/{self.total_steps} ({self.percent:.0f}%)"
        if "total" in self.losses:
            text += f" loss {self.losses['total']:.4g}"
        if self.eta_seconds is not None:
            text += f" eta {self.eta_seconds:.0f}s"
        if self.error_code:
            text += f" {self.error_code}: {self.error_message}"
        return text


# --- generation --------------------------------------------------------------------------------------------
@dataclass
class GeneratedImage(_Jsonable):
    prompt: str
    index: int
    concept_id: str
    attribute: str  # the intrinsic anchor ("texture", ...); "" for object-level and free prompts
    seed: int
    kind: str  # OBJECT_LEVEL | INTRINSIC | FREE (what the image was asked as)
    image_png: bytes = _no_json()

    def pil(self):
        return decode_png(self.image_png).convert("RGB")


# --- evaluator ---------------------------------------------------------------------------------------------
@dataclass
class ConceptScore(_Jsonable):
    concept_id: str
    sim_i: float
    acc1: float
    acc3: float
    rank: int


@dataclass
class EncoderScores(_Jsonable):
    encoder: str  # CLIP | DINO
    sim_i: float
    sim_c: float | None
    acc1: float
    acc3: float
    concepts: list[ConceptScore]
    # What ACC and ranks were measured among: REQUEST = one image's own concepts (not the paper's protocol:
    # ACC^3 is 1 with at most 3 concepts), SET = every concept of an evaluated set (`evaluate_set`).
    accuracy_scope: str = ""
    concepts_in_scope: int = 0
    sim_c_absent_reason: str = ""  # why sim_c is None

    @property
    def per_request(self) -> bool:
        return self.accuracy_scope == "REQUEST"


@dataclass
class EvaluationResult(_Jsonable):
    scores: list[EncoderScores]

    def by_encoder(self) -> dict[str, EncoderScores]:
        return {s.encoder: s for s in self.scores}


@dataclass
class SetEvaluationResult(_Jsonable):
    """`evaluate_set`: the set's scores per encoder (ACC among all its concepts: the paper's protocol), and each
    item's (its concepts ranked among the whole set's too)."""

    scores: list[EncoderScores]
    item_count: int
    concept_count: int
    items: list[tuple[str, list[EncoderScores]]]

    def by_encoder(self) -> dict[str, EncoderScores]:
        return {s.encoder: s for s in self.scores}


@dataclass
class MaskMatch(_Jsonable):
    predicted_index: int
    ground_truth_index: int
    iou: float


@dataclass
class MaskScores(_Jsonable):
    miou: float
    recall: float
    precision: float
    matches: list[MaskMatch]


# --- the whole extraction ----------------------------------------------------------------------------------
@dataclass
class Extraction(_Jsonable):
    """What `extract` returns: every stage's result, and where it was written (when an `out_dir` was given)."""

    localization: LocalizeResult
    job_id: str | None
    learning: LearningResult | None
    generated: list[GeneratedImage]
    evaluation: EvaluationResult | None
    seconds: dict[str, float]
    out_dir: str | None = None
    image_png: bytes = _no_json()

    def images_for(self, concept_id: str, kind: str, attribute: str = "") -> list[GeneratedImage]:
        return [g for g in self.generated if g.concept_id == concept_id and g.kind == kind and g.attribute == attribute]
