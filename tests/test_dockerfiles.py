"""The container images, checked by reading their Dockerfiles and lock files (no Docker engine runs here).

Pinned bases, a numeric non-root user before the entrypoint, no secrets, no weights or bundle baked in, one GPU
image for the three services whose dependencies (torch and onnxruntime-gpu on one CUDA version, never the CPU
onnxruntime beside them) come from a lock with hashes installed before any source is copied, a build-time
self-check that the CUDA libraries load, and ports that agree with the Kubernetes manifests.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SERVICES = ("localizer", "learner", "evaluator")
GPU_FILE = DOCKER / "Dockerfile.gpu"
CPU_FILE = DOCKER / "Dockerfile.cpu"
GPU_FILES = [GPU_FILE]
ALL_FILES = [GPU_FILE, CPU_FILE]
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|PRIVATE_?KEY|ACCESS_?KEY|CREDENTIAL", re.I)


@dataclass
class Instruction:
    op: str
    args: str
    line: int


def parse(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (parser directives included)."""
    out: list[Instruction] = []
    buf, start = "", 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # comment lines inside a continued instruction are ignored
            continue
        if not buf:
            start = no
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        op, _, args = buf.partition(" ")
        out.append(Instruction(op.upper(), args.strip(), start))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def stages(instrs: list[Instruction]) -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for i in instrs:
        if i.op == "FROM":
            out.append([])
        if out:
            out[-1].append(i)
    return out


def final_stage(instrs):
    return stages(instrs)[-1]


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_bases_are_pinned(path):
    froms = [i for i in parse(path) if i.op == "FROM"]
    assert froms
    stage_names = set()
    for f in froms:
        words = [w for w in f.args.split() if not w.startswith("--platform")]
        image = words[0]
        if len(words) == 3 and words[1].upper() == "AS":
            stage_names.add(words[2])
        if image in stage_names:
            continue
        assert "$" not in image, f"{path.name}:{f.line}: base chosen by a build argument: {image}"
        name = image.split("@")[0]
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in image or tag, f"{path.name}:{f.line}: unpinned base {image}"
        assert tag != "latest", f"{path.name}:{f.line}: {image}"
        # An exact version, not a moving one like `3.11-slim` or `12-runtime`.
        assert "@sha256:" in image or re.search(r"\d+\.\d+\.\d+", tag), f"{path.name}:{f.line}: {image}"


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_runs_as_a_numeric_non_root_user(path):
    final = final_stage(parse(path))
    users = [i for i in final if i.op == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    user = users[-1].args.split(":")
    assert user[0].isdigit() and int(user[0]) != 0, f"{path.name}: USER {users[-1].args} (numeric, non-root)"
    assert len(user) == 1 or (user[1].isdigit() and int(user[1]) != 0)
    start = [i for i in final if i.op in ("ENTRYPOINT", "CMD")]
    assert start, f"{path.name}: no ENTRYPOINT or CMD"
    assert all(users[-1].line < i.line for i in start), f"{path.name}: USER must come before ENTRYPOINT/CMD"
    for i in start:
        exec_form(i.args)  # exec form: the service is PID 1 and receives SIGTERM itself
    # The same user the Kubernetes manifests run as, created in the image.
    assert any(i.op == "RUN" and "--uid 10001" in i.args for i in final)
    assert user[0] == "10001"


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_no_secrets_in_the_image(path):
    for i in parse(path):
        if i.op in ("ENV", "ARG"):
            # ENV a=1 b=2 / ARG name=value; every name with a secret-like name must carry no value.
            for word in shlex.split(i.args):
                name, eq, value = word.partition("=")
                if SECRET_NAME.search(name):
                    pytest.fail(f"{path.name}:{i.line}: {i.op} {name} looks like a secret")
        if i.op in ("COPY", "ADD"):
            assert not re.search(r"\.(pem|key|env)\b|id_rsa|\.netrc|\.pypirc", i.args), f"{path.name}:{i.line}"
        if i.op == "RUN":
            assert not re.search(r"(?i)(token|password)=\S", i.args), f"{path.name}:{i.line}"


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_no_bundle_or_weights_baked_in(path):
    for i in parse(path):
        if i.op in ("COPY", "ADD"):
            words = [w for w in i.args.split() if not w.startswith("--")]
            sources = words[:-1]
            for s in sources:
                assert not re.search(r"bundle|weights|models|build|\.safetensors|\.onnx|\.ckpt|\.bin$", s), (
                    f"{path.name}:{i.line}: COPY {s}: the bundle is mounted at run time, never baked in"
                )
            assert "." not in sources and "./" not in sources, f"{path.name}:{i.line}: copies the whole context"
        if i.op == "ADD":
            pytest.fail(f"{path.name}:{i.line}: ADD (use COPY; nothing is fetched at build time by ADD)")
        if i.op == "RUN":
            assert not re.search(r"ice-bundle\s+(tiny|assemble)|huggingface-cli|hf_hub_download|\bwget\b|\bcurl\b",
                                 i.args), f"{path.name}:{i.line}: fetches or builds a bundle into the image"
    final = final_stage(parse(path))
    env = " ".join(i.args for i in final if i.op == "ENV")
    assert "ICE_BUNDLE=/models/bundle" in env
    assert "HF_HUB_OFFLINE=1" in env


def pip_installs(instrs) -> list[tuple[int, str]]:
    """(position, command) of every pip command, in order, across RUN instructions."""
    out = []
    for n, i in enumerate(instrs):
        if i.op != "RUN":
            continue
        for k, cmd in enumerate(re.split(r"&&|;", i.args)):
            cmd = cmd.strip()
            if re.search(r"\bpip3?\s+(install|uninstall)\b", cmd):
                out.append((n * 100 + k, cmd))
    return out


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a `uv pip compile --generate-hashes` lock."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s\\;]+)", line)
        if m:
            current = m.group(1).lower().replace("_", "-")
            entries[current] = (m.group(3), [])
        elif current and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            entries[current][1].append(h.group(1))
        elif line and not line.startswith((" ", "#")):
            current = None
            assert not line.startswith("-e"), f"{path.name}: an editable entry cannot carry a hash: {line}"
    return entries


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower().replace("_", "-") for r in requirements}


