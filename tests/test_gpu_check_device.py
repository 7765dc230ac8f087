"""The GPU check that runs on the lent GPU machine as it is (bench/gpu_check_device.sh): every package the check
imports is either in that machine's image (bench/device_packages.txt) or carried as a wheel
(bench/device_wheels.txt). The imports are read from the source, following the project's own modules from
bench/gpu_check_device.py, function-level imports included, so a new import anywhere the check can reach is
seen here before the machine is."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEARCH = [ROOT, ROOT / "bench", ROOT / "protos"]  # the check's sys.path / PYTHONPATH

# Reached only through a function the device check does not call (they need an assembled bundle or the services):
# gpu_check.measure_extraction (client.local: the SDK's gRPC plumbing and tracing) and the vocabulary tagging of
# ice-bundle assemble. bench/gpu_check_device.py names the figures it measures.
NOT_CALLED = {
    "grpcio-health-checking", "grpcio-reflection", "grpcio-status", "googleapis-common-protos", "opentelemetry-api",
    "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-grpc", "textblob", "bitsandbytes",
}


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for base in SEARCH:
        for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
    return None


def _optional(node: ast.AST, parents: dict) -> bool:
    """Inside a `try:` that catches ImportError (an optional package)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try) and any(
                h.type is None or "ImportError" in ast.unparse(h.type) for h in node.handlers):
            return True
    return False


def imports_of_the_check(start: Path) -> set[str]:
    """Top-level names (`google.x` kept whole) of every third-party import reachable from `start`."""
    seen, todo, external = set(), [start], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = ".".join(path.relative_to(next(b for b in SEARCH if b in path.parents)).with_suffix("").parts)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside the project
                    base = package.rsplit(".", node.level)[0]
                    names = [f"{base}.{node.module}" if node.module else base]
                else:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                own = _module_file(name)
                if own is not None:
                    todo.append(own)
                    continue
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__" or _module_file(top) is not None:
                    continue
                if isinstance(node, ast.ImportFrom) and name != node.module:
                    continue  # `from pkg import thing`: the package itself is counted
                if not _optional(node, parents):
                    external.add(".".join(name.split(".")[:2]) if top == "google" else top)
    return external


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions_of(module: str) -> set[str]:
    """The distributions that provide an import name (opentelemetry: several), normalised."""
    if module.startswith("google."):
        found = [{"google.protobuf": "protobuf"}.get(module, "googleapis-common-protos")]
    else:  # not installed here (bitsandbytes: CUDA only): its own name
        found = _distributions().get(module) or [module]
    return {d.lower().replace("_", "-") for d in found}


def _listed(path: Path) -> set[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return {line.split("==")[0].strip().lower().replace("_", "-") for line in lines if line}


@functools.cache
def _check_imports() -> frozenset[str]:
    return frozenset(imports_of_the_check(ROOT / "bench" / "gpu_check_device.py"))


def test_every_import_of_the_device_check_is_on_the_machine_or_carried():
    on_machine = _listed(ROOT / "bench" / "device_packages.txt")
    carried = _listed(ROOT / "bench" / "device_wheels.txt")
    assert not on_machine & carried, "a wheel of a package the machine has would replace its own version"
    modules = _check_imports()
    assert {"torch", "diffusers", "transformers", "open_clip"} <= modules  # the scan does follow the check
    missing = {}
    for module in sorted(modules):
        dists = _distributions_of(module)
        if not dists & (on_machine | carried | NOT_CALLED):
            missing[module] = sorted(dists)
    assert not missing, f"imported by the GPU check, neither on the GPU machine nor in bench/device_wheels.txt: {missing}"


def test_the_carried_wheels_are_what_the_check_needs_and_no_more():
    modules = _check_imports()
    needed = set().union(*(_distributions_of(m) for m in modules))
    carried = _listed(ROOT / "bench" / "device_wheels.txt")
    # ftfy and wcwidth are open_clip's own needs (its tokenizer), not the project's imports
    assert carried - needed <= {"ftfy", "wcwidth"}, carried - needed
