"""A renewed certificate, a rotated client CA and a rotated bearer token take effect on a running service, without a
restart; a bad version of the files keeps the previous one in force and the service up.

The service is the real evaluator (tiny bundle) on loopback. Its TLS files and token live in folders that are
updated the way the kubelet updates a mounted Secret (cert-manager's renewals included): the new files are written
into a fresh folder and the `..data` symlink is swapped to it in one rename, while the paths the service was given
(`tls.crt -> ..data/tls.crt`) stay the same. Every check opens a NEW connection (a channel of its own, with its own
subchannel pool), since the certificate is chosen at the handshake.

Timing: the reload interval is the contract. Each wait polls, and fails as soon as an attempt that began a full
interval after the change still sees the old state; no sleep decides a pass."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from ice.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from tests.reliability.harness import make_ca, outcome, start_inprocess

RELOAD_S = 0.5  # --credentials-reload-s of the services under test


def publish(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` into `folder` as the kubelet updates a Secret volume: into a new `..<timestamp>` folder, then
    one atomic rename of a `..data` symlink to it; each name is a symlink through `..data`."""
    folder.mkdir(exist_ok=True)
    data = folder / "..data"
    previous = data.resolve() if data.is_symlink() else None
    version = folder / f"..{time.time_ns()}"
    version.mkdir()
    for name, content in files.items():
        (version / name).write_bytes(content)
    staged = folder / "..data_tmp"
    staged.symlink_to(version.name)
    os.replace(staged, data)
    for name in files:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")
    if previous is not None:
        shutil.rmtree(previous)


