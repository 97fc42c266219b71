"""Python SDK for the SITH gRPC service: explain, search and edit CLIP heads, embed, download.

    import sith_client
    with sith_client.Client() as c:                       # $SITH_ADDRESS / $SITH_TOKEN
        c.edit(suppress=["red"]).wait(progress=True).download("out.safetensors")

Generated stubs live in ``sith_client.v1``. The SDK never imports torch.
"""

__version__ = "0.1.0"

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
from .jobs import AsyncEdit, AsyncJob, Edit, Job  # noqa: E402
from .types import (  # noqa: E402
    AffectedVector,
    Classification,
    Concept,
    EditOp,
    EditPreview,
    Embeddings,
    HeadChange,
    HeadExplanation,
    LayerSpectrum,
    ModelInfo,
    SearchHit,
    VectorExplanation,
)

__all__ = [
    "__version__", "Client", "AsyncClient", "RetryPolicy", "NO_RETRY", "errors",
    "Job", "AsyncJob", "Edit", "AsyncEdit",
    "ModelInfo", "Concept", "VectorExplanation", "HeadExplanation", "SearchHit", "LayerSpectrum",
    "AffectedVector", "HeadChange", "EditPreview", "EditOp", "Embeddings", "Classification",
    "SithError", "InvalidArgument", "FieldViolation", "NotFound", "Unauthenticated", "PermissionDenied",
    "ResourceExhausted", "Unavailable", "DeadlineExceeded", "JobFailed", "ChecksumMismatch",
]