def _project(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())["project"]


@pytest.mark.parametrize(("lock", "extras", "left_out"), [
    ("requirements-gpu.lock", {"ice-serving": ["gpu"]}, {"onnxruntime"}),  # onnxruntime-gpu is the same module
    ("requirements-cpu.lock", {"ice-client": ["batch"]}, {"torch", "torchvision"}),  # from PyTorch's CPU index
])
def test_locks_pin_every_dependency_with_its_hashes(lock, extras, left_out):
    entries = lock_entries(DOCKER / lock)
    assert entries
    for name, (version, hashes) in entries.items():
        assert hashes, f"{lock}: {name}=={version} has no hash"
    services, client = _project(ROOT / "pyproject.toml"), _project(ROOT / "client/pyproject.toml")
    wanted = _requirement_names(services["dependencies"]) | _requirement_names(client["dependencies"])
    for extra in extras.get("ice-serving", []):
        wanted |= _requirement_names(services["optional-dependencies"][extra])
    for extra in extras.get("ice-client", []):
        wanted |= _requirement_names(client["optional-dependencies"][extra])
    wanted -= {"ice-client"} | left_out
    assert wanted - set(entries) == set(), f"{lock} lacks {sorted(wanted - set(entries))}: run docker/lock.sh"
    assert not set(entries) & left_out, f"{lock} must not hold {left_out & set(entries)}"
    for name in ("torch", "torchvision"):  # the versions `make install` and the CPU image pin
        pinned = re.search(rf'"{name}==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
        if name in entries:
            assert entries[name][0] == pinned, (lock, name)


def test_gpu_lock_is_one_cuda_stack():
    entries = lock_entries(DOCKER / "requirements-gpu.lock")
    assert entries["torch"][0] == "2.14.1" and "onnxruntime-gpu" in entries and "triton" in entries
    # torch's CUDA libraries as wheels, one CUDA major version (13): the image has no other CUDA toolkit
    runtime = entries["nvidia-cuda-runtime"][0] if "nvidia-cuda-runtime" in entries else None
    assert runtime and runtime.split(".")[0] == "13", runtime
    assert not [n for n in entries if re.fullmatch(r"nvidia-.*-cu12", n)], "CUDA 12 libraries beside CUDA 13"
    assert not [n for n in lock_entries(DOCKER / "requirements-cpu.lock") if n.startswith("nvidia-")]


def _build_stage(path: Path) -> list[Instruction]:
    return stages(parse(path))[0]


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_dependencies_are_installed_before_any_source_is_copied(path):
    """A code change must not reinstall torch: every third-party package is in a layer above the source."""
    build = _build_stage(path)
    lock = f"docker/requirements-{'gpu' if path == GPU_FILE else 'cpu'}.lock"
    (lock_install,) = [k for k, i in enumerate(build) if i.op == "RUN" and f"-r {lock}" in i.args]
    assert "--require-hashes" in build[lock_install].args and "--no-deps" in build[lock_install].args
    copies = [k for k, i in enumerate(build) if i.op == "COPY"]
    before = [build[k].args for k in copies if k < lock_install]
    assert before == [f"{lock} /opt/ice/docker/"], before  # only the lock is in the context of that layer
    sources = [k for k, i in enumerate(build) if i.op == "COPY" and re.search(r"\b(services|client|protos)/", i.args)]
    assert sources and min(sources) > lock_install
    # after the source, the project alone: no dependency is resolved or downloaded there
    for i in build[min(sources):]:
        if i.op == "RUN" and re.search(r"\bpip3?\s+install\b", i.args):
            assert "--no-deps" in i.args and "-e ./client" in i.args and re.search(r"-e \.(\s|$)", i.args), i.args
    if path == CPU_FILE:  # torch's CPU build, pinned, in the first layer
        (torch,) = [k for k, i in enumerate(build) if i.op == "RUN" and "torch==2.14.1" in i.args]
        assert "download.pytorch.org/whl/cpu" in build[torch].args and torch < lock_install


def test_gpu_image_proves_that_its_cuda_libraries_load():
    final = final_stage(parse(GPU_FILE))
    assert all(re.match(r"python:3\.11\.\d+-slim", i.args) for i in parse(GPU_FILE) if i.op == "FROM")
    run = [i.args for i in final if i.op == "RUN"]
    (selfcheck,) = [r for r in run if "gpu_selfcheck.py" in r]
    assert "ld.so.conf.d" in selfcheck and "ldconfig" in selfcheck  # the wheels' libraries, for the loader
    assert selfcheck.index("ldconfig") < selfcheck.index("gpu_selfcheck.py")
    assert any(i.op == "COPY" and "docker/gpu_selfcheck.py" in i.args for i in final)


def test_self_check_reads_the_dynamic_loader_and_cuda_versions():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_selfcheck", DOCKER / "gpu_selfcheck.py")
    selfcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selfcheck)
    ldd = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibcudart.so.13 => /opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib/libcudart.so.13 (0x7f)
