import datetime

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor
BOUNDS_FIELD_NUMBER: _ClassVar[int]
bounds: _descriptor.FieldDescriptor

class Bounds(_message.Message):
    __slots__ = ("min", "max", "min_items", "max_items", "max_length", "default_value")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MIN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    min_items: int
    max_items: int
    max_length: int
    default_value: float
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ..., min_items: _Optional[int] = ..., max_items: _Optional[int] = ..., max_length: _Optional[int] = ..., default_value: _Optional[float] = ...) -> None: ...

class Suggestions(_message.Message):
    __slots__ = ("field", "values")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    field: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, field: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[Tensor.DType]
        FLOAT32: _ClassVar[Tensor.DType]
    DTYPE_UNSPECIFIED: Tensor.DType
    FLOAT32: Tensor.DType
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: Tensor.DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[Tensor.DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("tensor", "encoded")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    encoded: bytes
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., encoded: _Optional[bytes] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "hash")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    name: str
    hash: str
    def __init__(self, name: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...

class Concept(_message.Message):
    __slots__ = ("name", "score")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    name: str
    score: float
    def __init__(self, name: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class VectorRef(_message.Message):
    __slots__ = ("layer", "head", "index")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    index: int
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("name", "metadata", "done", "error", "response")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    metadata: OperationMetadata
    done: bool
    error: _status_pb2.Status
    response: _any_pb2.Any
    def __init__(self, name: _Optional[str] = ..., metadata: _Optional[_Union[OperationMetadata, _Mapping]] = ..., done: _Optional[bool] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., response: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...

class OperationMetadata(_message.Message):
    __slots__ = ("kind", "state", "progress", "message", "create_time", "update_time", "target", "attempts")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[OperationMetadata.State]
        QUEUED: _ClassVar[OperationMetadata.State]
        RUNNING: _ClassVar[OperationMetadata.State]
        SUCCEEDED: _ClassVar[OperationMetadata.State]
        FAILED: _ClassVar[OperationMetadata.State]
        CANCELLED: _ClassVar[OperationMetadata.State]
    STATE_UNSPECIFIED: OperationMetadata.State
    QUEUED: OperationMetadata.State
    RUNNING: OperationMetadata.State
    SUCCEEDED: OperationMetadata.State
    FAILED: OperationMetadata.State
    CANCELLED: OperationMetadata.State
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    state: OperationMetadata.State
    progress: float
    message: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    target: str
    attempts: int
    def __init__(self, kind: _Optional[str] = ..., state: _Optional[_Union[OperationMetadata.State, str]] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., target: _Optional[str] = ..., attempts: _Optional[int] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "hash", "layers", "heads", "width", "head_dim", "output_dim", "image_size", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    hash: str
    layers: int
    heads: int
    width: int
    head_dim: int
    output_dim: int
    image_size: int
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., hash: _Optional[str] = ..., layers: _Optional[int] = ..., heads: _Optional[int] = ..., width: _Optional[int] = ..., head_dim: _Optional[int] = ..., output_dim: _Optional[int] = ..., image_size: _Optional[int] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DecomposeRequest(_message.Message):
    __slots__ = ("model", "layers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ...) -> None: ...

class ExplainHeadsRequest(_message.Message):
    __slots__ = ("model", "layers", "heads", "method", "k", "coherence")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    COHERENCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    heads: _containers.RepeatedScalarFieldContainer[int]
    method: str
    k: int
    coherence: float
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., heads: _Optional[_Iterable[int]] = ..., method: _Optional[str] = ..., k: _Optional[int] = ..., coherence: _Optional[float] = ...) -> None: ...

class FindConceptRequest(_message.Message):
    __slots__ = ("model", "concepts", "layers", "top")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    model: str
    concepts: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedScalarFieldContainer[int]
    top: int
    def __init__(self, model: _Optional[str] = ..., concepts: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[int]] = ..., top: _Optional[int] = ...) -> None: ...

class LayerSpectrum(_message.Message):
    __slots__ = ("layer", "heads", "rank", "singular_values")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SINGULAR_VALUES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    heads: int
    rank: int
    singular_values: Tensor
    def __init__(self, layer: _Optional[int] = ..., heads: _Optional[int] = ..., rank: _Optional[int] = ..., singular_values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DecomposeResponse(_message.Message):
    __slots__ = ("model", "convention", "layers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONVENTION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSummary
    convention: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerSpectrum]
    def __init__(self, model: _Optional[_Union[ModelSummary, _Mapping]] = ..., convention: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerSpectrum, _Mapping]]] = ...) -> None: ...

class VectorExplanation(_message.Message):
    __slots__ = ("layer", "head", "index", "sigma", "concepts", "fidelity", "confidence")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    index: int
    sigma: float
    concepts: _containers.RepeatedCompositeFieldContainer[Concept]
    fidelity: float
    confidence: float
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., index: _Optional[int] = ..., sigma: _Optional[float] = ..., concepts: _Optional[_Iterable[_Union[Concept, _Mapping]]] = ..., fidelity: _Optional[float] = ..., confidence: _Optional[float] = ...) -> None: ...

