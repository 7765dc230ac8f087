"""The container images, checked by reading their Dockerfiles (no Docker engine runs here).

Pinned bases, a numeric non-root user before the entrypoint, no secrets, no weights or bundle baked in, the
`gpu` extra in the CUDA images without the CPU onnxruntime beside onnxruntime-gpu, and the ports of each
image agreeing with the Kubernetes manifests.
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
GPU_FILES = [DOCKER / f"Dockerfile.{s}" for s in SERVICES]
ALL_FILES = [*GPU_FILES, DOCKER / "Dockerfile.cpu"]
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


@pytest.mark.parametrize("path", GPU_FILES, ids=lambda p: p.name)
def test_gpu_images_install_torch_first_then_the_gpu_extra_without_cpu_onnxruntime(path):
    instrs = parse(path)
    assert all("nvidia/cuda:" in i.args for i in instrs if i.op == "FROM")
    steps = [cmd for _, cmd in pip_installs(instrs)]
    torch = next(k for k, c in enumerate(steps) if "torch==2.14.1" in c and "torchvision==0.29.1" in c)
    extra = next(k for k, c in enumerate(steps) if re.search(r"install\s+(-e\s+)?'?\.\[gpu\]'?", c))
    assert torch < extra, "torch must be installed (pinned) before the project"
    # The CPU wheel (a base dependency) is removed after the extra pulled onnxruntime-gpu, and the GPU wheel
    # reinstalled alone so that none of the CPU wheel's files survive.
    uninstall = next(k for k, c in enumerate(steps) if re.search(r"pip uninstall -y .*\bonnxruntime\b", c))
    reinstall = next(k for k, c in enumerate(steps) if "install --no-deps" in c and "onnxruntime-gpu" in c)
    assert extra < uninstall < reinstall
    assert not any(re.search(r"\bpip3?\s+install\b.*\bonnxruntime(?![-\w])", c) for c in steps[uninstall:])
    run = " ".join(i.args for i in instrs if i.op == "RUN")
    assert "CUDAExecutionProvider" in run and "'onnxruntime' not in names" in run  # checked at build time


def test_cpu_image_has_no_gpu_packages():
    instrs = parse(DOCKER / "Dockerfile.cpu")
    assert all(re.match(r"python:3\.1[1-9]\.\d+-slim", i.args) for i in instrs if i.op == "FROM")
    steps = [cmd for _, cmd in pip_installs(instrs)]
    assert not any("[gpu]" in c or "onnxruntime-gpu" in c or "triton" in c for c in steps)
    torch = next(k for k, c in enumerate(steps) if "torch==2.14.1" in c)
    assert "download.pytorch.org/whl/cpu" in steps[torch]
    project = next(k for k, c in enumerate(steps) if re.search(r"install\s+(-e\s+)?\.(\s|$)", c))
    assert torch < project


def _normalise(text: str, service: str) -> str:
    port = {"localizer": "50051", "learner": "50052", "evaluator": "50053"}[service]
    health = str(int(port) + 10)
    return text.replace(service, "SERVICE").replace(health, "HEALTH").replace(port, "PORT")


def test_gpu_dockerfiles_differ_only_in_service_and_ports():
    texts = {s: _normalise((DOCKER / f"Dockerfile.{s}").read_text(), s) for s in SERVICES}
    assert texts["localizer"] == texts["learner"] == texts["evaluator"]


def _k8s_server_args() -> dict[str, list[str]]:
    out = {}
    for s in SERVICES:
        for doc in yaml.safe_load_all((ROOT / "k8s" / "base" / f"{s}.yaml").read_text()):
            if doc and doc["kind"] in ("Deployment", "StatefulSet"):
                (c,) = doc["spec"]["template"]["spec"]["containers"]
                out[s] = c["command"], c["args"]
    return out


@pytest.mark.parametrize("service", SERVICES)
def test_image_ports_and_entrypoint_agree_with_kubernetes(service):
    final = final_stage(parse(DOCKER / f"Dockerfile.{service}"))
    (entry,) = [exec_form(i.args) for i in final if i.op == "ENTRYPOINT"]
    (cmd,) = [exec_form(i.args) for i in final if i.op == "CMD"]
    (expose,) = [i.args.split() for i in final if i.op == "EXPOSE"]
    command, args = _k8s_server_args()[service]
    assert entry == command == ["python", "-m", f"services.{service}"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)
    for a in cmd:
        name, value = a.removeprefix("--").split("=", 1)
        assert flags[name] == value, (service, name)
    assert sorted(expose) == sorted({flags["port"], flags["health-port"], flags["metrics-port"]})
    # The CPU image exposes every service's ports too.
    (cpu_expose,) = [i.args.split() for i in final_stage(parse(DOCKER / "Dockerfile.cpu")) if i.op == "EXPOSE"]
    assert set(expose) <= set(cpu_expose)


def test_dockerignore_keeps_the_context_small_and_clean():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for must in (".git", ".venv", "build", "**/*.safetensors", "**/*.onnx"):
        assert must in ignored, must
    for needed in ("services", "client", "protos", "pyproject.toml", "README.md"):
        assert needed not in ignored, needed