def call(port: int, creds: grpc.ChannelCredentials, *tokens: str) -> str:
    """GetServerInfo on a new connection, with an `authorization` entry per token: "OK" or the status code's name."""
    metadata = [("authorization", f"Bearer {token}") for token in tokens] or None
    with grpc.secure_channel(
        f"localhost:{port}", creds, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as ch:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(ch)
        return outcome(
            lambda: stub.GetServerInfo(evaluator_pb2.GetServerInfoRequest(), timeout=30, metadata=metadata)
        ).code


def changes_within_interval(since: float, seen: Callable[[], bool]) -> None:
    """Poll `seen()` until it is true; an attempt begun a full reload interval after `since` (when the new files
    were in place) must see it."""
    while True:
        started = time.monotonic()
        if seen():
            return
        assert started < since + RELOAD_S, f"still the previous state {started - since:.2f}s after the change"
        time.sleep(0.05)


def stays_through_a_check(since: float, seen: Callable[[], bool]) -> None:
    """`seen()` holds on every attempt until one begun a full reload interval after `since` (so the service has
    read the files since the change)."""
    while True:
        started = time.monotonic()
        assert seen(), f"changed {started - since:.2f}s after the files were rewritten"
        if started >= since + RELOAD_S:
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pki():
    """Two unrelated CAs; a server certificate (for localhost) and a client certificate from each."""
    out = {}
    for name in ("one", "two"):
        ca, issue = make_ca(name)
        out[name] = {
            "ca": ca,
            "server": issue("localhost", server=True),
            "client": issue(f"client {name}", server=False),
        }
    return out


def _start(tiny_bundle_dir, tls: Path, mutual: bool = False, **overrides):
    return start_inprocess(
        "evaluator",
        tiny_bundle_dir,
        tls_cert=tls / "tls.crt",
        tls_key=tls / "tls.key",
        tls_client_ca=tls / "ca.crt" if mutual else None,
        credentials_reload_s=RELOAD_S,
        **overrides,
    )


def _serving_certificate_one(pki, tiny_bundle_dir, tmp_path):
    """(the TLS folder, an evaluator serving CA one's server certificate from it)."""
    tls = tmp_path / "tls"
    publish(tls, {"tls.key": pki["one"]["server"][0], "tls.crt": pki["one"]["server"][1]})
    return tls, _start(tiny_bundle_dir, tls)


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(pki, tiny_bundle_dir, tmp_path):
    one, two = pki["one"], pki["two"]
    tls, running = _serving_certificate_one(pki, tiny_bundle_dir, tmp_path)
    trusts_one, trusts_two = (grpc.ssl_channel_credentials(ca["ca"]) for ca in (one, two))
    try:
        assert call(running.port, trusts_one) == "OK"
        assert call(running.port, trusts_two) == "UNAVAILABLE"  # the handshake fails: certificate 1 is served
        open_before = grpc.secure_channel(
            f"localhost:{running.port}", trusts_one, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        info = evaluator_pb2_grpc.EvaluatorServiceStub(open_before).GetServerInfo
        info(evaluator_pb2.GetServerInfoRequest(), timeout=30)

        publish(tls, {"tls.key": two["server"][0], "tls.crt": two["server"][1]})  # cert-manager renewed it
        changed = time.monotonic()  # after the files are in place
        changes_within_interval(changed, lambda: call(running.port, trusts_two) == "OK")
        assert call(running.port, trusts_one) == "UNAVAILABLE"  # new connections get certificate 2 only
        # a connection opened before keeps its session (until it reaches --max-connection-age-ms)
        info(evaluator_pb2.GetServerInfoRequest(), timeout=30)
        open_before.close()
    finally:
        running.stop(grace=0)


def test_a_bad_certificate_keeps_the_previous_one_serving(pki, tiny_bundle_dir, tmp_path, caplog):
    one, two = pki["one"], pki["two"]
    tls, running = _serving_certificate_one(pki, tiny_bundle_dir, tmp_path)
    trusts_one, trusts_two = (grpc.ssl_channel_credentials(ca["ca"]) for ca in (one, two))
    caplog.set_level(logging.WARNING, logger="ice.server")
    try:
        assert call(running.port, trusts_one) == "OK"
        for label, files in (
            ("garbage", {"tls.key": b"not a key", "tls.crt": b"-----BEGIN CERTIFICATE-----\ngarbage\n"}),
            ("a certificate without its key", {"tls.key": one["server"][0], "tls.crt": two["server"][1]}),
            ("an empty certificate", {"tls.key": two["server"][0], "tls.crt": b""}),
        ):
            caplog.clear()
            publish(tls, files)
            changed = time.monotonic()  # after the files are in place
            stays_through_a_check(changed, lambda: call(running.port, trusts_one) == "OK")
            assert any("keeping the previous certificate" in r.getMessage() for r in caplog.records), label
        # a good pair after the bad ones is taken up
        publish(tls, {"tls.key": two["server"][0], "tls.crt": two["server"][1]})
        changed = time.monotonic()  # after the files are in place
        changes_within_interval(changed, lambda: call(running.port, trusts_two) == "OK")
    finally:
        running.stop(grace=0)


def test_a_rotated_client_ca_accepts_its_clients_and_refuses_the_old_ones(
    pki, tiny_bundle_dir, tmp_path, caplog
):
    one, two = pki["one"], pki["two"]
    server_key, server_cert = one["server"]
    tls = tmp_path / "tls"
    publish(tls, {"tls.key": server_key, "tls.crt": server_cert, "ca.crt": one["ca"]})
    running = _start(tiny_bundle_dir, tls, mutual=True)
    client_one = grpc.ssl_channel_credentials(one["ca"], *one["client"])
    client_two = grpc.ssl_channel_credentials(one["ca"], *two["client"])
    try:
        assert call(running.port, client_one) == "OK"
        assert call(running.port, client_two) == "UNAVAILABLE"

        publish(tls, {"tls.key": server_key, "tls.crt": server_cert, "ca.crt": two["ca"]})
        changed = time.monotonic()  # after the files are in place
        changes_within_interval(changed, lambda: call(running.port, client_two) == "OK")
        assert call(running.port, client_one) == "UNAVAILABLE"
        # a CA file that does not parse keeps CA 2, and the service says so
        caplog.set_level(logging.WARNING, logger="ice.server")
        publish(tls, {"tls.key": server_key, "tls.crt": server_cert, "ca.crt": b"no CA here"})
        changed = time.monotonic()  # after the files are in place
        stays_through_a_check(changed, lambda: call(running.port, client_two) == "OK")
        assert any("keeping the previous certificate" in r.getMessage() for r in caplog.records)
    finally:
        running.stop(grace=0)


def test_a_rotated_token_is_required_from_the_next_interval_and_an_emptied_file_keeps_it(
    pki, tiny_bundle_dir, tmp_path
):
    """With no overlap (`--auth-token-overlap-s 0`, the setting for a leaked token) the replaced token is refused
    from the next check on."""
    one = pki["one"]
    tls, secret = tmp_path / "tls", tmp_path / "auth"
    publish(tls, {"tls.key": one["server"][0], "tls.crt": one["server"][1]})
    publish(secret, {"token": b"first-token\n"})
    running = _start(tiny_bundle_dir, tls, auth_token_file=secret / "token", auth_token_overlap_s=0)
    creds = grpc.ssl_channel_credentials(one["ca"])
    try:
        assert call(running.port, creds, "first-token") == "OK"
        assert call(running.port, creds, "second-token") == "UNAUTHENTICATED"

        publish(secret, {"token": b"second-token\n"})
        changed = time.monotonic()  # after the files are in place
        changes_within_interval(changed, lambda: call(running.port, creds, "second-token") == "OK")
        assert call(running.port, creds, "first-token") == "UNAUTHENTICATED"

        for label, files in (("emptied", {"token": b"\n"}), ("without the key", {"other": b"x"})):
            publish(secret, files)
            changed = time.monotonic()  # after the files are in place
            stays_through_a_check(changed, lambda: call(running.port, creds, "second-token") == "OK")
            assert call(running.port, creds, "first-token") == "UNAUTHENTICATED", label
            assert call(running.port, creds) == "UNAUTHENTICATED", label
    finally:
        running.stop(grace=0)


def test_the_replaced_token_is_accepted_for_the_overlap_then_refused(pki, tiny_bundle_dir, tmp_path):
    overlap = 2.0
    one = pki["one"]
    tls, secret = tmp_path / "tls", tmp_path / "auth"
    publish(tls, {"tls.key": one["server"][0], "tls.crt": one["server"][1]})
    publish(secret, {"token": b"first-token\n"})
    running = _start(tiny_bundle_dir, tls, auth_token_file=secret / "token", auth_token_overlap_s=overlap)
    creds = grpc.ssl_channel_credentials(one["ca"])
    try:
        publish(secret, {"token": b"second-token\n"})
        changed = time.monotonic()  # after the files are in place
        changes_within_interval(changed, lambda: call(running.port, creds, "second-token") == "OK")
        # the server took the change at or after `changed`: the old token holds until `changed + overlap` at least
        while (started := time.monotonic()) < changed + overlap - 0.5:
            assert call(running.port, creds, "first-token") == "OK", f"refused {started - changed:.2f}s after"
            time.sleep(0.1)
        # and is refused once the overlap has run out (the change was taken within a reload interval)
        time.sleep(max(0.0, changed + overlap + RELOAD_S + 0.2 - time.monotonic()))
        assert call(running.port, creds, "first-token") == "UNAUTHENTICATED"
        assert call(running.port, creds, "second-token") == "OK"
        # a call carrying several tokens gets through when one of them is accepted, and only then
        assert call(running.port, creds, "first-token", "second-token") == "OK"
        assert call(running.port, creds, "first-token", "no-token") == "UNAUTHENTICATED"
    finally:
        running.stop(grace=0)


@pytest.mark.parametrize("transport", ["tls", "plaintext", "tls-asyncio"])
def test_a_client_given_a_token_file_follows_its_rotation_without_a_restart(
    transport, pki, tiny_bundle_dir, tmp_path
):
    """The SDK (and so `ice --token-file`, a batch Job) reads its token file again when it changes: the same client
    object keeps getting through, on every call, while the token is rotated in the two pods' Secrets in either
    order (the kubelet updates each pod's copy at its own time; the overlaps of both sides cover the gap), and an
    emptied client file keeps the last token."""
    import asyncio

    from client.aio import AsyncIceClient
    from client.channel import ChannelConfig
    from client.errors import ServiceError
    from client.sdk import IceClient

    one = pki["one"]
    tls, server_secret, client_secret = tmp_path / "tls", tmp_path / "server-auth", tmp_path / "client-auth"
    publish(tls, {"tls.key": one["server"][0], "tls.crt": one["server"][1]})
    (tmp_path / "ca.pem").write_bytes(one["ca"])
    for secret in (server_secret, client_secret):
        publish(secret, {"token": b"first-token\n"})
    secure = transport.startswith("tls")
    running = (_start(tiny_bundle_dir, tls, auth_token_file=server_secret / "token") if secure else
               start_inprocess("evaluator", tiny_bundle_dir, auth_token_file=server_secret / "token",
                               credentials_reload_s=RELOAD_S))
    config = ChannelConfig(root_certificates=tmp_path / "ca.pem" if secure else None,
                           token_file=client_secret / "token")
    target = f"localhost:{running.port}"
    loop = asyncio.new_event_loop()
    client = AsyncIceClient(evaluator=target, config=config) if transport == "tls-asyncio" else \
        IceClient(evaluator=target, token_file=client_secret / "token", root_certificates=config.root_certificates)

    def gets_through() -> bool:
        try:
            if isinstance(client, AsyncIceClient):
                loop.run_until_complete(client.server_info("evaluator"))
            else:
                client.server_info("evaluator")
            return True
        except ServiceError as error:
            assert error.code == grpc.StatusCode.UNAUTHENTICATED, error
            return False

    try:
        assert gets_through()
        # the server's copy first: the client still sends the first token, which the server accepts meanwhile
        publish(server_secret, {"token": b"second-token\n"})
        stays_through_a_check(time.monotonic(), gets_through)
        publish(client_secret, {"token": b"second-token\n"})
        assert gets_through() and client.config.bearer()() == "second-token"
        # the client's copy first: it sends the new token and the one it replaced, which the server still takes
        publish(client_secret, {"token": b"third-token\n"})
        assert gets_through() and client.config.bearer()() == "third-token"
        assert client.config.authorization()() == (("authorization", "Bearer third-token"),
                                                   ("authorization", "Bearer second-token"))
        publish(server_secret, {"token": b"third-token\n"})
        stays_through_a_check(time.monotonic(), gets_through)

        publish(client_secret, {"token": b"\n"})  # emptied on the client's side: the last token stays
        assert gets_through() and client.config.bearer()() == "third-token"
    finally:
        if isinstance(client, AsyncIceClient):
            loop.run_until_complete(client.close())
        else:
            client.close()
        loop.close()
        running.stop(grace=0)


def test_a_client_sends_the_replaced_token_only_during_its_overlap(tmp_path):
    from client.channel import ChannelConfig

    publish(tmp_path / "auth", {"token": b"first\n"})
    configs = {overlap: ChannelConfig(token_file=tmp_path / "auth" / "token", token_overlap_s=overlap)
               for overlap in (0.0, 0.5)}
    assert {o: c.authorization()() for o, c in configs.items()} == {
        o: (("authorization", "Bearer first"),) for o in configs}
    publish(tmp_path / "auth", {"token": b"second\n"})
    assert configs[0.0].authorization()() == (("authorization", "Bearer second"),)
    assert configs[0.5].authorization()() == (("authorization", "Bearer second"), ("authorization", "Bearer first"))
    time.sleep(0.6)
    assert configs[0.5].authorization()() == (("authorization", "Bearer second"),)
    assert ChannelConfig(token="fixed").authorization()() == (("authorization", "Bearer fixed"),)
    assert ChannelConfig().authorization() is None
    with pytest.raises(ValueError, match="token_overlap_s"):
        ChannelConfig(token="t", token_overlap_s=-1)


def test_a_token_file_that_cannot_be_used_is_refused_when_the_client_is_made(tmp_path):
    from client.channel import ChannelConfig

    with pytest.raises(ValueError, match="cannot read the token file"):
        ChannelConfig(token_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        ChannelConfig(token_file=tmp_path / "empty")
    (tmp_path / "token").write_text("t\n")
    with pytest.raises(ValueError, match="not both"):
        ChannelConfig(token="t", token_file=tmp_path / "token")


def test_files_unusable_at_start_refuse_to_start_instead_of_serving_without_them(pki, tmp_path):
    from services.common.credentials import server_credentials, token_source
    from services.common.settings import from_sources

    one, two = pki["one"], pki["two"]
    (tmp_path / "token").write_text("\n")
    with pytest.raises(SystemExit, match="is empty"):  # not: auth silently off
        token_source(from_sources(env={}, auth_token_file=tmp_path / "token"))
    publish(tmp_path / "tls", {"tls.key": one["server"][0], "tls.crt": two["server"][1], "ca.crt": b"x"})
    tls = {"tls_cert": tmp_path / "tls" / "tls.crt", "tls_key": tmp_path / "tls" / "tls.key"}
    with pytest.raises(SystemExit, match="KEY_VALUES_MISMATCH|key values mismatch"):
        server_credentials(from_sources(env={}, **tls))
    publish(tmp_path / "tls", {"tls.key": one["server"][0], "tls.crt": one["server"][1], "ca.crt": b"x"})
    assert server_credentials(from_sources(env={}, **tls)) is not None
    with pytest.raises(SystemExit, match="unusable TLS files"):
        server_credentials(from_sources(env={}, tls_client_ca=tmp_path / "tls" / "ca.crt", **tls))
    with pytest.raises(SystemExit, match="credentials-reload-s"):
        from_sources(env={"ICE_CREDENTIALS_RELOAD_S": "-1"})