\tlibcudnn.so.9 => not found
\tlibcuda.so.1 => not found
\tlibcublasLt.so.13 => not found
"""
    assert selfcheck.missing_libraries(ldd) == ["libcudnn.so.9", "libcublasLt.so.13"]  # the driver's is not ours
    assert selfcheck.cuda_major("13.0") == 13 and selfcheck.cuda_major(None) is None
    assert selfcheck.main([]) == 1  # here (no onnxruntime-gpu): the check fails, it does not pass vacuously


def test_cpu_image_has_no_gpu_packages():
    instrs = parse(CPU_FILE)
    assert all(re.match(r"python:3\.1[1-9]\.\d+-slim", i.args) for i in instrs if i.op == "FROM")
    steps = [cmd for _, cmd in pip_installs(instrs)]
    assert not any("[gpu]" in c or "onnxruntime-gpu" in c or "triton" in c for c in steps)
    entries = lock_entries(DOCKER / "requirements-cpu.lock")
    assert not {"onnxruntime-gpu", "triton"} & set(entries) and "onnxruntime" in entries
    assert {"s3fs", "gcsfs", "adlfs"} <= set(entries)  # `ice batch` over object storage runs from this image


def _k8s_server_args() -> dict[str, tuple[list[str], list[str], str]]:
    out = {}
    for s in SERVICES:
        for doc in yaml.safe_load_all((ROOT / "k8s" / "base" / f"{s}.yaml").read_text()):
            if doc and doc["kind"] in ("Deployment", "StatefulSet"):
                (c,) = doc["spec"]["template"]["spec"]["containers"]
                out[s] = c["command"], c["args"], c["image"]
    return out


def test_one_gpu_image_serves_every_service_on_its_ports():
    final = final_stage(parse(GPU_FILE))
    (expose,) = [i.args.split() for i in final if i.op == "EXPOSE"]
    (cmd,) = [exec_form(i.args) for i in final if i.op == "CMD"]
    servers = _k8s_server_args()
    assert {image for _c, _a, image in servers.values()} == {"ice-gpu"}
    for service, (command, args, _image) in servers.items():
        assert command == ["python", "-m", f"services.{service}"]
        flags = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)
        assert {flags["port"], flags["health-port"], flags["metrics-port"]} <= set(expose), service
    # the image's default command is the localizer, with the same flags as its manifest
    command, args, _image = servers["localizer"]
    assert cmd[:3] == command and all(a in args for a in cmd[3:])
    (cpu_expose,) = [i.args.split() for i in final_stage(parse(CPU_FILE)) if i.op == "EXPOSE"]
    assert set(expose) <= set(cpu_expose)
    # no per-service GPU images (Dockerfile.bundle packs a bundle as data, for image volumes)
    assert not [p for p in DOCKER.glob("Dockerfile.*") if p not in [*ALL_FILES, DOCKER / "Dockerfile.bundle"]]


def test_bundle_image_is_data_only_under_its_version_folder():
    instrs = parse(DOCKER / "Dockerfile.bundle")
    assert [i.args for i in instrs if i.op == "FROM"] == ["scratch"]
    assert not [i for i in instrs if i.op in ("RUN", "CMD", "ENTRYPOINT", "ADD")]
    (copy,) = [i.args for i in instrs if i.op == "COPY"]
    assert copy == ". /${VERSION}/"  # the bundle folder (the build context), at <version>/ like bundles/<version>/
    assert "VERSION" in [i.args for i in instrs if i.op == "ARG"]


def test_dockerignore_keeps_the_context_small_and_clean():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for must in (".git", ".venv", "build", "**/*.safetensors", "**/*.onnx"):
        assert must in ignored, must
    for needed in ("services", "client", "protos", "pyproject.toml", "README.md"):
        assert needed not in ignored, needed
    # docker/ is left out, except the files the Dockerfiles copy from it
    assert "docker" in ignored and {"!docker/requirements-*.lock", "!docker/gpu_selfcheck.py"} <= ignored
