from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODER_UNSPECIFIED: _ClassVar[Encoder]
    ENCODER_CLIP: _ClassVar[Encoder]
    ENCODER_DINO: _ClassVar[Encoder]
ENCODER_UNSPECIFIED: Encoder
ENCODER_CLIP: Encoder
ENCODER_DINO: Encoder

class BundleInfo(_message.Message):
    __slots__ = ("name", "version", "sha256", "image_size", "precision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    sha256: str
    image_size: int
    precision: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., image_size: _Optional[int] = ..., precision: _Optional[str] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("service", "server_version", "bundle", "device", "max_message_bytes", "max_image_pixels")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    service: str
    server_version: str
    bundle: BundleInfo
    device: str
    max_message_bytes: int
    max_image_pixels: int
    def __init__(self, service: _Optional[str] = ..., server_version: _Optional[str] = ..., bundle: _Optional[_Union[BundleInfo, _Mapping]] = ..., device: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ...) -> None: ...

class WordWeight(_message.Message):
    __slots__ = ("word", "weight")
    WORD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    word: str
    weight: float
    def __init__(self, word: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    seconds: float
    def __init__(self, stage: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class Concept(_message.Message):
    __slots__ = ("concept_id", "noun", "mask", "area_fraction", "round", "retrieval")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    NOUN_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    AREA_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    noun: str
    mask: bytes
    area_fraction: float
    round: int
    retrieval: _containers.RepeatedCompositeFieldContainer[WordWeight]
    def __init__(self, concept_id: _Optional[str] = ..., noun: _Optional[str] = ..., mask: _Optional[bytes] = ..., area_fraction: _Optional[float] = ..., round: _Optional[int] = ..., retrieval: _Optional[_Iterable[_Union[WordWeight, _Mapping]]] = ...) -> None: ...
