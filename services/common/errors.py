"""Domain errors, in one place.

The algorithm modules raise these; they never import gRPC. The server runtime's error interceptor
(`services.common.server`) maps each one to a gRPC status code, with `google.rpc.BadRequest` field
violations for `InvalidArgument`. Anything that is not an `IceError` becomes INTERNAL with a generic
message, and its details go only to the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class IceError(Exception):
    """Base class of every error a caller may see. `code` is the gRPC status code's name."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(IceError):
    """Bad input from the caller; `field` names the request field at fault (dotted path)."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, field: str | None = None, violations: list[FieldViolation] | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.violations = list(violations or [])
        if field and not self.violations:
            self.violations.append(FieldViolation(field, message))


class ResourceExhausted(IceError):
    """A limit was hit: a queue is full, an input is too large."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class NotFound(IceError):
    code = "NOT_FOUND"


class Unavailable(IceError):
    """Not ready (models loading) or shutting down; clients may retry."""

    code = "UNAVAILABLE"


class FailedPrecondition(IceError):
    code = "FAILED_PRECONDITION"


class Aborted(IceError):
    """A conflict, e.g. a request_id reused with a different request."""

    code = "ABORTED"


class Cancelled(IceError):
    code = "CANCELLED"


class DeadlineExceeded(IceError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(IceError):
    code = "UNAUTHENTICATED"


@dataclass
class BundleError(IceError):
    """A model bundle is missing a file, has a corrupt one, or cannot be loaded. Names the file."""

    message: str
    path: str | None = None
    code: str = field(default="FAILED_PRECONDITION", init=False)

    def __post_init__(self):
        Exception.__init__(self, f"{self.path}: {self.message}" if self.path else self.message)

    def __str__(self) -> str:  # dataclass would otherwise print the repr
        return f"{self.path}: {self.message}" if self.path else self.message
