"""Python SDK for the SITH gRPC service: explain, search and edit CLIP heads, embed, download.

    import sith_client
    with sith_client.Client() as c:                       # $SITH_ADDRESS / $SITH_TOKEN
        edit = c.wait(c.edit(suppress=["red"]), progress=True)
        c.download(edit, "red-free.safetensors")

Results are the API's own messages (``sith_api.v1``, re-exported in :mod:`sith_client.types`);
``Job`` and ``Edit`` are snapshots, and waiting is a client call. The SDK never imports torch.
"""

__version__ = "0.2.0"

from . import errors  # noqa: E402
from ._retry import NO_RETRY, RetryPolicy  # noqa: E402
from .aio import AsyncClient  # noqa: E402
from .client import Client  # noqa: E402
from .errors import (  # noqa: E402
    ChecksumMismatch,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    JobFailed,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SithError,
    Unauthenticated,
    Unavailable,
)
from .jobs import Edit, Job  # noqa: E402
from .types import (  # noqa: E402
    AffectedVector,
    Artifact,
    Classification,
    Concept,
    ConceptEffect,
    DeltaReport,
    EditOp,
    EditPlan,
    Embeddings,
    HeadChange,
    HeadExplanation,
    LayerSpectrum,
    HeadMatch,
    LabelAgreement,
    MatchAgreement,
    MatchReport,
    Model,
    NullDistribution,
    SearchHit,
    SimilarityMatrix,
    SimilarityRow,
    VectorExplanation,
    similarity_to_numpy,
    tensor_to_numpy,
)

__all__ = [
    "__version__", "Client", "AsyncClient", "RetryPolicy", "NO_RETRY", "errors", "Job", "Edit",
    "Model", "Concept", "VectorExplanation", "HeadExplanation", "SearchHit", "LayerSpectrum", "AffectedVector",
    "HeadChange", "ConceptEffect", "EditPlan", "Artifact", "DeltaReport", "MatchReport", "EditOp", "Embeddings",
    "HeadMatch", "NullDistribution", "LabelAgreement", "MatchAgreement", "SimilarityMatrix", "SimilarityRow",
    "Classification", "tensor_to_numpy", "similarity_to_numpy",
    "SithError", "InvalidArgument", "FieldViolation", "NotFound", "Unauthenticated", "PermissionDenied",
    "ResourceExhausted", "Unavailable", "DeadlineExceeded", "JobFailed", "ChecksumMismatch",
]
