from ice.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BackgroundFill(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKGROUND_FILL_UNSPECIFIED: _ClassVar[BackgroundFill]
    BACKGROUND_FILL_BLACK: _ClassVar[BackgroundFill]
    BACKGROUND_FILL_WHITE: _ClassVar[BackgroundFill]
    BACKGROUND_FILL_GRAY: _ClassVar[BackgroundFill]
    BACKGROUND_FILL_MEAN: _ClassVar[BackgroundFill]

class Crop(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CROP_UNSPECIFIED: _ClassVar[Crop]
    CROP_NONE: _ClassVar[Crop]
    CROP_MASK_BOX: _ClassVar[Crop]

class AccuracyScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCURACY_SCOPE_UNSPECIFIED: _ClassVar[AccuracyScope]
    ACCURACY_SCOPE_REQUEST: _ClassVar[AccuracyScope]
    ACCURACY_SCOPE_SET: _ClassVar[AccuracyScope]
BACKGROUND_FILL_UNSPECIFIED: BackgroundFill
BACKGROUND_FILL_BLACK: BackgroundFill
BACKGROUND_FILL_WHITE: BackgroundFill
BACKGROUND_FILL_GRAY: BackgroundFill
BACKGROUND_FILL_MEAN: BackgroundFill
CROP_UNSPECIFIED: Crop
CROP_NONE: Crop
CROP_MASK_BOX: Crop
ACCURACY_SCOPE_UNSPECIFIED: AccuracyScope
ACCURACY_SCOPE_REQUEST: AccuracyScope
ACCURACY_SCOPE_SET: AccuracyScope

class EvaluateRequest(_message.Message):
    __slots__ = ("source_image", "concepts", "composition_images", "options")
    SOURCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    COMPOSITION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    source_image: bytes
    concepts: _containers.RepeatedCompositeFieldContainer[ConceptSamples]
    composition_images: _containers.RepeatedScalarFieldContainer[bytes]
    options: EvaluateOptions
    def __init__(self, source_image: _Optional[bytes] = ..., concepts: _Optional[_Iterable[_Union[ConceptSamples, _Mapping]]] = ..., composition_images: _Optional[_Iterable[bytes]] = ..., options: _Optional[_Union[EvaluateOptions, _Mapping]] = ...) -> None: ...

class ConceptSamples(_message.Message):
    __slots__ = ("concept_id", "mask", "images")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    mask: bytes
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, concept_id: _Optional[str] = ..., mask: _Optional[bytes] = ..., images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EvaluateOptions(_message.Message):
    __slots__ = ("encoders", "background_fill", "crop")
    ENCODERS_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FILL_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    encoders: _containers.RepeatedScalarFieldContainer[_common_pb2.Encoder]
    background_fill: BackgroundFill
    crop: Crop
    def __init__(self, encoders: _Optional[_Iterable[_Union[_common_pb2.Encoder, str]]] = ..., background_fill: _Optional[_Union[BackgroundFill, str]] = ..., crop: _Optional[_Union[Crop, str]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[EncoderScores]
    def __init__(self, scores: _Optional[_Iterable[_Union[EncoderScores, _Mapping]]] = ...) -> None: ...

class EncoderScores(_message.Message):
    __slots__ = ("encoder", "sim_i", "sim_c", "acc1", "acc3", "concepts", "accuracy_scope", "concepts_in_scope", "sim_c_absent_reason")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    SIM_I_FIELD_NUMBER: _ClassVar[int]
    SIM_C_FIELD_NUMBER: _ClassVar[int]
    ACC1_FIELD_NUMBER: _ClassVar[int]
    ACC3_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_SCOPE_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_IN_SCOPE_FIELD_NUMBER: _ClassVar[int]
    SIM_C_ABSENT_REASON_FIELD_NUMBER: _ClassVar[int]
    encoder: _common_pb2.Encoder
    sim_i: float
    sim_c: float
    acc1: float
    acc3: float
    concepts: _containers.RepeatedCompositeFieldContainer[ConceptScore]
    accuracy_scope: AccuracyScope
    concepts_in_scope: int
    sim_c_absent_reason: str
    def __init__(self, encoder: _Optional[_Union[_common_pb2.Encoder, str]] = ..., sim_i: _Optional[float] = ..., sim_c: _Optional[float] = ..., acc1: _Optional[float] = ..., acc3: _Optional[float] = ..., concepts: _Optional[_Iterable[_Union[ConceptScore, _Mapping]]] = ..., accuracy_scope: _Optional[_Union[AccuracyScope, str]] = ..., concepts_in_scope: _Optional[int] = ..., sim_c_absent_reason: _Optional[str] = ...) -> None: ...

class ConceptScore(_message.Message):
    __slots__ = ("concept_id", "sim_i", "acc1", "acc3", "rank")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    SIM_I_FIELD_NUMBER: _ClassVar[int]
    ACC1_FIELD_NUMBER: _ClassVar[int]
    ACC3_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    sim_i: float
    acc1: float
    acc3: float
    rank: int
    def __init__(self, concept_id: _Optional[str] = ..., sim_i: _Optional[float] = ..., acc1: _Optional[float] = ..., acc3: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class EvaluateSetRequest(_message.Message):
    __slots__ = ("options", "item", "continuation")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    options: EvaluateOptions
    item: EvaluateSetItem
    continuation: EvaluateSetImages
    def __init__(self, options: _Optional[_Union[EvaluateOptions, _Mapping]] = ..., item: _Optional[_Union[EvaluateSetItem, _Mapping]] = ..., continuation: _Optional[_Union[EvaluateSetImages, _Mapping]] = ...) -> None: ...

class EvaluateSetImages(_message.Message):
    __slots__ = ("concept_id", "images")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, concept_id: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EvaluateSetItem(_message.Message):
    __slots__ = ("item_id", "source_image", "concepts", "composition_images")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    COMPOSITION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    source_image: bytes
    concepts: _containers.RepeatedCompositeFieldContainer[ConceptSamples]
    composition_images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, item_id: _Optional[str] = ..., source_image: _Optional[bytes] = ..., concepts: _Optional[_Iterable[_Union[ConceptSamples, _Mapping]]] = ..., composition_images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EvaluateSetResponse(_message.Message):
    __slots__ = ("scores", "item_count", "concept_count", "item_scores")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    ITEM_SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[EncoderScores]
    item_count: int
    concept_count: int
    item_scores: _containers.RepeatedCompositeFieldContainer[ItemScores]
    def __init__(self, scores: _Optional[_Iterable[_Union[EncoderScores, _Mapping]]] = ..., item_count: _Optional[int] = ..., concept_count: _Optional[int] = ..., item_scores: _Optional[_Iterable[_Union[ItemScores, _Mapping]]] = ...) -> None: ...

class ItemScores(_message.Message):
    __slots__ = ("item_id", "scores")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    scores: _containers.RepeatedCompositeFieldContainer[EncoderScores]
    def __init__(self, item_id: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[EncoderScores, _Mapping]]] = ...) -> None: ...

class ScoreMasksRequest(_message.Message):
    __slots__ = ("predicted", "ground_truth")
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    predicted: _containers.RepeatedScalarFieldContainer[bytes]
    ground_truth: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, predicted: _Optional[_Iterable[bytes]] = ..., ground_truth: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ScoreMasksResponse(_message.Message):
    __slots__ = ("miou", "recall", "precision", "matches")
    MIOU_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    miou: float
    recall: float
    precision: float
    matches: _containers.RepeatedCompositeFieldContainer[MaskMatch]
    def __init__(self, miou: _Optional[float] = ..., recall: _Optional[float] = ..., precision: _Optional[float] = ..., matches: _Optional[_Iterable[_Union[MaskMatch, _Mapping]]] = ...) -> None: ...

class MaskMatch(_message.Message):
    __slots__ = ("predicted_index", "ground_truth_index", "iou")
    PREDICTED_INDEX_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_INDEX_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    predicted_index: int
    ground_truth_index: int
    iou: float
    def __init__(self, predicted_index: _Optional[int] = ..., ground_truth_index: _Optional[int] = ..., iou: _Optional[float] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.ServerInfo
    def __init__(self, info: _Optional[_Union[_common_pb2.ServerInfo, _Mapping]] = ...) -> None: ...
