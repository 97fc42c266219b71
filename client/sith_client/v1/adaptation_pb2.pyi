from sith_client.v1 import sith_pb2 as _sith_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vocabulary(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOCABULARY_UNSPECIFIED: _ClassVar[Vocabulary]
    VOCABULARY_TESTBED: _ClassVar[Vocabulary]
VOCABULARY_UNSPECIFIED: Vocabulary
VOCABULARY_TESTBED: Vocabulary

class AnalyzeDeltaRequest(_message.Message):
    __slots__ = ("base", "finetuned", "layers", "directions", "top", "k", "coherence", "vocabulary")
    BASE_FIELD_NUMBER: _ClassVar[int]
    FINETUNED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    COHERENCE_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    base: str
    finetuned: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    directions: int
    top: int
    k: int
    coherence: float
    vocabulary: Vocabulary
    def __init__(self, base: _Optional[str] = ..., finetuned: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., directions: _Optional[int] = ..., top: _Optional[int] = ..., k: _Optional[int] = ..., coherence: _Optional[float] = ..., vocabulary: _Optional[_Union[Vocabulary, str]] = ...) -> None: ...

class MatchHeadsRequest(_message.Message):
    __slots__ = ("model_a", "model_b", "layers_a", "layers_b", "k", "coherence", "vocabulary", "testbed_categories")
    MODEL_A_FIELD_NUMBER: _ClassVar[int]
    MODEL_B_FIELD_NUMBER: _ClassVar[int]
    LAYERS_A_FIELD_NUMBER: _ClassVar[int]
    LAYERS_B_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    COHERENCE_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    TESTBED_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    model_a: str
    model_b: str
    layers_a: _containers.RepeatedScalarFieldContainer[int]
    layers_b: _containers.RepeatedScalarFieldContainer[int]
    k: int
    coherence: float
    vocabulary: Vocabulary
    testbed_categories: bool
    def __init__(self, model_a: _Optional[str] = ..., model_b: _Optional[str] = ..., layers_a: _Optional[_Iterable[int]] = ..., layers_b: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., coherence: _Optional[float] = ..., vocabulary: _Optional[_Union[Vocabulary, str]] = ..., testbed_categories: _Optional[bool] = ...) -> None: ...
