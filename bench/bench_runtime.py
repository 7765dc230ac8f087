"""Cost of the shared runtime: a unary RPC through the full interceptor chain (metrics, auth, readiness,
error mapping) against the same servicer on a bare grpc server, both on loopback in this process.
A ratio near 1 means the runtime adds little; below 1 is its overhead."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
from harness import BenchResult, timeit

from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc
from services.common.server import ServiceSpec, start_server
from services.common.settings import from_sources


class Echo(localizer_pb2_grpc.LocalizerServiceServicer):
    def Localize(self, request, context):
        return localizer_pb2.LocalizeResponse(width=len(request.image))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(quick: bool = False) -> list[BenchResult]:
    calls = 100 if quick else 500
    request = localizer_pb2.LocalizeRequest(image=b"x" * 1024)

    spec = ServiceSpec("localizer", ["ice.localizer.v1.LocalizerService"],
                       lambda s: localizer_pb2_grpc.add_LocalizerServiceServicer_to_server(Echo(), s))
    ours = start_server(spec, from_sources(env={}, host="127.0.0.1", port=_port(), metrics_port=0, auth_token="t"),
                        load_in_background=False)
    bare = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    localizer_pb2_grpc.add_LocalizerServiceServicer_to_server(Echo(), bare)
    bare_port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ours.port}") as c1, grpc.insecure_channel(f"127.0.0.1:{bare_port}") as c2:
            s1, s2 = localizer_pb2_grpc.LocalizerServiceStub(c1), localizer_pb2_grpc.LocalizerServiceStub(c2)
            md = [("authorization", "Bearer t")]

            def ours_batch():
                for _ in range(calls):
                    s1.Localize(request, metadata=md)

            def bare_batch():
                for _ in range(calls):
                    s2.Localize(request, metadata=md)

            t_ours = timeit(ours_batch, repeat=5) / calls
            t_bare = timeit(bare_batch, repeat=5) / calls
    finally:
        ours.stop(grace=0)
        bare.stop(0)
    return [BenchResult("runtime_unary_rpc_overhead", t_ours, t_bare, "bare grpc server, same servicer", unit="rpc")]
