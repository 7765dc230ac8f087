"""Security: no pickle on any path that reads user or bundle files (a source scan of services/ and client/),
bearer-token auth and mutual TLS on each of the three real services, and path traversal refused wherever a
name becomes a path (job names, bundle.json entries, the SDK's artifact names, the CLI's batch item ids).
Traversal in GetArtifacts file names is tested in test_bad_inputs_learner.py, which has a succeeded job."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ice.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc
from tests.reliability.corpus import TRAVERSAL_NAMES
from tests.reliability.harness import ROOT, make_ca, outcome, start_inprocess

# -- the source scan -------------------------------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "cloudpickle", "torch.serialization"}
# from_pretrained of these reads only JSON/text files (no weights), so it needs no use_safetensors=True
CONFIG_ONLY = ("Tokenizer", "TokenizerFast", "Scheduler", "ImageProcessor", "FeatureExtractor", "Processor", "Config")


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Every construct that can unpickle: imports of pickle-like modules, torch.load without weights_only=True,
    numpy loads with allow_pickle=True, pandas read_pickle, weight loaders without use_safetensors=True, and
    trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in PICKLE_MODULES or node.module.split(".")[0] in PICKLE_MODULES - {"torch.serialization"}:
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            callee = _name(node.func)
            method = callee.rsplit(".", 1)[-1]
            if callee == "torch.load" and _kw(node, "weights_only") is not True:
                found.append(f"{where}: torch.load without weights_only=True")
            if callee in ("np.load", "numpy.load") and _kw(node, "allow_pickle") not in (None, False):
                found.append(f"{where}: {callee}(allow_pickle=True)")
            if method in ("read_pickle", "loads") and callee.split(".")[0] in ("pd", "pandas", "pickle", "dill"):
                found.append(f"{where}: {callee}")
            if method == "from_pretrained":
                owner = callee.rsplit(".", 1)[0]
                if not owner.endswith(CONFIG_ONLY) and _kw(node, "use_safetensors") is not True:
                    found.append(f"{where}: {callee} without use_safetensors=True (would fall back to pickled .bin)")
            if _kw(node, "trust_remote_code") not in (None, False):
                found.append(f"{where}: trust_remote_code")
    return found


def test_no_pickle_on_any_load_path():
    files = sorted(p for d in ("services", "client") for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20
    findings = [f for p in files for f in unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert not findings, "\n".join(findings)


@pytest.mark.parametrize("source", [
    "import pickle", "import dill as d", "from joblib import load", "import torch\ntorch.load('x.pt')",
    "torch.load(f, weights_only=False)", "np.load('a.npy', allow_pickle=True)", "pd.read_pickle('x')",
    "UNet2DConditionModel.from_pretrained('d')", "AutoModel.from_pretrained('d', use_safetensors=False)",
    "AutoModel.from_pretrained('d', use_safetensors=True, trust_remote_code=True)",
])
def test_the_scan_finds_each_unsafe_construct(source):
    assert unsafe_loads(source), source


@pytest.mark.parametrize("source", [
    "torch.load(f, weights_only=True)", "np.load('a.npy')", "CLIPTokenizer.from_pretrained('d')",
    "ViTModel.from_pretrained('d', use_safetensors=True)", "from safetensors.torch import load_file",
])
def test_the_scan_accepts_safe_loads(source):
    assert not unsafe_loads(source), source


# -- bearer token and mutual TLS on every real service ---------------------------------------------------------------

TOKEN = "rel-test-token-7f3c"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca_pem, issue = make_ca("ice")
    server_key, server_cert = issue("localhost", server=True)
    client_key, client_cert = issue("client", server=False)
    _, rogue_issue = make_ca("rogue")
    rogue_key, rogue_cert = rogue_issue("client", server=False)
    for name, data in (("ca.pem", ca_pem), ("server.key", server_key), ("server.pem", server_cert)):
        (folder / name).write_bytes(data)
    return {"dir": folder, "ca": ca_pem, "client": (client_key, client_cert), "rogue": (rogue_key, rogue_cert)}


def _calls(service: str):
    """Each service's RPCs that must be guarded: (name, call(channel, metadata)) answering OK with the token."""
    if service == "localizer":
        def info(ch, md):
            return localizer_pb2_grpc.LocalizerServiceStub(ch).GetServerInfo(
                localizer_pb2.GetServerInfoRequest(), timeout=10, metadata=md)
        return [("GetServerInfo", info)]
    if service == "evaluator":
        from tests.reliability.corpus import mask_png

        def score(ch, md):
            mask = mask_png((16, 16))
            return evaluator_pb2_grpc.EvaluatorServiceStub(ch).ScoreMasks(
                evaluator_pb2.ScoreMasksRequest(predicted=[mask], ground_truth=[mask]), timeout=10, metadata=md)

        def info(ch, md):
            return evaluator_pb2_grpc.EvaluatorServiceStub(ch).GetServerInfo(
                evaluator_pb2.GetServerInfoRequest(), timeout=10, metadata=md)
        return [("ScoreMasks", score), ("GetServerInfo", info)]

    def info(ch, md):
        return learner_pb2_grpc.LearnerServiceStub(ch).GetServerInfo(
            learner_pb2.GetServerInfoRequest(), timeout=10, metadata=md)

    def list_ops(ch, md):  # the standard Operations service on the same server is guarded too
        return operations_pb2_grpc.OperationsStub(ch).ListOperations(
            operations_pb2.ListOperationsRequest(name="operations"), timeout=10, metadata=md)
    return [("GetServerInfo", info), ("ListOperations", list_ops)]


def _reflection(ch, md):
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=10, metadata=md)
    return [r.list_services_response for r in responses]


