"""The Python SDK and the `ice` CLI of the ICE services.

    from client import IceClient, Schedule
    with IceClient(localizer="localhost:50051", learner="localhost:50052", evaluator="localhost:50053") as ice:
        extraction = ice.extract("photo.jpg", out_dir="result/", schedule=Schedule.quick())

`client.aio.AsyncIceClient` is the same SDK on asyncio (`grpc.aio`); `client.local.LocalIce` runs the same
extraction in-process on a model bundle, without servers.
"""

from client.aio import AsyncIceClient
from client.channel import ChannelConfig, RetryPolicy
from client.errors import IceClientError, JobFailed, ServiceError, ServiceUnavailable
from client.options import ExtractOptions, GenerateOptions, LocalizeOptions, Schedule
from client.sdk import IceClient
from client.types import (
    Concept,
    EvaluationResult,
    Extraction,
    GeneratedImage,
    Job,
    JobProgress,
    LearningResult,
    LocalizeResult,
    MaskScores,
    SetEvaluationResult,
)

__all__ = [
    "AsyncIceClient", "ChannelConfig", "Concept", "EvaluationResult", "ExtractOptions", "Extraction", "GenerateOptions",
    "GeneratedImage", "IceClient", "IceClientError", "Job", "JobFailed", "JobProgress", "LearningResult",
    "LocalizeOptions", "LocalizeResult", "MaskScores", "RetryPolicy", "Schedule", "ServiceError",
    "ServiceUnavailable", "SetEvaluationResult",
]
