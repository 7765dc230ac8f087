"""The contract checked by buf (the npm @bufbuild/buf binary), with googleapis from google-proto-files as any other
language gets them: `buf lint` (STANDARD + COMMENTS, every exception justified and still needed) and `buf
breaking` against the image of the released v1 contract (protos/released/ice-v1.binpb). Each check is also shown
to fail on a contract that breaks it, so a passing run means something."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from interop.buf_workspace import PROTOS, RELEASED_V1, buf, make_workspace, missing_tools


@pytest.fixture(autouse=True)
def _tools():
    problem = missing_tools()
    if problem:
        pytest.fail(problem)


def _edited_contract(tmp_path, file: str, old: str, new: str):
    contract = tmp_path / "contract-copy"
    shutil.copytree(PROTOS / "ice", contract, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    path = contract / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return contract


def test_buf_lint_passes(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    done = buf("lint", "--path", "ice", cwd=ws)
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_lint_fails_on_a_contract_that_breaks_the_style(tmp_path):
    contract = _edited_contract(tmp_path, "common/v1/common.proto", "string noun = 2;", "string Noun = 2;")
    done = buf("lint", "--path", "ice", "--error-format", "config-ignore-yaml",
               cwd=make_workspace(tmp_path / "ws", contract))
    assert done.returncode != 0
    assert "FIELD_LOWER_SNAKE_CASE" in done.stdout


def test_every_lint_exception_is_justified_and_still_needed(tmp_path):
    text = (PROTOS / "buf.yaml").read_text()
    config = yaml.safe_load(text)
    ignored = config["lint"].get("ignore_only", {})
    assert "ignore" not in config["lint"]  # whole files may not be exempted from every rule
    assert ignored, "no exception: drop this test's premise"
    lines = text.splitlines()
    for rule, paths in ignored.items():
        at = next(i for i, line in enumerate(lines) if line.strip() == f"{rule}:")
        assert lines[at - 1].strip().startswith("#"), f"{rule}: no comment saying why"
        # without the exception, lint fails on exactly that rule, in exactly those files
        ws = make_workspace(tmp_path / f"ws-{rule}")
        strict = yaml.safe_load((ws / "buf.yaml").read_text())
        del strict["lint"]["ignore_only"][rule]
        (ws / "buf.yaml").write_text(yaml.safe_dump(strict))
        done = buf("lint", "--path", "ice", "--error-format", "json", cwd=ws)
        assert done.returncode != 0
        found = {(m["path"], m["type"]) for m in map(yaml.safe_load, done.stdout.splitlines())}
        assert found == {(p, rule) for p in paths}, found


def test_buf_breaking_against_the_released_v1_contract(tmp_path):
    assert RELEASED_V1.is_file()
    done = buf("breaking", "--against", str(RELEASED_V1), cwd=make_workspace(tmp_path / "ws"))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    ("common/v1/common.proto", "string noun = 2;", "string noun = 12;", r'field "2" with name "noun"'),
    ("learner/v1/learner.proto", "JOB_STATE_CANCELLED", "JOB_STATE_ABORTED", r"JOB_STATE_CANCELLED"),
])
def test_buf_breaking_catches_a_break_of_v1(tmp_path, file, old, new, expected):
    contract = _edited_contract(tmp_path, file, old, new)
    done = buf("breaking", "--against", str(RELEASED_V1), cwd=make_workspace(tmp_path / "ws", contract))
    assert done.returncode != 0
    assert re.search(expected, done.stdout), done.stdout
