"""The SDK as its own light distribution: a fresh virtualenv that installs only `ice-client` (the wheel of ./client
and its dependencies; no torch, no model library, not this repository on the path) runs `ice extract` against the
real services, and its whole install stays small."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "diffusers", "transformers", "open_clip_torch", "onnxruntime", "scipy", "ice-serving")
MAX_INSTALL_MB = 150  # measured: see the README (the services' environment is gigabytes)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def test_client_only_virtualenv_runs_ice_extract(interop_services, photo_file, tmp_path):
    wheels, venv, work, src = tmp_path / "wheels", tmp_path / "venv", tmp_path / "work", tmp_path / "src"
    work.mkdir()
    # the wheel of ./client (built from a copy: setuptools writes its build folder beside the sources), then a
    # virtualenv with nothing but it and what it declares (pip's own cache serves the dependencies; the pip of
    # this environment installs into the new one, which gets no pip of its own)
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    shutil.copytree(REPO / "client", src / "client", ignore=skip)
    shutil.copytree(REPO / "protos" / "ice", src / "protos" / "ice", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, src / "client"])
    (wheel,) = wheels.glob("ice_client-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check", wheel])

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("OTEL_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    installed = json.loads(_run([sys.executable, "-m", "pip", "--python", python, "list", "--format", "json"],
                                env=env).stdout)
    names = {p["name"].lower() for p in installed}
    assert "ice-client" in names and not names & set(HEAVY), names
    probe = _run([python, "-c", "import importlib.util as u, json, pathlib, client, ice.learner.v1.learner_pb2 as pb;"
                  "print(json.dumps({'client': client.__file__, 'pb': pb.__file__,"
                  "'proto': (pathlib.Path(pb.__file__).parent / 'learner.proto').is_file(),"
                  "'missing': [m for m in ('torch', 'diffusers', 'services') if u.find_spec(m) is None]}))"],
                 cwd=work, env=env)
    found = json.loads(probe.stdout)
    assert found["client"].startswith(str(venv)) and found["pb"].startswith(str(venv))  # not the repository's
    assert found["proto"]  # the contract itself ships beside its generated code
    assert found["missing"] == ["torch", "diffusers", "services"]

    t = interop_services.targets
    out = work / "result"
    done = _run([venv / "bin" / "ice", "extract", photo_file, "--out", out, "--localizer", t["localizer"],
                 "--learner", t["learner"], "--evaluator", t["evaluator"], "--json", "--no-progress",
                 "--max-concepts", "1", "--max-rounds", "2", "--merge-threshold", "0.0008", "--min-area-fraction", "0",
                 "--quick", "--num-images", "1", "--inference-steps", "2", "--generate-seed", "0", "--seed", "0"],
                cwd=work, env=env)
    result = json.loads(done.stdout)
    assert len(result["localization"]["concepts"]) == 1
    assert result["learning"]["bundle"]["name"].startswith("tiny")
    assert {s["encoder"] for s in result["evaluation"]["scores"]} == {"CLIP", "DINO"}
    assert (out / "report.html").is_file() and (out / "masks" / "c0.png").is_file()

    size = _size_mb(venv)
    print(f"client-only virtualenv: {size:.0f} MiB")
    assert size < MAX_INSTALL_MB
