"""The bundle Job as a pod runs it: the image's command, against a mounted volume, on a read-only root.

In a pod the bundle volume is a mount point inside a read-only root filesystem. `ice-bundle` stages a bundle in a
hidden folder beside `--out` and renames it into place, which fails on a mount point (the sibling is on the
read-only root: EROFS; a mount point cannot be renamed: EBUSY). Here the rendered assemble Job's command runs in
a private mount namespace that reproduces that layout (tmp root bind-mounted read-only, the volume's folders
bind-mounted writable at /weights and /models), with the tiny bundle's components as the operator's weights: it
succeeds, a re-run leaves the bundle alone, `verify` passes, and the old manifest's --out (the mount point itself)
is refused with a clear message instead of EROFS.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common.assemble import staging_dir

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = shutil.which("kubectl")
ICE_BUNDLE = Path(sys.executable).parent / "ice-bundle"


def test_ice_bundle_refuses_a_mount_point_as_out(tmp_path):
    with pytest.raises(ValueError, match="is a mount point: write the bundle into a directory inside it"):
        staging_dir(Path("/"), force=True)  # always a mount point; refused before anything is touched
    tmp = staging_dir(tmp_path / "bundle-v1", force=False)  # a folder inside a volume is fine
    assert tmp.parent == tmp_path and tmp.is_dir()


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def _assemble_job() -> dict:
    out = subprocess.run([KUBECTL, "kustomize", str(ROOT / "k8s/batch/assemble-bundle")], capture_output=True,
                         text=True, timeout=60, check=True)
    (job,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Job"]
    return job


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\(([A-Z_]+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def _under(arg: str, rootfs: Path, mounts: list[str]) -> str:
    """A container path in `arg` (alone or as `--flag=PATH`), moved under the fake root."""
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount + "/"):
            return flag + eq + str(rootfs) + value
    return arg


def host_argv(container: dict, rootfs: Path, command: list[str] | None = None,
              executable: Path = ICE_BUNDLE) -> list[str]:
    """The container's command as this machine runs it: its container paths moved under the fake root, then
    `ice-bundle` replaced by this venv's. In that order: the venv is wherever the checkout is (under /tmp, say,
    where the container mounts a volume of its own) and must not be taken for a container path."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    argv = _expand(command or [*container["command"], *container.get("args", [])], env)
    argv = [_under(a, rootfs, [m["mountPath"] for m in container["volumeMounts"]]) for a in argv]
    return [str(executable) if a == "ice-bundle" else a for a in argv]


def test_the_command_runs_this_venv_wherever_the_checkout_lives(tmp_path):
    job = _assemble_job() if KUBECTL else {"spec": {"template": {"spec": {"initContainers": [
        {"command": ["ice-bundle"], "args": ["assemble", "--out=/models/v1"],
         "volumeMounts": [{"mountPath": "/tmp"}, {"mountPath": "/models"}]}]}}}}
    (assemble,) = job["spec"]["template"]["spec"]["initContainers"]
    mounts = [m["mountPath"] for m in assemble["volumeMounts"]]
    assert "/tmp" in mounts  # the container mounts a volume at /tmp, where a checkout may well live
    rootfs = tmp_path / "rootfs"
    for checkout in (Path("/tmp/a-clone"), Path("/home/dev/ice"), Path("/models-src")):
        executable = checkout / ".venv" / "bin" / "ice-bundle"
        argv = host_argv(assemble, rootfs, executable=executable)
        assert argv.count(str(executable)) == 1 and "ice-bundle" not in argv, argv
        assert any(a.startswith(f"--out={rootfs}/models/") for a in argv), argv  # container paths still move


def _weights(tiny: Path, into: Path) -> None:
    """The operator's weights, as the Job expects them on the share (from the tiny bundle's components)."""
    shutil.copytree(tiny / "diffusion", into / "diffusion")
    (into / "open_clip").mkdir(parents=True)
    shutil.copy(tiny / "clip/open_clip_config.json", into / "open_clip/config.json")
    shutil.copy(tiny / "clip/open_clip_model.safetensors", into / "open_clip/weights.safetensors")
    shutil.copytree(tiny / "dino", into / "dino")
    shutil.copy(tiny / "vocab/vocab.tsv", into / "vocab.tsv")


