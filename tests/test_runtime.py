"""The shared gRPC runtime, through real gRPC on loopback: health, reflection, metrics, errors, auth, TLS,
concurrency cap and graceful shutdown. The servicer here is a test double on the real LocalizerService
contract; the runtime under test is the production one."""

from __future__ import annotations

import datetime as dt
import threading
import time
import urllib.request

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.server import ServiceSpec, start_server
from services.common.settings import from_sources

SERVICE = "ice.localizer.v1.LocalizerService"


class FakeLocalizer(localizer_pb2_grpc.LocalizerServiceServicer):
    """"slow" calls hold until `release` is set; `entered` counts the calls that reached the servicer."""

    def __init__(self):
        self.release = threading.Event()
        self._entered = 0
        self._cond = threading.Condition()

    def wait_entered(self, n: int, timeout: float = 60) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._entered >= n, timeout)

    def Localize(self, request, context):
        kind = request.image.decode(errors="replace")
        if kind == "bad":
            raise InvalidArgument("is not a decodable image", field="image")
        if kind == "big":
            raise ResourceExhausted("too large", field="image")
        if kind == "crash":
            raise RuntimeError("secret internal detail")
        if kind == "slow":
            with self._cond:
                self._entered += 1
                self._cond.notify_all()
            self.release.wait(60)
        return localizer_pb2.LocalizeResponse(width=7, height=9)


def _start(load=lambda: None, ready_check=None, **overrides):
    fake = FakeLocalizer()
    spec = ServiceSpec(
        name="localizer",
        service_names=[SERVICE],
        register=lambda server: localizer_pb2_grpc.add_LocalizerServiceServicer_to_server(fake, server),
        load=load,
        ready_check=ready_check,
    )
    # port -1: any free port, read back from the running server (no race for a port picked beforehand)
    settings = from_sources(env={}, **{"host": "127.0.0.1", "port": -1, "metrics_port": 0, **overrides})
    return start_server(spec, settings), fake


