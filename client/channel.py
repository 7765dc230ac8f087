"""The one place where the SDK's gRPC channels are configured.

- Targets: `host:port`, or `dns:///host:port` to resolve every address of a (headless) Kubernetes Service;
  the `round_robin` policy then spreads calls over all of them (one HTTP/2 connection would otherwise pin
  one pod).
- Retries: only UNAVAILABLE is retried, by gRPC itself through the service config's `retryPolicy` (AIP-194).
  A learning job is created with a `request_id`, so a retried creation never queues a second job.
- TLS with the system roots or a given CA bundle, client certificate and key for mutual TLS, and a bearer
  token: sent as call credentials over TLS, and as `authorization` metadata on a plaintext channel (for
  loopback development only). A token given as a file (`token_file`) is read again when the file changes, so
  a client that runs for hours (a batch, a watch) follows a rotated Secret or a projected service-account
  token without a restart; for `token_overlap_s` after a change it sends the previous token too, so that a
  server whose copy of the Secret is updated later still lets it through.
- Deadlines: `timeout` seconds per unary call, and more for calls whose work is known in advance: Localize
  gets `seconds_per_round` for each round it may run, Evaluate and EvaluateSet `seconds_per_image` for each
  image (`client.longcalls`). Streams that follow a job have none unless asked for; a watch is re-opened when
  the server closes it (UNAVAILABLE, e.g. a connection reaching its maximum age) for as long as the job runs,
  giving up after `watch_reconnect_s` without reaching the learner.
- Message sizes set explicitly on both directions (gRPC's default receive limit is 4 MiB).

`open_channel` makes a blocking channel (`IceClient`), `open_aio_channel` the same one for asyncio
(`AsyncIceClient`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ice.wire import TokenOverlap  # shared with the server's token file

DEFAULT_TARGETS = {"localizer": "localhost:50051", "learner": "localhost:50052", "evaluator": "localhost:50053"}

# Every service a channel may carry calls of; the retry policy applies to each of them.
_SERVICES = (
    "ice.localizer.v1.LocalizerService",
    "ice.learner.v1.LearnerService",
    "ice.evaluator.v1.EvaluatorService",
    "google.longrunning.Operations",
    "grpc.health.v1.Health",
)


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's transparent retry of UNAVAILABLE (connection refused, server loading or draining)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach the services. One config is shared by the three channels of an `IceClient`."""

    tls: bool = False
    root_certificates: Path | None = None  # PEM CA bundle; None = the system roots (when tls)
    client_certificate: Path | None = None  # PEM certificate chain for mutual TLS
    client_key: Path | None = None  # PEM private key for mutual TLS
    server_name_override: str | None = None  # TLS name to verify instead of the target host (tests, IPs)
    token: str | None = None  # bearer token
    token_file: Path | None = None  # bearer token read from this file, and again whenever the file changes
    token_overlap_s: float = 300.0  # after token_file changes, the previous token is sent too for this long
    timeout: float = 600.0  # seconds per unary call
    seconds_per_round: float = 120.0  # Localize: added to `timeout` for each round it may run
    seconds_per_image: float = 2.0  # Evaluate / EvaluateSet: added to `timeout` for each image sent
    watch_reconnect_s: float = 900.0  # a watch gives up after this long without reaching the learner
    max_message_bytes: int = 64 * 1024 * 1024
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    load_balancing: str = "round_robin"
    keepalive_time_ms: int = 60_000

    def __post_init__(self):
        if bool(self.client_certificate) != bool(self.client_key):
            raise ValueError("a client certificate and its key must be given together (mutual TLS)")
        if (self.client_certificate or self.root_certificates) and not self.tls:
            object.__setattr__(self, "tls", True)
        if self.token and self.token_file:
            raise ValueError("give a bearer token or a token file, not both")
        # the one reader of the file that every channel of this config asks (read now: a bad path fails here)
        if self.token_overlap_s < 0:
            raise ValueError("token_overlap_s must be 0 or more")
        object.__setattr__(self, "_token_file",
                           TokenFile(self.token_file, self.token_overlap_s) if self.token_file else None)

    def bearer(self) -> Callable[[], str] | None:
        """The token in force, asked on every call (None: no token)."""
        if self._token_file is not None:
            return self._token_file
        token = self.token
        return (lambda: token) if token else None

    def authorization(self) -> Callable[[], tuple[tuple[str, str], ...]] | None:
        """The `authorization` metadata entries of a call, asked on every call (None: no token): the token in
        force, and during a rotation's overlap the one it replaced."""
        if self._token_file is not None:
            token_file = self._token_file
            return lambda: tuple(("authorization", f"Bearer {t}") for t in token_file.presented())
        if self.token:
            entries = (("authorization", f"Bearer {self.token}"),)
            return lambda: entries
        return None


class TokenFile:
    """A bearer token kept in a file: call it for the token in force. The file is stat-ed on each call and read
    again when it changed (the kubelet swaps a mounted Secret or a projected service-account token in place). A
    file that later becomes unreadable or empty keeps the last good token; at construction it is an error.
    `presented()` adds the token a change replaced, for `overlap_s` seconds after the change."""

    def __init__(self, path: str | Path, overlap_s: float = 0.0):
        self.path = Path(path)
        self._overlap = TokenOverlap(overlap_s)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        try:
            self._token = self.path.read_text().strip()
            self._stamp = self._stat()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if not self._token:
            raise ValueError(f"the token file {path} is empty")

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)  # follows the symlinks a Secret volume is made of
        return st.st_ino, st.st_mtime_ns, st.st_size

    def __call__(self) -> str:
        try:
            stamp = self._stat()
        except OSError:
            return self._token
        if stamp != self._stamp:
            with self._lock:
                try:
                    token = self.path.read_text().strip()
                except (OSError, UnicodeDecodeError):
                    return self._token
                if token and token != self._token:
                    self._overlap.replaced(self._token)
                if token:  # a half-written (empty) file is read again at the next call
                    self._token, self._stamp = token, stamp
        return self._token

    def presented(self) -> tuple[str, ...]:
        """The tokens a call carries: the one in force, then the one it replaced while the overlap lasts."""
        return self._overlap.tokens(self())


def service_config(config: ChannelConfig, services: Iterable[str] = _SERVICES) -> str:
    """The JSON service config: load balancing and the UNAVAILABLE-only retry policy."""
    method: dict = {"name": [{"service": name} for name in services]}
    if config.retry is not None and config.retry.max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": config.retry.max_attempts,
            "initialBackoff": f"{config.retry.initial_backoff_s}s",
            "maxBackoff": f"{config.retry.max_backoff_s}s",
            "backoffMultiplier": config.retry.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"loadBalancingConfig": [{config.load_balancing: {}}], "methodConfig": [method]})


def channel_options(config: ChannelConfig) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.enable_retries", 1 if config.retry is not None else 0),
        ("grpc.service_config", service_config(config)),
    ]
    if config.server_name_override:
        options.append(("grpc.ssl_target_name_override", config.server_name_override))
    return options


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def _channel_credentials(config: ChannelConfig) -> grpc.ChannelCredentials:
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(config.root_certificates, "CA bundle"),
        private_key=_read(config.client_key, "client key"),
        certificate_chain=_read(config.client_certificate, "client certificate"),
    )
    authorization = config.authorization()
    if authorization is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(_TokenPlugin(authorization)))
    return creds


class _TokenPlugin(grpc.AuthMetadataPlugin):
    """Call credentials over TLS: `authorization: Bearer …` with the token in force at each call."""

    def __init__(self, authorization: Callable[[], tuple[tuple[str, str], ...]]):
        self._authorization = authorization

    def __call__(self, context, callback):
        callback(self._authorization(), None)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer …` to every call of a plaintext channel."""

    def __init__(self, authorization: Callable[[], tuple[tuple[str, str], ...]]):
        self._authorization = authorization

    def _details(self, details):
        metadata = [*(details.metadata or ()), *self._authorization()]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def display_target(target: str) -> str:
    """`dns:///svc.ns:50051` -> `svc.ns:50051`, for messages."""
    for prefix in ("dns:///", "ipv4:", "ipv6:", "dns:"):
        if target.startswith(prefix):
            return target[len(prefix):]
    return target


def open_channel(target: str, config: ChannelConfig) -> grpc.Channel:
    options = channel_options(config)
    if config.tls:
        return grpc.secure_channel(target, _channel_credentials(config), options=options)
    channel = grpc.insecure_channel(target, options=options)
    authorization = config.authorization()
    if authorization is not None:
        channel = grpc.intercept_channel(channel, _BearerToken(authorization))
    return channel


class _AioBearerToken(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """`_BearerToken` for `grpc.aio` channels (the SDK makes unary and server-streaming calls only)."""

    def __init__(self, authorization: Callable[[], tuple[tuple[str, str], ...]]):
        self._authorization = authorization

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()), *self._authorization())
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def open_aio_channel(target: str, config: ChannelConfig) -> grpc.aio.Channel:
    """The same channel as `open_channel` (options, retries, TLS, token), for asyncio (`grpc.aio`)."""
    options = channel_options(config)
    if config.tls:
        return grpc.aio.secure_channel(target, _channel_credentials(config), options=options)
    authorization = config.authorization()
    interceptors = [_AioBearerToken(authorization)] if authorization is not None else None
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
