from sith_api.v1 import sith_pb2 as _sith_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vocabulary(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOCABULARY_UNSPECIFIED: _ClassVar[Vocabulary]
    VOCABULARY_TESTBED: _ClassVar[Vocabulary]

class HeadProfile(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEAD_PROFILE_UNSPECIFIED: _ClassVar[HeadProfile]
    HEAD_PROFILE_COMP: _ClassVar[HeadProfile]
    HEAD_PROFILE_CAPACITY: _ClassVar[HeadProfile]
    HEAD_PROFILE_RELATIVE_CAPACITY: _ClassVar[HeadProfile]
VOCABULARY_UNSPECIFIED: Vocabulary
VOCABULARY_TESTBED: Vocabulary
HEAD_PROFILE_UNSPECIFIED: HeadProfile
HEAD_PROFILE_COMP: HeadProfile
HEAD_PROFILE_CAPACITY: HeadProfile
HEAD_PROFILE_RELATIVE_CAPACITY: HeadProfile

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
    __slots__ = ("model_a", "model_b", "layers_a", "layers_b", "k", "coherence", "vocabulary", "testbed_categories", "profile")
    MODEL_A_FIELD_NUMBER: _ClassVar[int]
    MODEL_B_FIELD_NUMBER: _ClassVar[int]
    LAYERS_A_FIELD_NUMBER: _ClassVar[int]
    LAYERS_B_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    COHERENCE_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    TESTBED_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    model_a: str
    model_b: str
    layers_a: _containers.RepeatedScalarFieldContainer[int]
    layers_b: _containers.RepeatedScalarFieldContainer[int]
    k: int
    coherence: float
    vocabulary: Vocabulary
    testbed_categories: bool
    profile: HeadProfile
    def __init__(self, model_a: _Optional[str] = ..., model_b: _Optional[str] = ..., layers_a: _Optional[_Iterable[int]] = ..., layers_b: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., coherence: _Optional[float] = ..., vocabulary: _Optional[_Union[Vocabulary, str]] = ..., testbed_categories: _Optional[bool] = ..., profile: _Optional[_Union[HeadProfile, str]] = ...) -> None: ...

class DeltaDirection(_message.Message):
    __slots__ = ("index", "sigma", "positive", "negative")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    index: int
    sigma: float
    positive: _containers.RepeatedCompositeFieldContainer[_sith_pb2.Concept]
    negative: _containers.RepeatedCompositeFieldContainer[_sith_pb2.Concept]
    def __init__(self, index: _Optional[int] = ..., sigma: _Optional[float] = ..., positive: _Optional[_Iterable[_Union[_sith_pb2.Concept, _Mapping]]] = ..., negative: _Optional[_Iterable[_Union[_sith_pb2.Concept, _Mapping]]] = ...) -> None: ...

class HeadDelta(_message.Message):
    __slots__ = ("layer", "head", "norm", "relative", "effective_rank", "directions")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_RANK_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    norm: float
    relative: float
    effective_rank: float
    directions: _containers.RepeatedCompositeFieldContainer[DeltaDirection]
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., norm: _Optional[float] = ..., relative: _Optional[float] = ..., effective_rank: _Optional[float] = ..., directions: _Optional[_Iterable[_Union[DeltaDirection, _Mapping]]] = ...) -> None: ...

class HeadStability(_message.Message):
    __slots__ = ("layer", "head", "relative", "norm", "effective_rank", "right_subspace_cos", "left_subspace_cos", "weighted_matched_cos", "diagonal_dominance", "captured", "sigma_ratio")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_RANK_FIELD_NUMBER: _ClassVar[int]
    RIGHT_SUBSPACE_COS_FIELD_NUMBER: _ClassVar[int]
    LEFT_SUBSPACE_COS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_MATCHED_COS_FIELD_NUMBER: _ClassVar[int]
    DIAGONAL_DOMINANCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    SIGMA_RATIO_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    relative: float
    norm: float
    effective_rank: float
    right_subspace_cos: float
    left_subspace_cos: float
    weighted_matched_cos: float
    diagonal_dominance: float
    captured: float
    sigma_ratio: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ..., relative: _Optional[float] = ..., norm: _Optional[float] = ..., effective_rank: _Optional[float] = ..., right_subspace_cos: _Optional[float] = ..., left_subspace_cos: _Optional[float] = ..., weighted_matched_cos: _Optional[float] = ..., diagonal_dominance: _Optional[float] = ..., captured: _Optional[float] = ..., sigma_ratio: _Optional[_Iterable[float]] = ...) -> None: ...