@pytest.mark.slow
@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with Kustomize) is not installed")
@pytest.mark.skipif(not _can_mount(), reason="needs root and unshare to make a private mount namespace")
def test_the_assemble_job_runs_on_a_mounted_volume_and_reruns(tiny_bundle_dir, tmp_path):
    job = _assemble_job()
    pod = job["spec"]["template"]["spec"]
    (assemble,) = pod["initContainers"]
    (verify,) = pod["containers"]
    share = tmp_path / "share"  # the ice-data claim: weights/ and bundles/ on it
    _weights(tiny_bundle_dir, share / "weights")
    (share / "bundles").mkdir(parents=True)
    rootfs = tmp_path / "rootfs"  # the container's root filesystem: read-only
    for m in assemble["volumeMounts"] + verify["volumeMounts"]:
        (rootfs / m["mountPath"].lstrip("/")).mkdir(parents=True, exist_ok=True)

    def run(container: dict, command: list[str] | None = None) -> subprocess.CompletedProcess:
        argv = host_argv(container, rootfs, command)
        setup = [f"mount --bind {shlex.quote(str(rootfs))} {shlex.quote(str(rootfs))}",
                 f"mount -o remount,bind,ro {shlex.quote(str(rootfs))}"]
        for m in container["volumeMounts"]:
            source = share / m["subPath"] if "subPath" in m else tmp_path / m["name"]
            source.mkdir(parents=True, exist_ok=True)
            target = shlex.quote(str(rootfs) + m["mountPath"])
            setup.append(f"mount --bind {shlex.quote(str(source))} {target}")
            if m.get("readOnly"):
                setup.append(f"mount -o remount,bind,ro {target}")
        script = " && ".join(setup) + " && exec " + shlex.join(argv)
        return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})

    version = next(e["value"] for e in assemble["env"] if e["name"] == "BUNDLE_VERSION")
    first = run(assemble)
    assert first.returncode == 0, first.stdout + first.stderr
    bundle = share / "bundles" / version
    assert (bundle / "bundle.json").is_file()
    assert not list((share / "bundles").glob(".*partial*"))  # staged inside the volume, renamed into place
    stamp = (bundle / "bundle.json").stat().st_mtime_ns

    again = run(assemble)  # the Job re-run (or retried after a lost node): the version is left as it is
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already assembled" in again.stdout
    assert (bundle / "bundle.json").stat().st_mtime_ns == stamp

    checked = run(verify)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "digest" in checked.stdout

    # The manifest as it was (--out at the mount point itself): a clear refusal, not EROFS from the root.
    old = [a if not a.startswith("--out=") else "--out=/models" for a in assemble["args"]]
    refused = run(assemble, [*assemble["command"], *old])
    assert refused.returncode == 1
    assert "is a mount point" in refused.stderr and "Read-only file system" not in refused.stderr


# --- the bundle-pin init container, as the manifests run it -------------------------------------------------
def _pin_script() -> str:
    docs = yaml.safe_load_all((ROOT / "k8s/base/localizer.yaml").read_text())
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    (pin,) = [c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "bundle-pin"]
    assert pin["command"] == ["python", "-c"]
    return pin["args"][0]


def _pin(monkeypatch, capsys, bundle: Path, digest: str) -> tuple[int, str]:
    monkeypatch.setenv("ICE_BUNDLE", str(bundle))
    monkeypatch.setenv("ICE_BUNDLE_DIGEST", digest)
    try:
        exec(compile(_pin_script(), "bundle-pin", "exec"), {"__name__": "__main__"})
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code in (None, 0) else 1
        print(exc.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_pod_refuses_any_bundle_but_the_one_it_names(tiny_bundle, monkeypatch, capsys):
    code, text = _pin(monkeypatch, capsys, tiny_bundle.root, tiny_bundle.digest)
    assert code == 0 and "(pinned)" in text
    code, text = _pin(monkeypatch, capsys, tiny_bundle.root, "0" * 64)  # another version was put in its place
    assert code == 1 and "not starting" in text and tiny_bundle.digest in text
    code, text = _pin(monkeypatch, capsys, tiny_bundle.root, "")  # dev-cpu: no digest pinned
    assert code == 0 and "no digest pinned" in text
    code, text = _pin(monkeypatch, capsys, tiny_bundle.root / "absent", tiny_bundle.digest)
    assert code == 1 and "cannot open the bundle" in text
