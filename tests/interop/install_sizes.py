"""Installed size of a distribution with everything it depends on, as installed in this environment: the files
listed in each distribution's RECORD (what `pip uninstall` would remove), over its dependency closure.

    .venv/bin/python tests/interop/install_sizes.py ice-client ice-serving

The README's figures come from this (and tests/interop/test_client_install.py measures a fresh client-only
virtualenv the same way, as the bytes of its files)."""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(root: str) -> dict[str, metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = [(root, ())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        dist = seen[key] = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(e) for e in environments):
                todo.append((req.name, tuple(req.extras)))
    return seen


def installed_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        path = dist.locate_file(f)
        if path.is_file():
            total += path.stat().st_size
    return total


if __name__ == "__main__":
    for root in sys.argv[1:] or ["ice-client", "ice-serving"]:
        sizes = sorted(((installed_bytes(d), n) for n, d in closure(root).items()), reverse=True)
        print(f"{root}: {sum(s for s, _ in sizes) / 2**20:.0f} MiB in {len(sizes)} distributions; largest: "
              + ", ".join(f"{n} {s / 2**20:.0f} MiB" for s, n in sizes[:6]))