class HeadExplanation(_message.Message):
    __slots__ = ("layer", "head", "vectors", "theme")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    THEME_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    vectors: _containers.RepeatedCompositeFieldContainer[VectorExplanation]
    theme: _containers.RepeatedCompositeFieldContainer[Concept]
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., vectors: _Optional[_Iterable[_Union[VectorExplanation, _Mapping]]] = ..., theme: _Optional[_Iterable[_Union[Concept, _Mapping]]] = ...) -> None: ...

class ExplainHeadsResponse(_message.Message):
    __slots__ = ("model", "heads")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSummary
    heads: _containers.RepeatedCompositeFieldContainer[HeadExplanation]
    def __init__(self, model: _Optional[_Union[ModelSummary, _Mapping]] = ..., heads: _Optional[_Iterable[_Union[HeadExplanation, _Mapping]]] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("layer", "head", "index", "score", "sigma", "concepts", "matched", "coefficient", "cosine")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    index: int
    score: float
    sigma: float
    concepts: _containers.RepeatedCompositeFieldContainer[Concept]
    matched: str
    coefficient: float
    cosine: float
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., index: _Optional[int] = ..., score: _Optional[float] = ..., sigma: _Optional[float] = ..., concepts: _Optional[_Iterable[_Union[Concept, _Mapping]]] = ..., matched: _Optional[str] = ..., coefficient: _Optional[float] = ..., cosine: _Optional[float] = ...) -> None: ...

