"""Server interceptors: Prometheus RED metrics, bearer-token auth, readiness gate, domain-error mapping.

Order on the wire (outermost first): metrics -> auth -> readiness -> errors -> servicer. Each interceptor
wraps the method handler's behaviour, for all four RPC shapes, through `_wrap`.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import Counter, Histogram

from services.common.errors import Cancelled, DeadlineExceeded, IceError, InvalidArgument

log = logging.getLogger("ice.server")

# go-grpc-prometheus names and labels, so existing dashboards and alerts work unchanged.
_LABELS = ("grpc_type", "grpc_service", "grpc_method")
STARTED = Counter("grpc_server_started_total", "Total number of RPCs started on the server.", _LABELS)
HANDLED = Counter(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    (*_LABELS, "grpc_code"),
)
MSG_RECEIVED = Counter("grpc_server_msg_received_total", "Total number of RPC stream messages received.", _LABELS)
MSG_SENT = Counter("grpc_server_msg_sent_total", "Total number of gRPC stream messages sent.", _LABELS)
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    _LABELS,
    # up to a day: an 11-round Localize at SD-2.1 size on a busy CPU takes ~12 minutes, and a WatchLearningJob
    # stream or a Generate call of 64 images lasts as long as its work (hours on a CPU)
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200,
             14400, 28800, 86400),
)

# Services that must answer without a token and before the models are loaded (Kubernetes probes, grpcurl).
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


def split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _wrap(handler: grpc.RpcMethodHandler | None, wrap_unary: Callable, wrap_stream: Callable,
          request_deserializer: Callable | None = None):
    """Return a copy of `handler` whose behaviour is wrapped; unary-response and streaming-response
    behaviours need different wrappers (a value vs a generator)."""
    if handler is None:
        return None
    deserializer = request_deserializer or handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary), deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary), deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap_stream(handler.stream_stream), deserializer, handler.response_serializer
    )


def _refuse(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A handler of the same shape that answers `code` without running the servicer."""

    def refuse_unary(_behaviour):
        def refused(request, context):
            context.abort(code, message)

        return refused

    def refuse_stream(_behaviour):
        def refused(request, context):
            context.abort(code, message)
            yield  # pragma: no cover  (makes this a generator)

        return refused

    return _wrap(handler, refuse_unary, refuse_stream)


def _code_name(context: grpc.ServicerContext, exc: BaseException | None) -> str:
    if isinstance(exc, GeneratorExit):
        return abandoned_code(context).name
    code = None
    try:
        code = context.code()
    except Exception:  # older grpc versions lack ServicerContext.code()
        code = None
    if code is None or code == grpc.StatusCode.OK:
        if exc is None:
            return "OK"
        return "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode(code).name if isinstance(code, tuple) else str(code)


class MetricsInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        labels = (_rpc_type(handler), service, method)

        def count_requests(request_or_iterator):
            if not (handler.request_streaming):
                MSG_RECEIVED.labels(*labels).inc()
                return request_or_iterator

            def counted():
                for item in request_or_iterator:
                    MSG_RECEIVED.labels(*labels).inc()
                    yield item

            return counted()

        @contextmanager
        def observed(context):
            STARTED.labels(*labels).inc()
            start = time.perf_counter()
            exc = None
            try:
                yield
            except BaseException as e:
                exc = e
                raise
            finally:
                HANDLING.labels(*labels).observe(time.perf_counter() - start)
                HANDLED.labels(*labels, _code_name(context, exc)).inc()

        def wrap_unary(behaviour):
            def wrapped(request, context):
                with observed(context):
                    response = behaviour(count_requests(request), context)
                    MSG_SENT.labels(*labels).inc()
                    return response

            return wrapped

        def wrap_stream(behaviour):
            def wrapped(request, context):
                with observed(context):
                    for response in behaviour(count_requests(request), context):
                        MSG_SENT.labels(*labels).inc()
                        yield response

            return wrapped

        return _wrap(handler, wrap_unary, wrap_stream)


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health checks. `token` is the token, or a
    callable asked on each RPC for the tokens accepted now (`credentials.TokenFile`: the token file, reloaded on
    change, and during a rotation's overlap the token it replaced). A call may carry several `authorization`
    entries (a client that has just seen its token file change sends the new token and the previous one); it is
    let through when one of them is accepted."""

    def __init__(self, token: str | Callable[[], tuple[str, ...]]):
        self._tokens = token if callable(token) else (lambda: (token,))

    def _allowed(self, metadata) -> bool:
        presented = []
        for key, value in metadata or ():
            if key.lower() == "authorization":
                scheme, _, credential = (value if isinstance(value, str) else value.decode()).partition(" ")
                if scheme.lower() == "bearer":
                    presented.append(credential.strip().encode())
        accepted = [t.encode() for t in self._tokens()]
        # every pair is compared (no early exit), so the time taken says nothing about which one matched
        return sum(hmac.compare_digest(p, a) for p in presented[:4] for a in accepted) > 0

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service, _ = split_method(handler_call_details.method)
        if handler is None or service == HEALTH_SERVICE or self._allowed(handler_call_details.invocation_metadata):
            return handler

        return _refuse(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


class ReadinessInterceptor(grpc.ServerInterceptor):
    """Answers UNAVAILABLE (retryable) while the models are still loading or the server is draining."""

    def __init__(self, is_ready: Callable[[], bool]):
        self._is_ready = is_ready

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service, _ = split_method(handler_call_details.method)
        if handler is None or service == HEALTH_SERVICE or service in REFLECTION_SERVICES or self._is_ready():
            return handler

        return _refuse(handler, grpc.StatusCode.UNAVAILABLE, "the service is not ready (models loading or shutting down)")


# A status travels in HTTP/2 trailers, and clients drop trailers above 16 KiB by default ("Stream removed"): a
# message that quotes the caller's input (a 200 000-character file name) must be clipped to stay readable.
MAX_STATUS_TEXT = 1024


def _clip(text: str) -> str:
    return text if len(text) <= MAX_STATUS_TEXT else f"{text[:MAX_STATUS_TEXT]}... ({len(text)} characters)"


def status_for(exc: IceError) -> grpc.Status:
    """A rich gRPC status for a domain error: code, message, and BadRequest field violations."""
    code = getattr(code_pb2, exc.code, code_pb2.INTERNAL)
    status = status_pb2.Status(code=code, message=_clip(exc.message))
    if isinstance(exc, InvalidArgument) and exc.violations:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=_clip(v.field), description=_clip(v.description))
                    for v in exc.violations
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Domain errors -> their status; anything else -> INTERNAL with a generic message (details in the log)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method

        def handle(exc: BaseException, context: grpc.ServicerContext):
            gone = _caller_gone(context)
            if gone is not None:  # the client cancelled (or its deadline passed): nobody reads an answer
                context.abort(gone, _log_gone(method, gone))  # recorded for the metrics; nothing reaches the client
            if isinstance(exc, IceError):
                log.info("%s -> %s: %s", method, exc.code, exc.message)
                context.abort_with_status(status_for(exc))
            log.exception("%s failed", method)
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

        def is_abort(exc: BaseException, context) -> bool:
            # context.abort() raises a bare Exception after setting a non-OK code: let it through.
            try:
                return context.code() not in (None, grpc.StatusCode.OK)
            except Exception:
                return False

        streaming = handler is not None and handler.request_streaming

        def parsed(request):
            """Raise InvalidArgument for a message that did not parse (see `_tolerant`), also inside streams."""
            if streaming:
                return (_parsed_or_raise(item) for item in request)
            return _parsed_or_raise(request)

        def wrap_unary(behaviour):
            def wrapped(request, context):
                try:
                    return behaviour(parsed(request), context)
                except Exception as exc:
                    if is_abort(exc, context):
                        raise
                    handle(exc, context)

            return wrapped

        def wrap_stream(behaviour):
            def wrapped(request, context):
                try:
                    yield from behaviour(parsed(request), context)
                except GeneratorExit:  # the caller left while a response was on its way: no exception to handle
                    _log_gone(method, abandoned_code(context))
                    raise
                except Exception as exc:
                    if is_abort(exc, context):
                        raise
                    handle(exc, context)

            return wrapped

        deserializer = _tolerant(handler.request_deserializer) if handler is not None else None
        return _wrap(handler, wrap_unary, wrap_stream, deserializer)


def _log_gone(method: str, code: grpc.StatusCode) -> str:
    """One quiet line for a call whose caller left; returns the reason."""
    why = "the client cancelled the call" if code == grpc.StatusCode.CANCELLED else "the deadline passed"
    log.info("%s -> %s: %s", method, code.name, why)
    return why


def abandoned_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The status of a response stream gRPC stopped reading (its generator is closed, GeneratorExit): it does so
    only once the call is over, when a response could not be sent to a caller that cancelled or ran out of time."""
    return _caller_gone(context) or grpc.StatusCode.CANCELLED


def _caller_gone(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """CANCELLED / DEADLINE_EXCEEDED when the call is no longer active (a client that cancelled makes the request
    iterator raise a bare grpc.RpcError inside the servicer), else None."""
    try:
        if context.is_active():
            return None
        remaining = context.time_remaining()
    except Exception:  # noqa: BLE001 - a context without these methods: not ours to judge
        return None
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


class _Unparsed:
    """Stands in for a request message whose bytes did not parse, so that the caller gets INVALID_ARGUMENT
    (gRPC itself would answer INTERNAL "Exception deserializing request!")."""

    def __init__(self, type_name: str, error: Exception):
        self.type_name = type_name
        self.error = error


def _tolerant(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None
    message_type = getattr(deserializer, "__self__", None)
    type_name = getattr(getattr(message_type, "DESCRIPTOR", None), "full_name", "the request message")

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError: e.g. invalid UTF-8 in a string field, or not protobuf at all
            return _Unparsed(type_name, exc)

    return deserialize


def _parsed_or_raise(request):
    if isinstance(request, _Unparsed):
        raise InvalidArgument(f"the request does not parse as {request.type_name} (a string field that is not "
                              "valid UTF-8, or bytes that are not this protobuf message)")
    return request


def call_active(context: grpc.ServicerContext) -> bool:
    """False once the client cancelled or the call's deadline passed. The deadline is read from the clock first:
    gRPC marks a call inactive only when its completion queue gets to the event, which a busy process delays, and
    work started after the deadline is work nobody waits for."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return False
    return context.is_active()


def ensure_active(context: grpc.ServicerContext) -> None:
    """Raise DeadlineExceeded / Cancelled before expensive work whose caller has gone."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("the deadline passed before the work started")
    if not context.is_active():
        raise Cancelled("the client cancelled the request")


def iter_with_context_check(items: Iterator, context: grpc.ServicerContext) -> Iterator:
    """Stop a server-side loop as soon as the client cancels or its deadline passes."""
    for item in items:
        if not call_active(context):
            return
        yield item