def _health(channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status


def _until(predicate, timeout: float = 60) -> bool:
    """Poll a condition (no fixed sleep decides the outcome; the timeout only bounds a failure)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def server():
    running, fake = _start()
    assert running.wait_ready(60)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, fake, channel
    channel.close()
    running.stop(grace=0)


def test_health_not_serving_until_loaded_then_serving():
    loaded = threading.Event()
    running, _ = _start(load=lambda: loaded.wait(10))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
            assert _health(ch, "liveness") == serving
            assert _health(ch, "readiness") == not_serving
            assert _health(ch, "") == not_serving
            assert _health(ch, SERVICE) == not_serving
            # calls before readiness are refused as retryable
            with pytest.raises(grpc.RpcError) as err:
                localizer_pb2_grpc.LocalizerServiceStub(ch).Localize(localizer_pb2.LocalizeRequest(image=b"x"), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            loaded.set()
            assert running.wait_ready(60)
            assert _health(ch, "readiness") == serving
            assert _health(ch, SERVICE) == serving
    finally:
        running.stop(grace=0)


def test_ready_check_drives_readiness_after_load():
    healthy = threading.Event()
    healthy.set()
    running, _ = _start(ready_check=healthy.is_set)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        assert running.wait_ready(60)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            assert _health(ch, "readiness") == serving
            healthy.clear()  # e.g. the learner's job store became unwritable
            assert _until(lambda: _health(ch, "readiness") == not_serving)
            assert _health(ch, "liveness") == serving
            healthy.set()
            assert _until(lambda: _health(ch, "readiness") == serving)
    finally:
        running.stop(grace=0)


def test_failed_load_turns_liveness_off():
    def broken():
        raise RuntimeError("bundle missing diffusion/unet/config.json")

    running, _ = _start(load=broken)
    try:
        assert not running.wait_ready(60)
        assert running.failed.is_set()
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            assert _health(ch, "liveness") == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        running.stop(grace=0)


def test_reflection_lists_the_service(server):
    running, _, channel = server
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert SERVICE in names and "grpc.health.v1.Health" in names


def test_domain_errors_map_to_codes_with_field_violations(server):
    _, _, channel = server
    stub = localizer_pb2_grpc.LocalizerServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Localize(localizer_pb2.LocalizeRequest(image=b"bad"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "image"

    with pytest.raises(grpc.RpcError) as err:
        stub.Localize(localizer_pb2.LocalizeRequest(image=b"big"), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    with pytest.raises(grpc.RpcError) as err:
        stub.Localize(localizer_pb2.LocalizeRequest(image=b"crash"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in err.value.details()
    # and the service keeps serving
    assert stub.Localize(localizer_pb2.LocalizeRequest(image=b"ok"), timeout=30).width == 7


def test_unimplemented_method_is_unimplemented(server):
    _, _, channel = server
    with pytest.raises(grpc.RpcError) as err:
        localizer_pb2_grpc.LocalizerServiceStub(channel).GetServerInfo(localizer_pb2.GetServerInfoRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_port_minus_one_binds_a_free_port_and_reports_it():
    running, _ = _start(metrics_port=-1)
    try:
        assert running.wait_ready(60)
        assert running.port > 0 and running.metrics_port > 0 and running.port != running.metrics_port
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            assert _health(ch, "readiness") == health_pb2.HealthCheckResponse.SERVING
        body = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=30).read()
        assert b"ice_ready" in body
    finally:
        running.stop(grace=0)


def test_metrics_in_prometheus_text_format():
    running, _ = _start(metrics_port=-1)
    try:
        assert running.wait_ready(60)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = localizer_pb2_grpc.LocalizerServiceStub(ch)
            stub.Localize(localizer_pb2.LocalizeRequest(image=b"ok"), timeout=30)
            with pytest.raises(grpc.RpcError):
                stub.Localize(localizer_pb2.LocalizeRequest(image=b"bad"), timeout=30)
        body = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=30).read().decode()
    finally:
        running.stop(grace=0)
    labels = 'grpc_method="Localize",grpc_service="ice.localizer.v1.LocalizerService",grpc_type="unary"'
    assert "# TYPE grpc_server_handled_total counter" in body
    assert f"grpc_server_started_total{{{labels}}}" in body
    assert f'grpc_server_handled_total{{grpc_code="OK",{labels}}}' in body
    assert f'grpc_server_handled_total{{grpc_code="INVALID_ARGUMENT",{labels}}}' in body
    assert "grpc_server_handling_seconds_bucket{" in body
    assert 'ice_ready{service="localizer"} 1.0' in body


def test_token_required_and_health_exempt():
    running, _ = _start(auth_token="s3cret-token")
    try:
        assert running.wait_ready(60)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = localizer_pb2_grpc.LocalizerServiceStub(ch)
            req = localizer_pb2.LocalizeRequest(image=b"ok")
            for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "Basic s3cret-token")]):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Localize(req, timeout=30, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.Localize(req, timeout=30, metadata=[("authorization", "Bearer s3cret-token")]).width == 7
            assert _health(ch, "readiness") == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(grace=0)


def _make_ca(tmp_path, name):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name, server: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
        )
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return pem_key(key), cert.public_bytes(serialization.Encoding.PEM)

    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (tmp_path / f"{name}-ca.pem").write_bytes(ca_pem)
    return ca_pem, leaf


def test_tls_and_mutual_tls(tmp_path):
    ca_pem, leaf = _make_ca(tmp_path, "good")
    server_key, server_cert = leaf("localhost", server=True)
    client_key, client_cert = leaf("client", server=False)
    _, other_leaf = _make_ca(tmp_path, "other")
    rogue_key, rogue_cert = other_leaf("rogue", server=False)
    for name, data in (("server.key", server_key), ("server.pem", server_cert)):
        (tmp_path / name).write_bytes(data)

    # TLS: a client trusting the CA succeeds
    running, _ = _start(tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key")
    try:
        assert running.wait_ready(60)
        creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        with grpc.secure_channel(f"localhost:{running.port}", creds) as ch:
            stub = localizer_pb2_grpc.LocalizerServiceStub(ch)
            assert stub.Localize(localizer_pb2.LocalizeRequest(image=b"ok"), timeout=10).width == 7
        with grpc.insecure_channel(f"localhost:{running.port}") as ch:  # plaintext to a TLS port fails
            with pytest.raises(grpc.RpcError):
                localizer_pb2_grpc.LocalizerServiceStub(ch).Localize(localizer_pb2.LocalizeRequest(image=b"ok"), timeout=30)
    finally:
        running.stop(grace=0)

    # mTLS: a certificate from our CA is accepted; none, or one from another CA, is refused
    running, _ = _start(
        tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key", tls_client_ca=tmp_path / "good-ca.pem"
    )
    try:
        assert running.wait_ready(60)
        req = localizer_pb2.LocalizeRequest(image=b"ok")
        good = grpc.ssl_channel_credentials(ca_pem, private_key=client_key, certificate_chain=client_cert)
        with grpc.secure_channel(f"localhost:{running.port}", good) as ch:
            assert localizer_pb2_grpc.LocalizerServiceStub(ch).Localize(req, timeout=10).width == 7
        for creds in (
            grpc.ssl_channel_credentials(ca_pem),
            grpc.ssl_channel_credentials(ca_pem, private_key=rogue_key, certificate_chain=rogue_cert),
        ):
            with grpc.secure_channel(f"localhost:{running.port}", creds) as ch:
                with pytest.raises(grpc.RpcError) as err:
                    localizer_pb2_grpc.LocalizerServiceStub(ch).Localize(req, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0)


def test_plaintext_health_port_beside_tls_serves_health_and_nothing_else(tmp_path):
    ca_pem, leaf = _make_ca(tmp_path, "hp")
    key, cert = leaf("localhost", server=True)
    (tmp_path / "k").write_bytes(key)
    (tmp_path / "c").write_bytes(cert)
    running, _ = _start(tls_cert=tmp_path / "c", tls_key=tmp_path / "k", health_port=-1, auth_token="s3cret")
    try:
        assert running.wait_ready(60)
        assert running.health_port not in (None, 0, running.port)
        with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as ch:
            for name in ("readiness", "liveness", SERVICE):  # every health name, plaintext, no token
                assert _health(ch, name) == health_pb2.HealthCheckResponse.SERVING
            # the service itself, and reflection, are not there (with or without the token)
            for metadata in (None, [("authorization", "Bearer s3cret")]):
                with pytest.raises(grpc.RpcError) as err:
                    localizer_pb2_grpc.LocalizerServiceStub(ch).Localize(
                        localizer_pb2.LocalizeRequest(image=b"ok"), timeout=30, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as err:
                list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # the main port is TLS only: the same plaintext health call there fails
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch, pytest.raises(grpc.RpcError) as err:
            _health(ch, "readiness")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0)
    # the health port follows the server: stopped with it
    with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as ch, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2)


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(server):
    running, fake, channel = server
    stub = localizer_pb2_grpc.LocalizerServiceStub(channel)
    future = stub.Localize.future(localizer_pb2.LocalizeRequest(image=b"slow"), timeout=120)
    assert fake.wait_entered(1)
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 60})
    stopper.start()

    # new calls on a fresh connection are refused while draining: first by the readiness gate ("not ready"), then
    # by gRPC itself once its shutdown has begun (no new connection). Polled until the latter, so that the
    # in-flight call is checked after the server was told to stop, not merely after readiness went down.
    def refused() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as fresh:
            try:
                localizer_pb2_grpc.LocalizerServiceStub(fresh).Localize(localizer_pb2.LocalizeRequest(image=b"ok"),
                                                                        timeout=10)
            except grpc.RpcError as err:
                # a call that arrives exactly as the drain begins may be CANCELLED by it; once the drain has
                # begun, every new call is UNAVAILABLE
                assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err
                return err.code() == grpc.StatusCode.UNAVAILABLE and "not ready" not in (err.details() or "")
            return False

    assert _until(refused)
    # the in-flight call is held by the gate: it stays pending through a second of the drain (a server that cut it
    # off would have cancelled it by then), and the server keeps draining
    held_until = time.monotonic() + 1.0
    while time.monotonic() < held_until:
        assert not future.done() and stopper.is_alive()
        time.sleep(0.05)
    fake.release.set()
    assert future.result().width == 7  # the in-flight call completed
    stopper.join(60)
    assert not stopper.is_alive()


def test_concurrency_cap_answers_resource_exhausted():
    running, fake = _start(max_concurrent_rpcs=2)
    try:
        assert running.wait_ready(60)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = localizer_pb2_grpc.LocalizerServiceStub(ch)
            slow = [stub.Localize.future(localizer_pb2.LocalizeRequest(image=b"slow"), timeout=120) for _ in range(2)]
            assert fake.wait_entered(2)  # both slots are taken, held by the gate
            with pytest.raises(grpc.RpcError) as err:
                stub.Localize(localizer_pb2.LocalizeRequest(image=b"ok"), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            fake.release.set()
            assert all(f.result().width == 7 for f in slow)
    finally:
        running.stop(grace=0)


def test_settings_precedence_and_validation(tmp_path):
    import argparse

    from services.common.credentials import token_source
    from services.common.settings import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "6000"])
    s = from_sources(args, env={"ICE_PORT": "7000", "ICE_MAX_WORKERS": "3", "ICE_VERIFY_BUNDLE_HASHES": "yes"})
    assert s.port == 6000 and s.max_workers == 3 and s.verify_bundle_hashes is True
    with pytest.raises(SystemExit, match="ICE_MAX_WORKERS"):
        from_sources(env={"ICE_MAX_WORKERS": "many"})
    with pytest.raises(SystemExit, match="together"):
        from_sources(env={"ICE_TLS_CERT": str(tmp_path / "c")})
    (tmp_path / "tok").write_text("abc\n")
    assert token_source(from_sources(env={"ICE_AUTH_TOKEN_FILE": str(tmp_path / "tok")}))() == ("abc",)
    assert from_sources(env={"ICE_AUTH_TOKEN": "zzz"}).redacted()["auth_token"] == "***"


def test_settings_doc_is_current():
    from pathlib import Path

    from services.common.settings import settings_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
    assert doc.read_text() == settings_markdown(), "regenerate: python -m services.common.settings > docs/settings.md"


def test_a_passed_deadline_stops_work_even_before_grpc_marks_the_call_inactive():
    from services.common.errors import Cancelled, DeadlineExceeded
    from services.common.interceptors import call_active, ensure_active, iter_with_context_check

    class Context:  # what a busy server sees: the deadline has passed, the event not yet processed
        def __init__(self, remaining, active):
            self.remaining, self.active = remaining, active

        def time_remaining(self):
            return self.remaining

        def is_active(self):
            return self.active

    expired, cancelled, fine, no_deadline = Context(-0.01, True), Context(5.0, False), Context(5.0, True), Context(None, True)
    assert not call_active(expired) and not call_active(cancelled)
    assert call_active(fine) and call_active(no_deadline)
    with pytest.raises(DeadlineExceeded):
        ensure_active(expired)
    with pytest.raises(Cancelled):
        ensure_active(cancelled)
    ensure_active(fine)
    assert list(iter_with_context_check(iter([1, 2]), expired)) == []
    assert list(iter_with_context_check(iter([1, 2]), fine)) == [1, 2]