class FindConceptResponse(_message.Message):
    __slots__ = ("model", "hits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSummary
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    def __init__(self, model: _Optional[_Union[ModelSummary, _Mapping]] = ..., hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ...) -> None: ...

class EditSpec(_message.Message):
    __slots__ = ("model", "operations", "version", "conflicts")
    class Conflicts(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CONFLICTS_UNSPECIFIED: _ClassVar[EditSpec.Conflicts]
        REJECT: _ClassVar[EditSpec.Conflicts]
        LAST_WINS: _ClassVar[EditSpec.Conflicts]
    CONFLICTS_UNSPECIFIED: EditSpec.Conflicts
    REJECT: EditSpec.Conflicts
    LAST_WINS: EditSpec.Conflicts
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    operations: _containers.RepeatedCompositeFieldContainer[EditOperation]
    version: int
    conflicts: EditSpec.Conflicts
    def __init__(self, model: _Optional[str] = ..., operations: _Optional[_Iterable[_Union[EditOperation, _Mapping]]] = ..., version: _Optional[int] = ..., conflicts: _Optional[_Union[EditSpec.Conflicts, str]] = ...) -> None: ...

class EditOperation(_message.Message):
    __slots__ = ("concepts", "action", "strength", "layers", "select", "operator", "target", "preserve", "preserve_neighbours", "anchor")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[EditOperation.Action]
        SUPPRESS: _ClassVar[EditOperation.Action]
        AMPLIFY: _ClassVar[EditOperation.Action]
        FLIP: _ClassVar[EditOperation.Action]
        SCALE: _ClassVar[EditOperation.Action]
        DEBIAS: _ClassVar[EditOperation.Action]
    ACTION_UNSPECIFIED: EditOperation.Action
    SUPPRESS: EditOperation.Action
    AMPLIFY: EditOperation.Action
    FLIP: EditOperation.Action
    SCALE: EditOperation.Action
    DEBIAS: EditOperation.Action
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PRESERVE_FIELD_NUMBER: _ClassVar[int]
    PRESERVE_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    concepts: _containers.RepeatedScalarFieldContainer[str]
    action: EditOperation.Action
    strength: float
    layers: _containers.RepeatedScalarFieldContainer[int]
    select: Selection
    operator: str
    target: float
    preserve: _containers.RepeatedScalarFieldContainer[str]
    preserve_neighbours: bool
    anchor: str
    def __init__(self, concepts: _Optional[_Iterable[str]] = ..., action: _Optional[_Union[EditOperation.Action, str]] = ..., strength: _Optional[float] = ..., layers: _Optional[_Iterable[int]] = ..., select: _Optional[_Union[Selection, _Mapping]] = ..., operator: _Optional[str] = ..., target: _Optional[float] = ..., preserve: _Optional[_Iterable[str]] = ..., preserve_neighbours: _Optional[bool] = ..., anchor: _Optional[str] = ...) -> None: ...

class Selection(_message.Message):
    __slots__ = ("rule", "n", "threshold", "vectors")
    class Rule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RULE_UNSPECIFIED: _ClassVar[Selection.Rule]
        TOP_N: _ClassVar[Selection.Rule]
        THRESHOLD: _ClassVar[Selection.Rule]
        EXPLICIT: _ClassVar[Selection.Rule]
        AUTO: _ClassVar[Selection.Rule]
    RULE_UNSPECIFIED: Selection.Rule
    TOP_N: Selection.Rule
    THRESHOLD: Selection.Rule
    EXPLICIT: Selection.Rule
    AUTO: Selection.Rule
    RULE_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    rule: Selection.Rule
    n: int
    threshold: float
    vectors: _containers.RepeatedCompositeFieldContainer[VectorRef]
    def __init__(self, rule: _Optional[_Union[Selection.Rule, str]] = ..., n: _Optional[int] = ..., threshold: _Optional[float] = ..., vectors: _Optional[_Iterable[_Union[VectorRef, _Mapping]]] = ...) -> None: ...

class AffectedVector(_message.Message):
    __slots__ = ("layer", "head", "index", "sigma", "alpha", "relevance", "operation", "concepts", "operator")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    index: int
    sigma: float
    alpha: float
    relevance: float
    operation: int
    concepts: _containers.RepeatedCompositeFieldContainer[Concept]
    operator: str
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., index: _Optional[int] = ..., sigma: _Optional[float] = ..., alpha: _Optional[float] = ..., relevance: _Optional[float] = ..., operation: _Optional[int] = ..., concepts: _Optional[_Iterable[_Union[Concept, _Mapping]]] = ..., operator: _Optional[str] = ...) -> None: ...

class HeadChange(_message.Message):
    __slots__ = ("layer", "head", "vectors", "energy_before", "energy_after", "energy_ratio")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_AFTER_FIELD_NUMBER: _ClassVar[int]
    ENERGY_RATIO_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    vectors: int
    energy_before: float
    energy_after: float
    energy_ratio: float
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., vectors: _Optional[int] = ..., energy_before: _Optional[float] = ..., energy_after: _Optional[float] = ..., energy_ratio: _Optional[float] = ...) -> None: ...

class ConceptAlignment(_message.Message):
    __slots__ = ("concept", "operation", "layer", "head", "before", "after")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    concept: str
    operation: int
    layer: int
    head: int
    before: float
    after: float
    def __init__(self, concept: _Optional[str] = ..., operation: _Optional[int] = ..., layer: _Optional[int] = ..., head: _Optional[int] = ..., before: _Optional[float] = ..., after: _Optional[float] = ...) -> None: ...

class ConceptEffect(_message.Message):
    __slots__ = ("concept", "role", "before", "after")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    concept: str
    role: str
    before: float
    after: float
    def __init__(self, concept: _Optional[str] = ..., role: _Optional[str] = ..., before: _Optional[float] = ..., after: _Optional[float] = ...) -> None: ...

