"""The dependency direction of the layout: protos (and `ice/wire.py` beside the generated code) <- services <- client.
The SDK's `--local` mode imports the services' algorithm modules; the services never import the SDK, so the two
top-level packages never import each other and each can change without the other."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in a module, at any depth (an import inside a function counts too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def sdk_imports(folder: Path) -> list[str]:
    """Every import of the `client` package (the SDK) in the Python files under `folder`."""
    hits = []
    for path in sorted(folder.rglob("*.py")):
        for line, module in _imported(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if module == "client" or module.startswith("client."):
                hits.append(f"{path.relative_to(folder)}:{line}: {module}")
    return hits


def test_the_scan_finds_an_import_of_the_sdk_wherever_it_is(tmp_path):
    (tmp_path / "a.py").write_text("import os\nfrom client.tracing import is_configured\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("def f():\n    import client.channel\n    from clientele import x\n")
    assert sdk_imports(tmp_path) == ["a.py:2: client.tracing", "sub/b.py:2: client.channel"]


def test_services_never_import_the_sdk():
    assert sdk_imports(ROOT / "services") == []


def test_the_shared_module_imports_neither_side():
    imported = [m for _, m in _imported(ast.parse((ROOT / "protos" / "ice" / "wire.py").read_text(encoding="utf-8")))]
    assert not [m for m in imported if m.split(".")[0] in ("client", "services")], imported


def test_starting_every_service_loads_no_sdk_module():
    """At run time too: importing each service's server (its start-up path) brings no `client` module in."""
    code = ("import sys\n"
            "import services.common.server, services.localizer.server, services.learner.server, "
            "services.evaluator.server, services.common.tracing, services.common.credentials\n"
            "print(sorted(m for m in sys.modules if m == 'client' or m.startswith('client.')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout
