"""The protobuf contract (protos/ice/**): generated code up to date, API conventions, LRO annotation.

Conventions checked are those of ECOSYSTEM.md (Google AIPs / buf STANDARD lint): versioned packages,
`...Service` names, one `<Rpc>Request`/`<Rpc>Response` pair per RPC, `<ENUM>_UNSPECIFIED = 0` enums with
prefixed values, and a comment on every element of the contract.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
from google.longrunning import operations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool

from ice.common.v1 import common_pb2
from ice.evaluator.v1 import evaluator_pb2
from ice.learner.v1 import learner_pb2
from ice.localizer.v1 import localizer_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
FILES = [common_pb2.DESCRIPTOR, localizer_pb2.DESCRIPTOR, learner_pb2.DESCRIPTOR, evaluator_pb2.DESCRIPTOR]
# RPCs allowed to return something other than `<Rpc>Response` (AIP-151 long-running operations).
LRO_METHODS = {"ice.learner.v1.LearnerService.CreateLearningJob": "google.longrunning.Operation"}


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("ice_protos_generate", PROTOS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def _all_messages(container):
    for message in container.message_types_by_name.values():
        yield message
        yield from _nested_messages(message)


def _nested_messages(message):
    for nested in message.nested_types:
        yield nested
        yield from _nested_messages(nested)


def _all_enums(file):
    yield from file.enum_types_by_name.values()
    for message in _all_messages(file):
        yield from message.enum_types


# (a) generated code -------------------------------------------------------------------------------------


def test_the_four_protos_are_the_contract(generator):
    assert [p.as_posix() for p in generator.proto_files()] == [
        "ice/common/v1/common.proto",
        "ice/evaluator/v1/evaluator.proto",
        "ice/learner/v1/learner.proto",
        "ice/localizer/v1/localizer.proto",
    ]


def test_committed_generated_code_is_up_to_date(generator):
    problems = generator.check()
    assert not problems, "run `python protos/generate.py`:\n" + "\n".join(problems)


def test_check_detects_a_proto_edited_without_regenerating(generator, tmp_path):
    shutil.copytree(PROTOS / "ice", tmp_path / "ice", ignore=shutil.ignore_patterns("__pycache__"))
    assert generator.check(tmp_path, tmp_path) == []
    with (tmp_path / "ice/common/v1/common.proto").open("a") as f:
        f.write("\n// Added without regenerating.\nmessage Extra {\n  // A field.\n  string x = 1;\n}\n")
    (tmp_path / "ice/localizer/v1/localizer_pb2_grpc.py").unlink()
    problems = generator.check(tmp_path, tmp_path)
    assert "stale: ice/common/v1/common_pb2.py" in problems
    assert "missing: ice/localizer/v1/localizer_pb2_grpc.py" in problems


def test_generation_is_deterministic(generator, tmp_path):
    first = generator.generate(tmp_path / "a")
    second = generator.generate(tmp_path / "b")
    assert first == second
    for rel in first:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


# (b) conventions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_packages_are_versioned_and_match_their_directory(file):
    assert re.fullmatch(r"ice\.[a-z]+\.v1", file.package), file.package
    assert Path(file.name).parent.as_posix() == file.package.replace(".", "/")


def test_every_service_and_rpc_follows_the_naming_conventions():
    services = [service for file in FILES for service in file.services_by_name.values()]
    assert {s.full_name for s in services} == {
        "ice.localizer.v1.LocalizerService",
        "ice.learner.v1.LearnerService",
        "ice.evaluator.v1.EvaluatorService",
    }
    used: set[str] = set()
    for service in services:
        assert service.name.endswith("Service"), service.full_name
        package = service.file.package
        assert "GetServerInfo" in service.methods_by_name, service.full_name
        for method in service.methods:
            assert method.input_type.full_name == f"{package}.{method.name}Request", method.full_name
            expected_output = LRO_METHODS.get(method.full_name, f"{package}.{method.name}Response")
            assert method.output_type.full_name == expected_output, method.full_name
            for message in (method.input_type, method.output_type):
                if message.file.package == package:
                    assert message.full_name not in used, f"{message.full_name} serves two RPCs"
                    used.add(message.full_name)


def test_streaming_shapes():
    learner = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].methods_by_name
    evaluator = evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].methods_by_name
    shapes = {
        learner["WatchLearningJob"]: (False, True),
        learner["GetArtifacts"]: (False, True),
        learner["Generate"]: (False, True),
        learner["CreateLearningJob"]: (False, False),
        evaluator["EvaluateSet"]: (True, False),
        evaluator["Evaluate"]: (False, False),
    }
    for method, shape in shapes.items():
        assert (method.client_streaming, method.server_streaming) == shape, method.full_name


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_enums_have_unspecified_zero_and_prefixed_values(file):
    for enum in _all_enums(file):
        prefix = _upper_snake(enum.name) + "_"
        first = enum.values[0]
        assert (first.name, first.number) == (prefix + "UNSPECIFIED", 0), enum.full_name
        for value in enum.values[1:]:
            assert value.name.startswith(prefix) and value.number > 0, value.name


def test_images_and_masks_are_bytes_never_repeated_numbers():
    numeric = {
        descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
        descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
        descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
        descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
        descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
        descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    }
    image_like = re.compile(r"(?!num_|max_)(\w+_)?(image|images|mask|masks)|chunk|predicted|ground_truth")
    for file in FILES:
        for message in _all_messages(file):
            for field in message.fields:
                if field.is_repeated and field.type in numeric:
                    pytest.fail(f"repeated number field {field.full_name}")
                if image_like.fullmatch(field.name):
                    assert field.type == descriptor_pb2.FieldDescriptorProto.TYPE_BYTES, field.full_name


def test_every_element_is_documented(generator, tmp_path):
    """Every message, field, enum, enum value, service and RPC carries a leading comment."""
    from grpc_tools import protoc

    out = tmp_path / "set.binpb"
    include = [
        f"--proto_path={PROTOS}",
        f"--proto_path={generator._googleapis_root()}",
        f"--proto_path={generator._well_known_root()}",
        f"--proto_path={tmp_path}",
    ]
    generator._stage_renamed_protos(generator._googleapis_root(), tmp_path)
    files = [p.as_posix() for p in generator.proto_files()]
    assert (
        protoc.main(["protoc", *include, "--include_source_info", f"--descriptor_set_out={out}", *files]) == 0
    )
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())

    undocumented = []
    for file in descriptor_set.file:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}

        def need(path, what, comments=comments, file_name=file.name):
            if not comments.get(tuple(path)):
                undocumented.append(f"{file_name}: {what}")

        def walk_message(message, path, scope):
            name = f"{scope}.{message.name}"
            need(path, name)
            for i, field in enumerate(message.field):
                need([*path, 2, i], f"{name}.{field.name}")
            for i, nested in enumerate(message.nested_type):
                if not nested.options.map_entry:
                    walk_message(nested, [*path, 3, i], name)
            for i, enum in enumerate(message.enum_type):
                walk_enum(enum, [*path, 4, i], name)

        def walk_enum(enum, path, scope):
            name = f"{scope}.{enum.name}"
            need(path, name)
            for i, value in enumerate(enum.value):
                need([*path, 2, i], f"{name}.{value.name}")

        for i, message in enumerate(file.message_type):
            walk_message(message, [4, i], file.package)
        for i, enum in enumerate(file.enum_type):
            walk_enum(enum, [5, i], file.package)
        for i, service in enumerate(file.service):
            need([6, i], service.name)
            for j, method in enumerate(service.method):
                need([6, i, 2, j], f"{service.name}.{method.name}")
    assert not undocumented, "\n".join(undocumented)


# (c) long-running operation annotation -------------------------------------------------------------------


def test_create_learning_job_declares_its_operation_types():
    method = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].methods_by_name["CreateLearningJob"]
    assert method.output_type.full_name == "google.longrunning.Operation"
    options = method.GetOptions()
    assert options.HasExtension(operations_pb2.operation_info)
    info = options.Extensions[operations_pb2.operation_info]
    pool = descriptor_pool.Default()
    resolved = {}
    for kind, type_name in (("response", info.response_type), ("metadata", info.metadata_type)):
        assert type_name, f"operation_info.{kind}_type is empty"
        # AIP-151: a name without a package refers to the service's own package.
        full_name = type_name if "." in type_name else f"{method.containing_service.file.package}.{type_name}"
        resolved[kind] = pool.FindMessageTypeByName(full_name)
    assert resolved["response"] is learner_pb2.LearningJobResult.DESCRIPTOR
    assert resolved["metadata"] is learner_pb2.LearningJobMetadata.DESCRIPTOR


def test_operation_packs_metadata_and_result():
    metadata = learner_pb2.LearningJobMetadata(
        job_id="j1",
        state=learner_pb2.JOB_STATE_RUNNING,
        phase=learner_pb2.PHASE_INTRINSIC,
        step=450,
        total_steps=1100,
        losses={"total": 0.125},
    )
    operation = operations_pb2.Operation(name="operations/j1")
    operation.metadata.Pack(metadata)
    operation.response.Pack(learner_pb2.LearningJobResult(job_id="j1"))
    back = operations_pb2.Operation.FromString(operation.SerializeToString())
    unpacked = learner_pb2.LearningJobMetadata()
    assert back.metadata.Unpack(unpacked) and unpacked == metadata
    assert back.response.Is(learner_pb2.LearningJobResult.DESCRIPTOR)


# (d) serialisation ----------------------------------------------------------------------------------------


def test_localize_request_round_trip():
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    request = localizer_pb2.LocalizeRequest(
        image=png,
        options=localizer_pb2.LocalizeOptions(
            max_rounds=3,
            remaining_fraction_threshold=0.25,
            seed=2**63 + 5,
            max_concepts=0,
            refinement=localizer_pb2.REFINEMENT_NONE,
        ),
    )
    wire = request.SerializeToString(deterministic=True)
    back = localizer_pb2.LocalizeRequest.FromString(wire)
    assert back == request
    assert back.image == png
    options = back.options
    assert options.max_rounds == 3 and options.seed == 2**63 + 5
    assert options.remaining_fraction_threshold == pytest.approx(0.25)
    # proto3 `optional`: an explicit zero is distinguishable from "unset = server default".
    assert options.HasField("max_concepts") and options.max_concepts == 0
    assert not options.HasField("l1_penalty") and not options.HasField("timestep")
    assert options.refinement == localizer_pb2.REFINEMENT_NONE


def test_unknown_enum_values_survive_parsing_so_servers_must_reject_them():
    wire = localizer_pb2.LocalizeOptions(refinement=localizer_pb2.REFINEMENT_KMEANS).SerializeToString()
    patched = wire.replace(bytes([0x50, localizer_pb2.REFINEMENT_KMEANS]), bytes([0x50, 99]))
    options = localizer_pb2.LocalizeOptions.FromString(patched)
    assert options.refinement == 99
    assert localizer_pb2.Refinement.DESCRIPTOR.values_by_number.get(options.refinement) is None