@pytest.mark.parametrize("service", ["localizer", "learner", "evaluator"])
def test_token_and_mutual_tls_guard_every_service(service, pki, tiny_bundle_dir, tmp_path):
    d = pki["dir"]
    extra = {"job_store": tmp_path / "jobs"} if service == "learner" else {}
    running = start_inprocess(service, tiny_bundle_dir, auth_token=TOKEN, tls_cert=d / "server.pem",
                              tls_key=d / "server.key", tls_client_ca=d / "ca.pem", **extra)
    target = f"localhost:{running.port}"
    good_md = [("authorization", f"Bearer {TOKEN}")]
    try:
        calls = [*_calls(service), ("reflection", _reflection)]
        client_key, client_cert = pki["client"]
        rogue_key, rogue_cert = pki["rogue"]
        # transport: no client certificate, or one from another CA, or plaintext: refused before any RPC runs
        for label, creds in (
            ("no client certificate", grpc.ssl_channel_credentials(pki["ca"])),
            ("certificate from another CA", grpc.ssl_channel_credentials(pki["ca"], rogue_key, rogue_cert)),
            ("plaintext", None),
        ):
            with (grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)) as ch:
                for name, call in calls:
                    result = outcome(lambda call=call, ch=ch: call(ch, good_md))
                    assert result.code == "UNAVAILABLE", f"{service} {name} with {label}: {result}"
        # the right certificate: the token decides
        creds = grpc.ssl_channel_credentials(pki["ca"], client_key, client_cert)
        with grpc.secure_channel(target, creds) as ch:
            for name, call in calls:
                for label, md in (("no token", None), ("a wrong token", [("authorization", "Bearer nope")]),
                                  ("the token without Bearer", [("authorization", TOKEN)]),
                                  ("the token's prefix", [("authorization", f"Bearer {TOKEN[:-1]}")])):
                    result = outcome(lambda call=call, md=md, ch=ch: call(ch, md))
                    assert result.code == "UNAUTHENTICATED", f"{service} {name} with {label}: {result}"
                result = outcome(lambda call=call, ch=ch: call(ch, good_md))
                assert result.code == "OK", f"{service} {name} with the right certificate and token: {result}"
    finally:
        running.stop(grace=0)


# -- path traversal ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learner(tiny_bundle_dir, tmp_path_factory):
    running = start_inprocess("learner", tiny_bundle_dir, job_store=tmp_path_factory.mktemp("jobs"))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield learner_pb2_grpc.LearnerServiceStub(channel), operations_pb2_grpc.OperationsStub(channel), running
    channel.close()
    running.stop(grace=0)


TRAVERSAL_JOB_NAMES = ["operations/../../etc/passwd", "operations/../jobs.sqlite", "../operations/x",
                       "/etc/passwd", "operations/" + "a" * 31 + "/", "operations/%2e%2e%2fetc",
                       "operations/\x00" + "a" * 31, "operations/" + "A" * 32, ""]


@pytest.mark.parametrize("name", TRAVERSAL_JOB_NAMES)
def test_job_names_with_traversal_are_refused_everywhere(learner, name):
    stub, ops, running = learner
    calls = {
        "WatchLearningJob": lambda: stub.WatchLearningJob(learner_pb2.WatchLearningJobRequest(name=name), timeout=10),
        "GetArtifacts": lambda: stub.GetArtifacts(learner_pb2.GetArtifactsRequest(name=name), timeout=10),
        "Generate": lambda: stub.Generate(learner_pb2.GenerateRequest(name=name), timeout=10),
        "GetOperation": lambda: ops.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10),
        "CancelOperation": lambda: ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name), timeout=10),
        "DeleteOperation": lambda: ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name), timeout=10),
        "WaitOperation": lambda: ops.WaitOperation(operations_pb2.WaitOperationRequest(name=name), timeout=10),
    }
    for rpc, call in calls.items():
        result = outcome(call)
        assert result.code == "INVALID_ARGUMENT" and result.field == "name", f"{rpc}({name!r}): {result}"
    # nothing outside the store was touched, and the store is intact
    assert (Path(running.settings.job_store) / "jobs.sqlite").is_file()


@pytest.mark.parametrize("entry", ["../outside.json", "/etc/passwd", "clip/../../x", "a\\..\\b"])
def test_bundle_json_with_traversal_is_refused(tiny_bundle_dir, tmp_path, entry):
    from services.common.bundle import Bundle
    from services.common.errors import BundleError

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["files"][entry] = {"sha256": "0" * 64, "size": 1}
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as err:
        Bundle.open(copy)
    assert entry in str(err.value) or "path" in str(err.value).lower()


@pytest.mark.parametrize("name", [*TRAVERSAL_NAMES, "masks/../../x", "", "a//../b"])
def test_sdk_refuses_artifact_names_that_leave_the_output_folder(tmp_path, name):
    from client.sdk import _safe_join

    try:
        path = _safe_join(tmp_path, name)
    except ValueError:
        return
    # accepted: it must name something strictly inside the folder (lexically: a NUL byte cannot be resolved,
    # and open() refuses it with ValueError, so it cannot reach the file system)
    inside = os.path.normpath(path)
    assert inside.startswith(str(tmp_path) + os.sep), path


def test_cli_batch_item_ids_stay_inside_the_output_folder(tmp_path):
    from client.batch import list_items

    names = ["../../escape", "/abs/olute", "a/../../b", "..", "x\x00y", "..\\..\\win", "ok"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": n, "image": f"img{i}.png"}) for i, n in enumerate(names)))
    items = list_items(manifest)
    assert len(items) == len(names)
    out = (tmp_path / "out").resolve()
    for item in items:
        folder = (out / item.id).resolve()
        assert folder.parent == out, f"{item.id!r} leaves the output folder"
        assert "\x00" not in item.id and "/" not in item.id and "\\" not in item.id
