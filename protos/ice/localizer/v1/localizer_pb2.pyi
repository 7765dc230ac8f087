from ice.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Refinement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFINEMENT_UNSPECIFIED: _ClassVar[Refinement]
    REFINEMENT_NONE: _ClassVar[Refinement]
    REFINEMENT_KMEANS: _ClassVar[Refinement]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_REMAINING_FRACTION: _ClassVar[StopReason]
    STOP_REASON_MAX_ROUNDS: _ClassVar[StopReason]
    STOP_REASON_MAX_CONCEPTS: _ClassVar[StopReason]
    STOP_REASON_NO_PROGRESS: _ClassVar[StopReason]
    STOP_REASON_NO_NEW_NOUN: _ClassVar[StopReason]
    STOP_REASON_NO_CONCEPT: _ClassVar[StopReason]
REFINEMENT_UNSPECIFIED: Refinement
REFINEMENT_NONE: Refinement
REFINEMENT_KMEANS: Refinement
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_REMAINING_FRACTION: StopReason
STOP_REASON_MAX_ROUNDS: StopReason
STOP_REASON_MAX_CONCEPTS: StopReason
STOP_REASON_NO_PROGRESS: StopReason
STOP_REASON_NO_NEW_NOUN: StopReason
STOP_REASON_NO_CONCEPT: StopReason

class LocalizeRequest(_message.Message):
    __slots__ = ("image", "options")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    options: LocalizeOptions
    def __init__(self, image: _Optional[bytes] = ..., options: _Optional[_Union[LocalizeOptions, _Mapping]] = ...) -> None: ...

class LocalizeOptions(_message.Message):
    __slots__ = ("max_concepts", "max_rounds", "remaining_fraction_threshold", "l1_penalty", "min_area_fraction", "merge_threshold", "merge_rounds", "timestep", "seed", "refinement")
    MAX_CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FRACTION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    L1_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_AREA_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MERGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MERGE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REFINEMENT_FIELD_NUMBER: _ClassVar[int]
    max_concepts: int
    max_rounds: int
    remaining_fraction_threshold: float
    l1_penalty: float
    min_area_fraction: float
    merge_threshold: float
    merge_rounds: int
    timestep: int
    seed: int
    refinement: Refinement
    def __init__(self, max_concepts: _Optional[int] = ..., max_rounds: _Optional[int] = ..., remaining_fraction_threshold: _Optional[float] = ..., l1_penalty: _Optional[float] = ..., min_area_fraction: _Optional[float] = ..., merge_threshold: _Optional[float] = ..., merge_rounds: _Optional[int] = ..., timestep: _Optional[int] = ..., seed: _Optional[int] = ..., refinement: _Optional[_Union[Refinement, str]] = ...) -> None: ...

class LocalizeResponse(_message.Message):
    __slots__ = ("concepts", "timings", "rounds", "remaining_fraction", "width", "height", "stop_reason", "uncovered_fraction")
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    UNCOVERED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    concepts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Concept]
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.StageTiming]
    rounds: int
    remaining_fraction: float
    width: int
    height: int
    stop_reason: StopReason
    uncovered_fraction: float
    def __init__(self, concepts: _Optional[_Iterable[_Union[_common_pb2.Concept, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.StageTiming, _Mapping]]] = ..., rounds: _Optional[int] = ..., remaining_fraction: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., uncovered_fraction: _Optional[float] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.ServerInfo
    def __init__(self, info: _Optional[_Union[_common_pb2.ServerInfo, _Mapping]] = ...) -> None: ...
