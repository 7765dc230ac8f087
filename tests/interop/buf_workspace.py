"""A buf workspace for the contract without the Buf Schema Registry: protos/buf.yaml (less its `deps`), the
contract's `ice/` folder, and the googleapis files it imports, taken from the google-proto-files npm package
(tests/interop/node) — the include set any other language uses too.

    python tests/interop/buf_workspace.py image OUT.binpb   # the image of the contract as it is now (with its
                                                            # imports, without source info): how
                                                            # protos/released/ice-v1.binpb was made
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
NODE = REPO / "tests" / "interop" / "node"
BUF = NODE / "node_modules" / ".bin" / "buf"
GOOGLEAPIS = NODE / "node_modules" / "google-proto-files"
RELEASED_V1 = PROTOS / "released" / "ice-v1.binpb"
_IMPORT = re.compile(r'^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)"\s*;', re.MULTILINE)


def missing_tools() -> str | None:
    for path in (BUF, GOOGLEAPIS):
        if not path.exists():
            return f"{path.relative_to(REPO)} is missing: `make test` installs it (npm ci in tests/interop/node)"
    return None


def googleapis_imports(contract: Path) -> list[str]:
    """Every google/... file the contract needs, transitively, except the well-known types buf ships."""
    needed: set[str] = set()
    pending = [p for p in contract.rglob("*.proto")]
    while pending:
        for name in _IMPORT.findall(pending.pop().read_text()):
            if name.startswith("google/") and not name.startswith("google/protobuf/") and name not in needed:
                needed.add(name)
                pending.append(GOOGLEAPIS / name)
    return sorted(needed)


def make_workspace(root: Path, contract: Path = PROTOS / "ice") -> Path:
    """`root`/buf.yaml + `root`/ice -> the contract + `root`/google/... -> google-proto-files (symlinks)."""
    root.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((PROTOS / "buf.yaml").read_text())
    config.pop("deps", None)  # supplied as files below
    (root / "buf.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "ice").symlink_to(contract, target_is_directory=True)
    for name in googleapis_imports(contract):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(GOOGLEAPIS / name)
    return root


def buf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


if __name__ == "__main__":
    import tempfile

    if len(sys.argv) != 3 or sys.argv[1] != "image":
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp) / "ws")
        done = buf("build", "--path", "ice", "--exclude-source-info", "-o", str(Path(sys.argv[2]).resolve()), cwd=ws)
        sys.exit(done.returncode if done.returncode == 0 else done.stderr)
