"""Generate the Python code of the ice.* gRPC API from the .proto files under protos/ice/.

    python protos/generate.py            # (re)generate next to the .proto files (output root protos/)
    python protos/generate.py --out DIR  # generate under DIR instead (DIR/ice/<service>/v1/...)
    python protos/generate.py --check    # exit 1, listing every stale, missing or extra generated file

For every `ice/**/*.proto` it writes `*_pb2.py` (messages), `*_pb2.pyi` (type stubs) and `*_pb2_grpc.py`
(stubs and servicers) with the protoc bundled in grpcio-tools, and an `__init__.py` in every package folder
that lacks one (an existing one, such as the documented `ice/__init__.py`, is kept). The output depends only
on the .proto files and the grpcio-tools version, so it is committed and `--check` (and tests/test_protos.py)
catches a .proto edited without regenerating.

Imports of Google's protos: `google/protobuf/*.proto` come from grpcio-tools, the others (`google/rpc/...`,
`google/api/...`) from the googleapis-common-protos package, whose .proto sources sit beside its modules. That
package ships `google/longrunning/operations.proto` under the file name `operations_proto.proto`, yet its
module registers the canonical name `google/longrunning/operations.proto` in the descriptor pool. Our protos
import the canonical path (as every other language expects), and this script stages the shipped file under
that name, so the generated code imports `google.longrunning.operations_pb2`, which loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

PROTOS_ROOT = Path(__file__).resolve().parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# Canonical import path -> file name shipped by googleapis-common-protos, for files shipped under another name.
_RENAMED_GOOGLE_PROTOS = {"google/longrunning/operations.proto": "google/longrunning/operations_proto.proto"}


def proto_files(root: Path = PROTOS_ROOT) -> list[Path]:
    """The .proto files of the API, relative to `root`, sorted."""
    return sorted(p.relative_to(root) for p in (root / "ice").rglob("*.proto"))


def _googleapis_root() -> Path:
    """The site-packages folder that holds googleapis-common-protos' `google/...` .proto files."""
    spec = importlib.util.find_spec("google.rpc.status_pb2")
    if spec is None or spec.origin is None:
        raise RuntimeError("googleapis-common-protos is not installed")
    root = Path(spec.origin).parents[2]
    if not (root / "google" / "rpc" / "status.proto").is_file():
        raise RuntimeError(f"googleapis-common-protos .proto sources not found under {root}")
    return root


def _well_known_root() -> Path:
    """grpcio-tools' folder of `google/protobuf/*.proto` (the well-known types)."""
    import grpc_tools

    return Path(grpc_tools.__file__).parent / "_proto"


def _stage_renamed_protos(googleapis: Path, staging: Path) -> None:
    for canonical, shipped in _RENAMED_GOOGLE_PROTOS.items():
        if (googleapis / canonical).is_file():
            continue
        target = staging / canonical
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(googleapis / shipped, target)


def generate(out_root: Path, protos_root: Path = PROTOS_ROOT) -> list[Path]:
    """Generate the code of every .proto under `protos_root/ice` into `out_root`.

    Returns the generated files (including created `__init__.py`), relative to `out_root`, sorted.
    Raises RuntimeError when protoc fails (its messages go to stderr).
    """
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    protos = proto_files(protos_root)
    if not protos:
        raise RuntimeError(f"no .proto files under {protos_root / 'ice'}")
    googleapis = _googleapis_root()
    with tempfile.TemporaryDirectory(prefix="ice-protos-include-") as staging:
        _stage_renamed_protos(googleapis, Path(staging))
        args = [
            "grpc_tools.protoc",
            f"--proto_path={protos_root}",
            f"--proto_path={staging}",
            f"--proto_path={googleapis}",
            f"--proto_path={_well_known_root()}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            *(p.as_posix() for p in protos),
        ]
        rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc}")

    generated = [p.with_name(p.stem + suffix) for p in protos for suffix in GENERATED_SUFFIXES]
    missing = [p for p in generated if not (out_root / p).is_file()]
    if missing:
        raise RuntimeError(f"protoc did not write {', '.join(map(str, missing))}")
    return sorted(generated + _create_init_files(out_root, protos))


def _create_init_files(out_root: Path, protos: list[Path]) -> list[Path]:
    """Make every folder from `ice/` down to each .proto's folder a package; returns all their __init__.py."""
    inits: set[Path] = set()
    for proto in protos:
        for folder in [*reversed(proto.parent.parents[:-1]), proto.parent]:
            init = folder / "__init__.py"
            inits.add(init)
            if not (out_root / init).exists():
                package = ".".join(folder.parts)
                (out_root / init).write_text(f'"""Generated package {package} (see protos/generate.py)."""\n')
    return sorted(inits)


def _existing_generated(root: Path) -> list[Path]:
    """Generated-looking files under `root/ice`, relative to `root`."""
    found = [p for p in (root / "ice").rglob("*") if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)]
    return sorted(p.relative_to(root) for p in found)


def check(committed_root: Path = PROTOS_ROOT, protos_root: Path = PROTOS_ROOT) -> list[str]:
    """Regenerate into a temporary folder and compare with `committed_root`.

    Returns one line per problem: a generated file that differs or is missing, a package folder without
    `__init__.py`, or a generated file that no .proto produces any more. Empty when up to date.
    """
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ice-protos-check-") as tmp:
        fresh_root = Path(tmp)
        expected = generate(fresh_root, protos_root)
        for rel in expected:
            committed = committed_root / rel
            if not committed.is_file():
                problems.append(f"missing: {rel}")
            elif rel.name != "__init__.py" and committed.read_bytes() != (fresh_root / rel).read_bytes():
                problems.append(f"stale: {rel}")
    produced = set(expected)
    problems += [
        f"extra (no .proto produces it): {rel}"
        for rel in _existing_generated(committed_root)
        if rel not in produced
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=PROTOS_ROOT,
        help="output root (default: protos/, next to the .proto files)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; compare a fresh generation with the output root and exit 1 if it differs",
    )
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(args.out)
            for line in problems:
                print(line, file=sys.stderr)
            if problems:
                print("generated code is out of date: run `python protos/generate.py`", file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        files = generate(args.out)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"generated {len(files)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
