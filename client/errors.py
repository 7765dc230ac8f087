"""What the SDK raises: gRPC failures turned into exceptions that say which service failed and why.

Every SDK call wraps `grpc.RpcError` into `ServiceError` (or its subclass `ServiceUnavailable` when the service
cannot be reached or is not ready). The message is one line a person can act on, e.g.
"cannot reach the localizer at 127.0.0.1:50051: failed to connect to all addresses".
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class IceClientError(Exception):
    """Base class of everything the SDK raises on purpose."""


class ServiceError(IceClientError):
    """A call to one of the services failed with a gRPC status."""

    def __init__(self, service: str, target: str, code: grpc.StatusCode, details: str,
                 violations: tuple[FieldViolation, ...] = ()):
        self.service = service
        self.target = target
        self.code = code
        self.details = details
        self.violations = violations
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"the {self.service} at {self.target} answered {self.code.name}: {self.details}"
        # the services write a violation into the status message already ("image: size 1x1 ..."): only the
        # violations the message does not say are added, so that nothing is said twice
        extra = [f"{v.field}: {v.description}" for v in self.violations]
        extra = [e for e in extra if e not in self.details]
        if extra:
            text += " (" + "; ".join(extra) + ")"
        return text


class ServiceUnavailable(ServiceError):
    """UNAVAILABLE: nothing listens there, the network is down, or the service is still loading its bundle."""

    def _message(self) -> str:
        return f"cannot reach the {self.service} at {self.target}: {self.details}"


class JobFailed(IceClientError):
    """A learning job ended FAILED or CANCELLED."""

    def __init__(self, job_id: str, state: str, code: str, message: str):
        self.job_id = job_id
        self.state = state
        self.code = code
        super().__init__(f"learning job {job_id} ended {state}: {code} {message}".rstrip())


def _violations(error: grpc.RpcError) -> tuple[FieldViolation, ...]:
    # google.rpc.BadRequest details travel in the `grpc-status-details-bin` trailer.
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(error)
    except Exception:  # a status without parseable details is still a status
        return ()
    if status is None:
        return ()
    out = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out += [FieldViolation(v.field, v.description) for v in bad.field_violations]
    return tuple(out)


def from_rpc_error(error: grpc.RpcError, service: str, target: str) -> ServiceError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    details = " ".join(details.split())  # one line
    cls = ServiceUnavailable if code == grpc.StatusCode.UNAVAILABLE else ServiceError
    return cls(service, target, code, details, _violations(error))