class EditPlan(_message.Message):
    __slots__ = ("spec", "model", "judge", "affected", "heads", "concept_alignment", "predicted", "warnings", "notes", "planned")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    AFFECTED_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    PLANNED_FIELD_NUMBER: _ClassVar[int]
    spec: EditSpec
    model: ModelSummary
    judge: str
    affected: _containers.RepeatedCompositeFieldContainer[AffectedVector]
    heads: _containers.RepeatedCompositeFieldContainer[HeadChange]
    concept_alignment: _containers.RepeatedCompositeFieldContainer[ConceptAlignment]
    predicted: _containers.RepeatedCompositeFieldContainer[ConceptEffect]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    notes: _containers.RepeatedScalarFieldContainer[str]
    planned: EditSpec
    def __init__(self, spec: _Optional[_Union[EditSpec, _Mapping]] = ..., model: _Optional[_Union[ModelSummary, _Mapping]] = ..., judge: _Optional[str] = ..., affected: _Optional[_Iterable[_Union[AffectedVector, _Mapping]]] = ..., heads: _Optional[_Iterable[_Union[HeadChange, _Mapping]]] = ..., concept_alignment: _Optional[_Iterable[_Union[ConceptAlignment, _Mapping]]] = ..., predicted: _Optional[_Iterable[_Union[ConceptEffect, _Mapping]]] = ..., warnings: _Optional[_Iterable[str]] = ..., notes: _Optional[_Iterable[str]] = ..., planned: _Optional[_Union[EditSpec, _Mapping]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("filename", "size_bytes", "sha256")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    filename: str
    size_bytes: int
    sha256: str
    def __init__(self, filename: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Edit(_message.Message):
    __slots__ = ("name", "spec", "state", "operation", "base_model_hash", "create_time", "update_time", "plan", "plan_omitted", "artifact", "error", "request_id")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Edit.State]
        PENDING: _ClassVar[Edit.State]
        READY: _ClassVar[Edit.State]
        FAILED: _ClassVar[Edit.State]
    STATE_UNSPECIFIED: Edit.State
    PENDING: Edit.State
    READY: Edit.State
    FAILED: Edit.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PLAN_OMITTED_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: EditSpec
    state: Edit.State
    operation: str
    base_model_hash: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    plan: EditPlan
    plan_omitted: bool
    artifact: Artifact
    error: _status_pb2.Status
    request_id: str
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[EditSpec, _Mapping]] = ..., state: _Optional[_Union[Edit.State, str]] = ..., operation: _Optional[str] = ..., base_model_hash: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., plan: _Optional[_Union[EditPlan, _Mapping]] = ..., plan_omitted: _Optional[bool] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class PreviewEditRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: EditSpec
    def __init__(self, spec: _Optional[_Union[EditSpec, _Mapping]] = ...) -> None: ...

class CreateEditRequest(_message.Message):
    __slots__ = ("spec", "request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: EditSpec
    request_id: str
    def __init__(self, spec: _Optional[_Union[EditSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetEditRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListEditsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEditsResponse(_message.Message):
    __slots__ = ("edits", "next_page_token")
    EDITS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    edits: _containers.RepeatedCompositeFieldContainer[Edit]
    next_page_token: str
    def __init__(self, edits: _Optional[_Iterable[_Union[Edit, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteEditRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteEditResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DownloadEditRequest(_message.Message):
    __slots__ = ("name", "offset", "chunk_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    chunk_bytes: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class GetDownloadUrlRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DownloadUrl(_message.Message):
    __slots__ = ("url", "expire_time", "artifact")
    URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    url: str
    expire_time: _timestamp_pb2.Timestamp
    artifact: Artifact
    def __init__(self, url: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("data", "offset", "total_bytes", "sha256", "filename")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_bytes: int
    sha256: str
    filename: str
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., filename: _Optional[str] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("model", "edit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EDIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    edit: str
    def __init__(self, model: _Optional[str] = ..., edit: _Optional[str] = ...) -> None: ...

class EmbedImagesRequest(_message.Message):
    __slots__ = ("target", "images", "normalize")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    target: ModelRef
    images: _containers.RepeatedCompositeFieldContainer[Image]
    normalize: bool
    def __init__(self, target: _Optional[_Union[ModelRef, _Mapping]] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., normalize: _Optional[bool] = ...) -> None: ...

class EmbedTextsRequest(_message.Message):
    __slots__ = ("target", "texts", "normalize")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    target: ModelRef
    texts: _containers.RepeatedScalarFieldContainer[str]
    normalize: bool
    def __init__(self, target: _Optional[_Union[ModelRef, _Mapping]] = ..., texts: _Optional[_Iterable[str]] = ..., normalize: _Optional[bool] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model_hash")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    model_hash: str
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., model_hash: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("target", "images", "labels", "template")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    target: ModelRef
    images: _containers.RepeatedCompositeFieldContainer[Image]
    labels: _containers.RepeatedScalarFieldContainer[str]
    template: str
    def __init__(self, target: _Optional[_Union[ModelRef, _Mapping]] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., template: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("probabilities", "predicted")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    probabilities: Tensor
    predicted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., predicted: _Optional[_Iterable[str]] = ...) -> None: ...

class GetOperationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CancelOperationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchOperationRequest(_message.Message):
    __slots__ = ("name", "detach")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DETACH_FIELD_NUMBER: _ClassVar[int]
    name: str
    detach: bool
    def __init__(self, name: _Optional[str] = ..., detach: _Optional[bool] = ...) -> None: ...