class LayerDelta(_message.Message):
    __slots__ = ("layer", "mean_relative", "max_relative", "top_head", "delta_norm", "right_subspace_cos", "left_subspace_cos", "matched_cos", "weighted_matched_cos", "sigma_ratio_median", "diagonal_dominance", "captured")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MEAN_RELATIVE_FIELD_NUMBER: _ClassVar[int]
    MAX_RELATIVE_FIELD_NUMBER: _ClassVar[int]
    TOP_HEAD_FIELD_NUMBER: _ClassVar[int]
    DELTA_NORM_FIELD_NUMBER: _ClassVar[int]
    RIGHT_SUBSPACE_COS_FIELD_NUMBER: _ClassVar[int]
    LEFT_SUBSPACE_COS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_COS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_MATCHED_COS_FIELD_NUMBER: _ClassVar[int]
    SIGMA_RATIO_MEDIAN_FIELD_NUMBER: _ClassVar[int]
    DIAGONAL_DOMINANCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    mean_relative: float
    max_relative: float
    top_head: int
    delta_norm: float
    right_subspace_cos: float
    left_subspace_cos: float
    matched_cos: float
    weighted_matched_cos: float
    sigma_ratio_median: float
    diagonal_dominance: float
    captured: float
    def __init__(self, layer: _Optional[int] = ..., mean_relative: _Optional[float] = ..., max_relative: _Optional[float] = ..., top_head: _Optional[int] = ..., delta_norm: _Optional[float] = ..., right_subspace_cos: _Optional[float] = ..., left_subspace_cos: _Optional[float] = ..., matched_cos: _Optional[float] = ..., weighted_matched_cos: _Optional[float] = ..., sigma_ratio_median: _Optional[float] = ..., diagonal_dominance: _Optional[float] = ..., captured: _Optional[float] = ...) -> None: ...

class DeltaReport(_message.Message):
    __slots__ = ("base", "finetuned", "convention", "joint_space", "method", "k", "coherence", "top_heads", "heads", "layers")
    BASE_FIELD_NUMBER: _ClassVar[int]
    FINETUNED_FIELD_NUMBER: _ClassVar[int]
    CONVENTION_FIELD_NUMBER: _ClassVar[int]
    JOINT_SPACE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    COHERENCE_FIELD_NUMBER: _ClassVar[int]
    TOP_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    base: _sith_pb2.ModelSummary
    finetuned: _sith_pb2.ModelSummary
    convention: str
    joint_space: str
    method: str
    k: int
    coherence: float
    top_heads: _containers.RepeatedCompositeFieldContainer[HeadDelta]
    heads: _containers.RepeatedCompositeFieldContainer[HeadStability]
    layers: _containers.RepeatedCompositeFieldContainer[LayerDelta]
    def __init__(self, base: _Optional[_Union[_sith_pb2.ModelSummary, _Mapping]] = ..., finetuned: _Optional[_Union[_sith_pb2.ModelSummary, _Mapping]] = ..., convention: _Optional[str] = ..., joint_space: _Optional[str] = ..., method: _Optional[str] = ..., k: _Optional[int] = ..., coherence: _Optional[float] = ..., top_heads: _Optional[_Iterable[_Union[HeadDelta, _Mapping]]] = ..., heads: _Optional[_Iterable[_Union[HeadStability, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[LayerDelta, _Mapping]]] = ...) -> None: ...

class HeadRef(_message.Message):
    __slots__ = ("layer", "head")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ...) -> None: ...

