import datetime

from google.longrunning import operations_pb2 as _operations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from ice.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Ablation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ABLATION_UNSPECIFIED: _ClassVar[Ablation]
    ABLATION_NONE: _ClassVar[Ablation]
    ABLATION_MASK_ONLY: _ClassVar[Ablation]
    ABLATION_WITHOUT_STAGE_TWO: _ClassVar[Ablation]
    ABLATION_WITHOUT_TEXT_INIT: _ClassVar[Ablation]

class RefinementDelta(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFINEMENT_DELTA_UNSPECIFIED: _ClassVar[RefinementDelta]
    REFINEMENT_DELTA_FULL: _ClassVar[RefinementDelta]
    REFINEMENT_DELTA_LORA: _ClassVar[RefinementDelta]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_PREPARING: _ClassVar[Phase]
    PHASE_OBJECT_LEVEL: _ClassVar[Phase]
    PHASE_INTRINSIC: _ClassVar[Phase]
    PHASE_REFINEMENT: _ClassVar[Phase]
    PHASE_FINISHING: _ClassVar[Phase]

class TokenRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_ROLE_UNSPECIFIED: _ClassVar[TokenRole]
    TOKEN_ROLE_INSTANCE: _ClassVar[TokenRole]
    TOKEN_ROLE_CONCEPT: _ClassVar[TokenRole]
    TOKEN_ROLE_INTRINSIC: _ClassVar[TokenRole]

class PromptKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROMPT_KIND_UNSPECIFIED: _ClassVar[PromptKind]
    PROMPT_KIND_FREE: _ClassVar[PromptKind]
    PROMPT_KIND_OBJECT_LEVEL: _ClassVar[PromptKind]
    PROMPT_KIND_INTRINSIC: _ClassVar[PromptKind]

class CompositionDelta(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPOSITION_DELTA_UNSPECIFIED: _ClassVar[CompositionDelta]
    COMPOSITION_DELTA_TOKENS_ONLY: _ClassVar[CompositionDelta]
    COMPOSITION_DELTA_ONE_JOB: _ClassVar[CompositionDelta]
    COMPOSITION_DELTA_MERGED_LORA: _ClassVar[CompositionDelta]

class ConceptView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONCEPT_VIEW_UNSPECIFIED: _ClassVar[ConceptView]
    CONCEPT_VIEW_BASIC: _ClassVar[ConceptView]
    CONCEPT_VIEW_FULL: _ClassVar[ConceptView]
ABLATION_UNSPECIFIED: Ablation
ABLATION_NONE: Ablation
ABLATION_MASK_ONLY: Ablation
ABLATION_WITHOUT_STAGE_TWO: Ablation
ABLATION_WITHOUT_TEXT_INIT: Ablation
REFINEMENT_DELTA_UNSPECIFIED: RefinementDelta
REFINEMENT_DELTA_FULL: RefinementDelta
REFINEMENT_DELTA_LORA: RefinementDelta
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
PHASE_UNSPECIFIED: Phase
PHASE_PREPARING: Phase
PHASE_OBJECT_LEVEL: Phase
PHASE_INTRINSIC: Phase
PHASE_REFINEMENT: Phase
PHASE_FINISHING: Phase
TOKEN_ROLE_UNSPECIFIED: TokenRole
TOKEN_ROLE_INSTANCE: TokenRole
TOKEN_ROLE_CONCEPT: TokenRole
TOKEN_ROLE_INTRINSIC: TokenRole
PROMPT_KIND_UNSPECIFIED: PromptKind
PROMPT_KIND_FREE: PromptKind
PROMPT_KIND_OBJECT_LEVEL: PromptKind
PROMPT_KIND_INTRINSIC: PromptKind
COMPOSITION_DELTA_UNSPECIFIED: CompositionDelta
COMPOSITION_DELTA_TOKENS_ONLY: CompositionDelta
COMPOSITION_DELTA_ONE_JOB: CompositionDelta
COMPOSITION_DELTA_MERGED_LORA: CompositionDelta
CONCEPT_VIEW_UNSPECIFIED: ConceptView
CONCEPT_VIEW_BASIC: ConceptView
CONCEPT_VIEW_FULL: ConceptView

class CreateLearningJobRequest(_message.Message):
    __slots__ = ("image", "concepts", "intrinsic_anchors", "schedule", "ablation", "refinement_delta", "lora_rank", "seed", "request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    INTRINSIC_ANCHORS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    ABLATION_FIELD_NUMBER: _ClassVar[int]
    REFINEMENT_DELTA_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    concepts: _containers.RepeatedCompositeFieldContainer[ConceptInput]
    intrinsic_anchors: _containers.RepeatedScalarFieldContainer[str]
    schedule: Schedule
    ablation: Ablation
    refinement_delta: RefinementDelta
    lora_rank: int
    seed: int
    request_id: str
    def __init__(self, image: _Optional[bytes] = ..., concepts: _Optional[_Iterable[_Union[ConceptInput, _Mapping]]] = ..., intrinsic_anchors: _Optional[_Iterable[str]] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., ablation: _Optional[_Union[Ablation, str]] = ..., refinement_delta: _Optional[_Union[RefinementDelta, str]] = ..., lora_rank: _Optional[int] = ..., seed: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ConceptInput(_message.Message):
    __slots__ = ("noun", "mask", "concept_id")
    NOUN_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    noun: str
    mask: bytes
    concept_id: str
    def __init__(self, noun: _Optional[str] = ..., mask: _Optional[bytes] = ..., concept_id: _Optional[str] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("phase1_steps", "phase2_steps", "refinement_steps", "embedding_learning_rate", "unet_learning_rate", "checkpoint_every", "num_class_images", "class_prompt", "prior_loss_weight", "lambda_attention", "noise_offset", "t_dist", "reg_weight", "reg_intrinsic_weight", "pos_neg_margin")
    PHASE1_STEPS_FIELD_NUMBER: _ClassVar[int]
    PHASE2_STEPS_FIELD_NUMBER: _ClassVar[int]
    REFINEMENT_STEPS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    UNET_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    NOISE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    T_DIST_FIELD_NUMBER: _ClassVar[int]
    REG_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REG_INTRINSIC_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    POS_NEG_MARGIN_FIELD_NUMBER: _ClassVar[int]
    phase1_steps: int
    phase2_steps: int
    refinement_steps: int
    embedding_learning_rate: float
    unet_learning_rate: float
    checkpoint_every: int
    num_class_images: int
    class_prompt: str
    prior_loss_weight: float
    lambda_attention: float
    noise_offset: float
    t_dist: float
    reg_weight: float
    reg_intrinsic_weight: float
    pos_neg_margin: float
    def __init__(self, phase1_steps: _Optional[int] = ..., phase2_steps: _Optional[int] = ..., refinement_steps: _Optional[int] = ..., embedding_learning_rate: _Optional[float] = ..., unet_learning_rate: _Optional[float] = ..., checkpoint_every: _Optional[int] = ..., num_class_images: _Optional[int] = ..., class_prompt: _Optional[str] = ..., prior_loss_weight: _Optional[float] = ..., lambda_attention: _Optional[float] = ..., noise_offset: _Optional[float] = ..., t_dist: _Optional[float] = ..., reg_weight: _Optional[float] = ..., reg_intrinsic_weight: _Optional[float] = ..., pos_neg_margin: _Optional[float] = ...) -> None: ...

class LearningJobMetadata(_message.Message):
    __slots__ = ("job_id", "state", "phase", "step", "total_steps", "percent", "losses", "create_time", "start_time", "update_time", "end_time", "eta_seconds", "queue_position", "cancel_requested", "replica_address", "memory_estimate_bytes", "class_image_status")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ESTIMATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGE_STATUS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    phase: Phase
    step: int
    total_steps: int
    percent: float
    losses: _containers.ScalarMap[str, float]
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    eta_seconds: float
    queue_position: int
    cancel_requested: bool
    replica_address: str
    memory_estimate_bytes: int
    class_image_status: ClassImageStatus
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., phase: _Optional[_Union[Phase, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., percent: _Optional[float] = ..., losses: _Optional[_Mapping[str, float]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., eta_seconds: _Optional[float] = ..., queue_position: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., replica_address: _Optional[str] = ..., memory_estimate_bytes: _Optional[int] = ..., class_image_status: _Optional[_Union[ClassImageStatus, _Mapping]] = ...) -> None: ...

class ClassImageStatus(_message.Message):
    __slots__ = ("count", "ready", "to_generate", "source", "inference_steps", "seconds_each")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    TO_GENERATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_EACH_FIELD_NUMBER: _ClassVar[int]
    count: int
    ready: int
    to_generate: int
    source: str
    inference_steps: int
    seconds_each: float
    def __init__(self, count: _Optional[int] = ..., ready: _Optional[int] = ..., to_generate: _Optional[int] = ..., source: _Optional[str] = ..., inference_steps: _Optional[int] = ..., seconds_each: _Optional[float] = ...) -> None: ...

class PlanLearningJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: CreateLearningJobRequest
    def __init__(self, job: _Optional[_Union[CreateLearningJobRequest, _Mapping]] = ...) -> None: ...

class PlanLearningJobResponse(_message.Message):
    __slots__ = ("total_steps", "class_image_status", "class_images_seconds", "training_seconds", "memory_estimate_bytes", "jobs_ahead")
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGE_STATUS_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGES_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ESTIMATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    JOBS_AHEAD_FIELD_NUMBER: _ClassVar[int]
    total_steps: int
    class_image_status: ClassImageStatus
    class_images_seconds: float
    training_seconds: float
    memory_estimate_bytes: int
    jobs_ahead: int
    def __init__(self, total_steps: _Optional[int] = ..., class_image_status: _Optional[_Union[ClassImageStatus, _Mapping]] = ..., class_images_seconds: _Optional[float] = ..., training_seconds: _Optional[float] = ..., memory_estimate_bytes: _Optional[int] = ..., jobs_ahead: _Optional[int] = ...) -> None: ...

class LearningJobResult(_message.Message):
    __slots__ = ("job_id", "tokens", "artifacts", "bundle")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tokens: _containers.RepeatedCompositeFieldContainer[LearnedToken]
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactFile]
    bundle: _common_pb2.BundleInfo
    def __init__(self, job_id: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[LearnedToken, _Mapping]]] = ..., artifacts: _Optional[_Iterable[_Union[ArtifactFile, _Mapping]]] = ..., bundle: _Optional[_Union[_common_pb2.BundleInfo, _Mapping]] = ...) -> None: ...

class LearnedToken(_message.Message):
    __slots__ = ("token", "role", "concept_id", "noun", "attribute")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    NOUN_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    token: str
    role: TokenRole
    concept_id: str
    noun: str
    attribute: str
    def __init__(self, token: _Optional[str] = ..., role: _Optional[_Union[TokenRole, str]] = ..., concept_id: _Optional[str] = ..., noun: _Optional[str] = ..., attribute: _Optional[str] = ...) -> None: ...

class ArtifactFile(_message.Message):
    __slots__ = ("name", "size_bytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class WatchLearningJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchLearningJobResponse(_message.Message):
    __slots__ = ("metadata", "done", "error", "response")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    metadata: LearningJobMetadata
    done: bool
    error: _status_pb2.Status
    response: LearningJobResult
    def __init__(self, metadata: _Optional[_Union[LearningJobMetadata, _Mapping]] = ..., done: _Optional[bool] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., response: _Optional[_Union[LearningJobResult, _Mapping]] = ...) -> None: ...

class GetArtifactsRequest(_message.Message):
    __slots__ = ("name", "files")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    name: str
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ...) -> None: ...

class GetArtifactsResponse(_message.Message):
    __slots__ = ("file_name", "offset", "chunk", "last_chunk", "sha256", "size_bytes")
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    offset: int
    chunk: bytes
    last_chunk: bool
    sha256: str
    size_bytes: int
    def __init__(self, file_name: _Optional[str] = ..., offset: _Optional[int] = ..., chunk: _Optional[bytes] = ..., last_chunk: _Optional[bool] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("name", "kind", "prompts", "concept_ids", "num_images", "seed", "num_inference_steps", "guidance_scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: PromptKind
    prompts: _containers.RepeatedScalarFieldContainer[str]
    concept_ids: _containers.RepeatedScalarFieldContainer[str]
    num_images: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[PromptKind, str]] = ..., prompts: _Optional[_Iterable[str]] = ..., concept_ids: _Optional[_Iterable[str]] = ..., num_images: _Optional[int] = ..., seed: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("prompt", "index", "image", "concept_id", "attribute", "seed")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    index: int
    image: bytes
    concept_id: str
    attribute: str
    seed: int
    def __init__(self, prompt: _Optional[str] = ..., index: _Optional[int] = ..., image: _Optional[bytes] = ..., concept_id: _Optional[str] = ..., attribute: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.ServerInfo
    def __init__(self, info: _Optional[_Union[_common_pb2.ServerInfo, _Mapping]] = ...) -> None: ...

class LibraryConcept(_message.Message):
    __slots__ = ("name", "job_id", "concept_id", "noun", "concept_token", "instance_token", "intrinsic_tokens", "anchors", "source_image_sha256", "bundle_sha256", "schedule", "ablation", "refinement_delta", "lora_rank", "seed", "create_time", "replica_address", "mask", "source_crop")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    NOUN_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INTRINSIC_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ANCHORS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    ABLATION_FIELD_NUMBER: _ClassVar[int]
    REFINEMENT_DELTA_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CROP_FIELD_NUMBER: _ClassVar[int]
    name: str
    job_id: str
    concept_id: str
    noun: str
    concept_token: str
    instance_token: str
    intrinsic_tokens: _containers.RepeatedCompositeFieldContainer[LibraryToken]
    anchors: _containers.RepeatedScalarFieldContainer[str]
    source_image_sha256: str
    bundle_sha256: str
    schedule: Schedule
    ablation: Ablation
    refinement_delta: RefinementDelta
    lora_rank: int
    seed: int
    create_time: _timestamp_pb2.Timestamp
    replica_address: str
    mask: bytes
    source_crop: bytes
    def __init__(self, name: _Optional[str] = ..., job_id: _Optional[str] = ..., concept_id: _Optional[str] = ..., noun: _Optional[str] = ..., concept_token: _Optional[str] = ..., instance_token: _Optional[str] = ..., intrinsic_tokens: _Optional[_Iterable[_Union[LibraryToken, _Mapping]]] = ..., anchors: _Optional[_Iterable[str]] = ..., source_image_sha256: _Optional[str] = ..., bundle_sha256: _Optional[str] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., ablation: _Optional[_Union[Ablation, str]] = ..., refinement_delta: _Optional[_Union[RefinementDelta, str]] = ..., lora_rank: _Optional[int] = ..., seed: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replica_address: _Optional[str] = ..., mask: _Optional[bytes] = ..., source_crop: _Optional[bytes] = ...) -> None: ...

class LibraryToken(_message.Message):
    __slots__ = ("name", "token", "attribute")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    token: str
    attribute: str
    def __init__(self, name: _Optional[str] = ..., token: _Optional[str] = ..., attribute: _Optional[str] = ...) -> None: ...

class ListConceptsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token", "filter", "view")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    filter: str
    view: ConceptView
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ..., view: _Optional[_Union[ConceptView, str]] = ...) -> None: ...

class ListConceptsResponse(_message.Message):
    __slots__ = ("concepts", "next_page_token")
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    concepts: _containers.RepeatedCompositeFieldContainer[LibraryConcept]
    next_page_token: str
    def __init__(self, concepts: _Optional[_Iterable[_Union[LibraryConcept, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetConceptRequest(_message.Message):
    __slots__ = ("name", "view")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    name: str
    view: ConceptView
    def __init__(self, name: _Optional[str] = ..., view: _Optional[_Union[ConceptView, str]] = ...) -> None: ...

class GetConceptResponse(_message.Message):
    __slots__ = ("concept", "token")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    concept: LibraryConcept
    token: LibraryToken
    def __init__(self, concept: _Optional[_Union[LibraryConcept, _Mapping]] = ..., token: _Optional[_Union[LibraryToken, _Mapping]] = ...) -> None: ...

class GenerateCompositionRequest(_message.Message):
    __slots__ = ("prompts", "delta", "delta_job", "num_images", "seed", "num_inference_steps", "guidance_scale")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DELTA_JOB_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    delta: CompositionDelta
    delta_job: str
    num_images: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., delta: _Optional[_Union[CompositionDelta, str]] = ..., delta_job: _Optional[str] = ..., num_images: _Optional[int] = ..., seed: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ...) -> None: ...

class GenerateCompositionResponse(_message.Message):
    __slots__ = ("prompt", "expanded_prompt", "index", "image", "seed", "references")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    EXPANDED_PROMPT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    expanded_prompt: str
    index: int
    image: bytes
    seed: int
    references: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., expanded_prompt: _Optional[str] = ..., index: _Optional[int] = ..., image: _Optional[bytes] = ..., seed: _Optional[int] = ..., references: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportConceptsRequest(_message.Message):
    __slots__ = ("names", "delta", "delta_job", "prompt", "num_inference_steps", "guidance_scale", "seed")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DELTA_JOB_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    delta: CompositionDelta
    delta_job: str
    prompt: str
    num_inference_steps: int
    guidance_scale: float
    seed: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., delta: _Optional[_Union[CompositionDelta, str]] = ..., delta_job: _Optional[str] = ..., prompt: _Optional[str] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ExportConceptsResponse(_message.Message):
    __slots__ = ("file_name", "offset", "chunk", "last_chunk", "sha256", "size_bytes")
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    offset: int
    chunk: bytes
    last_chunk: bool
    sha256: str
    size_bytes: int
    def __init__(self, file_name: _Optional[str] = ..., offset: _Optional[int] = ..., chunk: _Optional[bytes] = ..., last_chunk: _Optional[bool] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...
