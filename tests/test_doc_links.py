"""The repository explains itself: every link in its Markdown and every `docs/....md#anchor` reference in its code,
protos and docs points at a file that is in the repository (and, with an anchor, at a heading that exists), and
nothing points at documents kept outside it or at paths of a build machine."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".md", ".py", ".proto", ".toml", ".yaml", ".yml", ".txt", ".sh", ".cfg", ".ini", ".json"}
MD_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOC_REFERENCE = re.compile(r"(?<![\w./:-])((?:docs/)?[\w./-]+\.md)#([\w-]+)")  # not inside a URL
# Names of the documents that once specified the project from outside the repository, and build-machine paths.
OUTSIDE = ("ICE_" + "REFERENCE", "DESIGN" + ".md", "../" + "shared/", "/" + "work/")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [REPO / p for p in out.decode().split("\0") if p]
    return [f for f in files if f.suffix in TEXT_SUFFIXES or f.name in ("Makefile", "run")]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    found, in_code = set(), False
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.*)", line)):
            found.add(slug(m.group(1)))
    return found


def broken_links(path: Path, text: str) -> list[str]:
    """Problems with the links and `*.md#anchor` references of one file."""
    problems = []
    targets = []
    if path.suffix == ".md":
        for target in MD_LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                if target.startswith("#") and target[1:] not in anchors(path):
                    problems.append(f"{target}: no such heading in {path.name}")
                continue
            file, _, anchor = target.partition("#")
            targets.append(((path.parent / file).resolve(), anchor, target))
    for file, anchor in DOC_REFERENCE.findall(text):
        base = path.parent if path.suffix == ".md" and not file.startswith("docs/") else REPO
        targets.append(((base / file).resolve(), anchor, f"{file}#{anchor}"))
    for resolved, anchor, shown in targets:
        try:
            resolved.relative_to(REPO)
        except ValueError:
            problems.append(f"{shown}: outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{shown}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{shown}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    return list(dict.fromkeys(problems))  # a Markdown link is also a reference: report it once


def test_every_link_and_doc_reference_resolves_inside_the_repository():
    problems = []
    for path in tracked_files():
        if not path.is_file() or path == Path(__file__).resolve():
            continue  # deleted in the work tree, not yet committed; or this file, whose examples are broken on purpose
        text = path.read_text(encoding="utf-8", errors="replace")
        problems += [f"{path.relative_to(REPO)}: {p}" for p in broken_links(path, text)]
    assert not problems, "\n".join(problems)


def test_nothing_names_documents_outside_the_repository_or_build_machine_paths():
    hits = []
    for path in tracked_files():
        if path == Path(__file__) or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            hits += [f"{path.relative_to(REPO)}:{n}: {name}" for name in OUTSIDE if name in line]
    assert not hits, "\n".join(hits)


def test_the_method_document_covers_every_stage_and_difference():
    method = REPO / "docs" / "method.md"
    headings = anchors(method)
    for section in ("stage-1-localization", "retriever", "negative-filter", "segmentor", "retrieval-inputs",
                    "stage-2-learning", "losses", "e-the-text-embedding", "generation", "evaluation",
                    "differences-from-the-published-code", "options"):
        assert section in headings, section


@pytest.mark.parametrize("text,problem", [
    ("see [the spec](../../elsewhere/SPEC.md) for details", "outside the repository"),
    ("see [the guide](docs/nowhere.md)", "no such file"),
    ("see [the method](docs/method.md#no-such-section)", "no heading"),
    ("the stop rule (docs/method.md#not-a-heading)", "no heading"),
])
def test_the_checker_catches_a_broken_link(text, problem):
    found = broken_links(REPO / "README.md", text)
    assert len(found) == 1 and problem in found[0], found


def test_the_checker_accepts_good_links():
    assert broken_links(REPO / "README.md", "[method](docs/method.md#retrieval-inputs) and "
                                            "[site](https://example.org/x.md#y) and docs/method.md#options") == []