class HeadMatch(_message.Message):
    __slots__ = ("a", "b", "score", "mutual", "category_a", "category_b", "top_concepts", "truth_a", "truth_b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_A_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_B_FIELD_NUMBER: _ClassVar[int]
    TOP_CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    TRUTH_A_FIELD_NUMBER: _ClassVar[int]
    TRUTH_B_FIELD_NUMBER: _ClassVar[int]
    a: HeadRef
    b: HeadRef
    score: float
    mutual: bool
    category_a: str
    category_b: str
    top_concepts: _containers.RepeatedScalarFieldContainer[str]
    truth_a: str
    truth_b: str
    def __init__(self, a: _Optional[_Union[HeadRef, _Mapping]] = ..., b: _Optional[_Union[HeadRef, _Mapping]] = ..., score: _Optional[float] = ..., mutual: _Optional[bool] = ..., category_a: _Optional[str] = ..., category_b: _Optional[str] = ..., top_concepts: _Optional[_Iterable[str]] = ..., truth_a: _Optional[str] = ..., truth_b: _Optional[str] = ...) -> None: ...

class MatchedModel(_message.Message):
    __slots__ = ("name", "hash", "heads")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    name: str
    hash: str
    heads: int
    def __init__(self, name: _Optional[str] = ..., hash: _Optional[str] = ..., heads: _Optional[int] = ...) -> None: ...

class Specialisation(_message.Message):
    __slots__ = ("a", "b", "shared_matches")
    class AEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    SHARED_MATCHES_FIELD_NUMBER: _ClassVar[int]
    a: _containers.ScalarMap[str, int]
    b: _containers.ScalarMap[str, int]
    shared_matches: _containers.RepeatedCompositeFieldContainer[HeadMatch]
    def __init__(self, a: _Optional[_Mapping[str, int]] = ..., b: _Optional[_Mapping[str, int]] = ..., shared_matches: _Optional[_Iterable[_Union[HeadMatch, _Mapping]]] = ...) -> None: ...

class NullDistribution(_message.Message):
    __slots__ = ("kind", "description", "permutations", "mean", "std", "p_value", "z")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PERMUTATIONS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    kind: str
    description: str
    permutations: int
    mean: float
    std: float
    p_value: float
    z: float
    def __init__(self, kind: _Optional[str] = ..., description: _Optional[str] = ..., permutations: _Optional[int] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., p_value: _Optional[float] = ..., z: _Optional[float] = ...) -> None: ...

class LabelAgreement(_message.Message):
    __slots__ = ("observed", "chance_mean", "chance_std", "p_value", "pairs", "agreeing")
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    CHANCE_MEAN_FIELD_NUMBER: _ClassVar[int]
    CHANCE_STD_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    AGREEING_FIELD_NUMBER: _ClassVar[int]
    observed: float
    chance_mean: float
    chance_std: float
    p_value: float
    pairs: int
    agreeing: int
    def __init__(self, observed: _Optional[float] = ..., chance_mean: _Optional[float] = ..., chance_std: _Optional[float] = ..., p_value: _Optional[float] = ..., pairs: _Optional[int] = ..., agreeing: _Optional[int] = ...) -> None: ...

class MatchAgreement(_message.Message):
    __slots__ = ("dominant_category", "ground_truth", "ground_truth_relative", "same_layer")
    DOMINANT_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_RELATIVE_FIELD_NUMBER: _ClassVar[int]
    SAME_LAYER_FIELD_NUMBER: _ClassVar[int]
    dominant_category: LabelAgreement
    ground_truth: LabelAgreement
    ground_truth_relative: LabelAgreement
    same_layer: LabelAgreement
    def __init__(self, dominant_category: _Optional[_Union[LabelAgreement, _Mapping]] = ..., ground_truth: _Optional[_Union[LabelAgreement, _Mapping]] = ..., ground_truth_relative: _Optional[_Union[LabelAgreement, _Mapping]] = ..., same_layer: _Optional[_Union[LabelAgreement, _Mapping]] = ...) -> None: ...

class SimilarityRow(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SimilarityMatrix(_message.Message):
    __slots__ = ("heads_a", "heads_b", "rows")
    HEADS_A_FIELD_NUMBER: _ClassVar[int]
    HEADS_B_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    heads_a: _containers.RepeatedCompositeFieldContainer[HeadRef]
    heads_b: _containers.RepeatedCompositeFieldContainer[HeadRef]
    rows: _containers.RepeatedCompositeFieldContainer[SimilarityRow]
    def __init__(self, heads_a: _Optional[_Iterable[_Union[HeadRef, _Mapping]]] = ..., heads_b: _Optional[_Iterable[_Union[HeadRef, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[SimilarityRow, _Mapping]]] = ...) -> None: ...

class MatchReport(_message.Message):
    __slots__ = ("a", "b", "vocabulary_size", "method", "k", "coherence", "mean_score", "null_mean_score", "null_std", "mutual", "matches", "specialised", "usage_null", "label_shuffle_null", "all_pairs_mean", "similarity", "agreement", "profile", "category_null")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_SIZE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    COHERENCE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    NULL_MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    NULL_STD_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    SPECIALISED_FIELD_NUMBER: _ClassVar[int]
    USAGE_NULL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SHUFFLE_NULL_FIELD_NUMBER: _ClassVar[int]
    ALL_PAIRS_MEAN_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_NULL_FIELD_NUMBER: _ClassVar[int]
    a: MatchedModel
    b: MatchedModel
    vocabulary_size: int
    method: str
    k: int
    coherence: float
    mean_score: float
    null_mean_score: float
    null_std: float
    mutual: int
    matches: _containers.RepeatedCompositeFieldContainer[HeadMatch]
    specialised: Specialisation
    usage_null: NullDistribution
    label_shuffle_null: NullDistribution
    all_pairs_mean: float
    similarity: SimilarityMatrix
    agreement: MatchAgreement
    profile: str
    category_null: NullDistribution
    def __init__(self, a: _Optional[_Union[MatchedModel, _Mapping]] = ..., b: _Optional[_Union[MatchedModel, _Mapping]] = ..., vocabulary_size: _Optional[int] = ..., method: _Optional[str] = ..., k: _Optional[int] = ..., coherence: _Optional[float] = ..., mean_score: _Optional[float] = ..., null_mean_score: _Optional[float] = ..., null_std: _Optional[float] = ..., mutual: _Optional[int] = ..., matches: _Optional[_Iterable[_Union[HeadMatch, _Mapping]]] = ..., specialised: _Optional[_Union[Specialisation, _Mapping]] = ..., usage_null: _Optional[_Union[NullDistribution, _Mapping]] = ..., label_shuffle_null: _Optional[_Union[NullDistribution, _Mapping]] = ..., all_pairs_mean: _Optional[float] = ..., similarity: _Optional[_Union[SimilarityMatrix, _Mapping]] = ..., agreement: _Optional[_Union[MatchAgreement, _Mapping]] = ..., profile: _Optional[str] = ..., category_null: _Optional[_Union[NullDistribution, _Mapping]] = ...) -> None: ...
