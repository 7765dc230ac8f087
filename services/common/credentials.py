"""The server's TLS certificate and key, the mutual-TLS client CA and the bearer token: read from their files at
start, then re-read when the files change, so that a renewed certificate or a rotated token takes effect without a
restart.

Kubernetes updates a mounted Secret by writing the new files into a fresh folder and swapping the `..data` symlink
to it: the paths stay the same while their contents change at once. A change is a change of the files' contents
(compared by hash; mtimes and sizes miss a copy that keeps the mtime, or a same-size rewrite within the clock's
resolution). At most every `credentials_reload_s` seconds:

- TLS: gRPC asks `ServerCertificates.fetch` before each new connection's handshake; when the files' contents
  changed and they are a usable set (certificate and key parse and belong together, the client CA parses), new
  connections get the new certificate and CA. Connections already open keep theirs until they close (at the
  latest at `max_connection_age_ms`).
- The token: `TokenFile` is what `AuthInterceptor` asks on each call; a changed file's token is accepted from then
  on, and the previous one only for `auth_token_overlap_s` more seconds (the kubelet updates each pod's copy of a
  Secret at its own time: a client whose copy is updated later still gets through meanwhile).

A file that cannot be read, a certificate that does not parse or does not match its key, an empty token file: a
warning is logged (once per bad version of the files) and the previous certificate or token stays in use. The
check is Python's `ssl` module (the OpenSSL the interpreter links): it parses the certificate chain and the key and
checks that they match, as the handshake will; it does not judge expiry or names.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from ice.wire import TokenOverlap
from services.common.settings import Settings

log = logging.getLogger("ice.server")


class _Throttle:
    """`due()` is True at most once every `interval` seconds (every time when 0)."""

    def __init__(self, interval: float):
        self._interval = interval
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def due(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self._interval:
                return False
            self._last = now
            return True


def _digest(parts: tuple[bytes, ...]) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def _encrypted_key() -> bytes:
    raise ValueError("the private key is encrypted (gRPC needs an unencrypted key)")


class ServerCertificates:
    """The gRPC server credentials of `--tls-cert`/`--tls-key` (and `--tls-client-ca`), reloaded on change."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None, reload_s: float):
        self._paths = (cert, key) if client_ca is None else (cert, key, client_ca)
        self._throttle = _Throttle(reload_s)
        self._lock = threading.Lock()
        for _attempt in range(5):  # a start during a rotation: read again until the files hold still
            try:
                contents = self._checked()
            except (OSError, ValueError) as exc:
                raise SystemExit(f"unusable TLS files ({', '.join(map(str, self._paths))}): {exc}") from exc
            if contents is not None:
                break
        else:
            raise SystemExit(f"the TLS files {', '.join(map(str, self._paths))} keep changing while read")
        self._digest = _digest(contents)
        self._rejected: bytes | str | None = None
        self._initial = self._configuration(contents)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=len(self._paths) == 3
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each new handshake: a new configuration when the files changed, else None."""
        if not self._throttle.due():
            return None
        try:
            with self._lock:
                return self._reload()
        except Exception:  # never let a reload fail a handshake: the previous configuration stays
            log.exception("TLS: checking %s for a new certificate failed", self._paths[0])
            return None

    def _reload(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            contents = self._read()
        except OSError as exc:
            self._reject(str(exc), f"cannot read: {exc}")
            return None
        digest = _digest(contents)
        if digest == self._digest:
            self._rejected = None  # a later bad version is reported again
            return None
        if digest == self._rejected:
            return None
        try:
            if self._checked(contents) is None:  # being rewritten while checked: look again at the next check
                return None
        except (OSError, ValueError) as exc:
            self._reject(digest, str(exc))
            return None
        self._digest = digest
        self._rejected = None
        log.info(
            "TLS: new connections get the renewed certificate %s%s",
            self._paths[0],
            f" and client CA {self._paths[2]}" if len(self._paths) == 3 else "",
        )
        return self._configuration(contents)

    def _reject(self, key: bytes | str, why: str) -> None:
        """Log once per bad version of the files (not at every check)."""
        if key != self._rejected:
            log.warning(
                "TLS: keeping the previous certificate; %s: %s", ", ".join(map(str, self._paths)), why
            )
            self._rejected = key

    def _read(self) -> tuple[bytes, ...]:
        return tuple(path.read_bytes() for path in self._paths)

    def _checked(self, contents: tuple[bytes, ...] | None = None) -> tuple[bytes, ...] | None:
        """The files' contents once certificate and key parse and match and the CA parses; None when they changed
        while checked. `ssl` reads only files, so the check is on the paths, between two reads of the contents."""
        contents = self._read() if contents is None else contents
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self._paths[0], self._paths[1], password=_encrypted_key)
            if len(contents) == 3:
                context.load_verify_locations(cadata=contents[2].decode("ascii"))
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            if not self._unchanged(contents):  # changed while checked: no verdict on a version in flux
                return None
            raise
        return contents if self._unchanged(contents) else None

    def _unchanged(self, contents: tuple[bytes, ...]) -> bool:
        try:
            return self._read() == contents
        except OSError:
            return False

    def _configuration(self, contents: tuple[bytes, ...]) -> grpc.ServerCertificateConfiguration:
        cert, key, *client_ca = contents
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=client_ca[0] if client_ca else None
        )


class TokenFile:
    """The bearer token of `--auth-token-file`: call it for the tokens accepted now (the one in the file, and the one
    it replaced during `overlap_s` seconds after the change). Re-read at most every `reload_s` seconds; an
    unreadable or empty file keeps the previous token."""

    def __init__(self, path: Path, reload_s: float, overlap_s: float = 0.0):
        self._path = path
        self._throttle = _Throttle(reload_s)
        self._overlap = TokenOverlap(overlap_s)
        self._lock = threading.Lock()
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SystemExit(f"cannot read --auth-token-file {path}: {exc}") from exc
        if not token:
            raise SystemExit(f"--auth-token-file {path} is empty")
        self._token = token
        self._warned: str | None = None

    def __call__(self) -> tuple[str, ...]:
        if self._throttle.due():
            with self._lock:
                self._reload()
        return self._overlap.tokens(self._token)

    def _reload(self) -> None:
        try:
            token = self._path.read_text().strip()
            problem = None if token else "the file is empty"
        except (OSError, UnicodeDecodeError) as exc:
            token, problem = "", f"cannot read it: {exc}"
        if problem:
            if problem != self._warned:  # once per problem, not at every check
                log.warning(
                    "auth: keeping the previous bearer token; --auth-token-file %s: %s", self._path, problem
                )
                self._warned = problem
            return
        self._warned = None
        if token != self._token:
            self._overlap.replaced(self._token)
            self._token = token
            if self._overlap.overlap_s > 0:
                log.info("auth: calls now need the new bearer token from %s (the previous one is accepted for %g s "
                         "more)", self._path, self._overlap.overlap_s)
            else:
                log.info("auth: calls now need the new bearer token from %s", self._path)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (mutual with `--tls-client-ca`) reloaded on change, or None for plaintext."""
    if not settings.tls_cert:
        return None
    return ServerCertificates(
        settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.credentials_reload_s
    ).credentials()


def token_source(settings: Settings) -> str | Callable[[], tuple[str, ...]] | None:
    """The bearer token every call must carry: `--auth-token` as given, `--auth-token-file` re-read on change
    (a `TokenFile`: the tokens accepted now), or None when auth is off."""
    if settings.auth_token:
        return settings.auth_token
    if settings.auth_token_file:
        return TokenFile(settings.auth_token_file, settings.credentials_reload_s, settings.auth_token_overlap_s)
    return None
