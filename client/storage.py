"""Where `ice batch` reads images and manifests and writes results: a local folder, or object storage.

A location is a local path, or a URL that fsspec understands: `s3://bucket/prefix`, `gs://bucket/prefix`,
`az://container/prefix` (also `abfs://`), `file:///abs/path`. The cloud back-ends are the packages of the `batch`
extra (s3fs, gcsfs, adlfs); credentials come from the environment the way each cloud's SDK finds them (on
Kubernetes: the pod's workload identity, docs/deployment.md), never from flags.

What the batch needs from a store, and how each kind provides it:
- whole-file writes that a reader never sees half done: a temporary file renamed into place on a local disk;
  one PUT on object storage (an object appears whole or not at all);
- create-only writes (the `.done` markers): an exclusive link on a local disk; a conditional PUT
  (`If-None-Match: *`, fsspec's `mode="create"`) on object storage, falling back to check-then-write on a
  back-end that does not offer one;
- reads of many small files at once (markers, summaries): one concurrent request batch on object storage.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_url(text: str | Path) -> bool:
    """True for `scheme://...` (object storage or file://), False for a plain local path."""
    return isinstance(text, str) and _URL.match(text) is not None


def join(base: str | Path, rel: str) -> str | Path:
    """`rel` under `base`, for a URL or a local path alike."""
    if isinstance(base, Path) or not is_url(base):
        return Path(base) / rel
    return base.rstrip("/") + "/" + rel.lstrip("/")


def parent(location: str | Path) -> str | Path:
    if isinstance(location, Path) or not is_url(location):
        return Path(location).parent
    scheme, rest = location.split("://", 1)
    return f"{scheme}://{rest.rstrip('/').rsplit('/', 1)[0]}" if "/" in rest.rstrip("/") else location


def _fs(url: str, **options: Any):
    """(fsspec file system, path inside it) of a URL; a clear error when the back-end is not installed."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        scheme = url.split("://", 1)[0]
        raise OSError(f"{url}: reading {scheme}:// needs the batch extra (pip install 'ice-serving[batch]'): "
                      f"{exc}") from None
    except ValueError as exc:  # an unknown protocol
        raise OSError(f"{url}: {exc}") from None


def read_bytes(location: str | Path) -> bytes:
    """The bytes of one file, local or remote."""
    if is_url(location):
        fs, path = _fs(str(location))
        return fs.cat_file(path)
    return Path(location).read_bytes()


class Store:
    """A folder, local or in object storage, addressed by paths relative to it ("a/b.png")."""

    def __init__(self, location: str | Path, **options: Any):
        self.location = str(location).rstrip("/") or "/"
        if is_url(self.location):
            self.fs, self.root = _fs(self.location, **options)
            self.root = self.root.rstrip("/")
            self.local = self.fs.protocol in ("file", "local") or "file" in (self.fs.protocol or ())
            if self.local:
                self.root = "/" + self.root.lstrip("/")
        else:
            self.fs, self.root, self.local = None, str(Path(self.location)), True

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    # -- addressing -------------------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The path of `rel` inside the store's file system (a local path for local stores)."""
        return self.root if not rel else f"{self.root}/{rel.strip('/')}"

    def url(self, rel: str = "") -> str:
        """How a person names `rel`: the URL (or local path) it was opened with, plus `rel`."""
        return self.location if not rel else f"{self.location}/{rel.strip('/')}"

    def local_path(self, rel: str = "") -> Path:
        assert self.local, "only a local store has local paths"
        return Path(self.path(rel))

    # -- reading ----------------------------------------------------------------------------------------------
    def is_file(self, rel: str) -> bool:
        if self.local:
            return self.local_path(rel).is_file()
        return self.fs.isfile(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            return self.local_path(rel).read_bytes()
        return self.fs.cat_file(self.path(rel))

    def read_many(self, rels: Iterable[str]) -> dict[str, bytes]:
        """The contents of those of `rels` that exist (absent ones are left out), fetched concurrently."""
        rels = list(rels)
        if not rels:
            return {}
        if self.local:
            out = {}
            for rel in rels:
                try:
                    out[rel] = self.local_path(rel).read_bytes()
                except (FileNotFoundError, NotADirectoryError):
                    continue
            return out
        paths = {self.path(rel): rel for rel in rels}
        got = self.fs.cat(list(paths), on_error="omit")
        if isinstance(got, bytes):  # a single path comes back bare
            got = {next(iter(paths)): got}
        return {paths[self.fs._strip_protocol(p)] if p not in paths else paths[p]: data for p, data in got.items()}

    def glob(self, pattern: str) -> list[str]:
        """Relative paths of the files matching `pattern` (relative to the store), sorted."""
        if self.local:
            root = self.local_path()
            return sorted(str(p.relative_to(root)) for p in root.glob(pattern) if p.is_file())
        prefix = self.root + "/"
        return sorted(p[len(prefix):] for p in self.fs.glob(self.path(pattern)) if p.startswith(prefix))

    def files(self, suffixes: Iterable[str] = ()) -> list[str]:
        """Every file under the store (recursively), as sorted relative paths, optionally by suffix."""
        suffixes = tuple(s.lower() for s in suffixes)
        if self.local:
            root = self.local_path()
            found = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        else:
            prefix = self.root + "/"
            found = [p[len(prefix):] for p in self.fs.find(self.root) if p.startswith(prefix)]
        return sorted(f for f in found if not suffixes or f.lower().endswith(suffixes))

    def is_dir(self) -> bool:
        if self.local:
            return self.local_path().is_dir()
        return self.fs.isdir(self.root)

    # -- writing ----------------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes | str, *, exclusive: bool = False) -> bool:
        """Write a whole file so that no reader sees it half done. With `exclusive`, only if it does not exist
        yet: returns False (and writes nothing) when it does."""
        data = data.encode() if isinstance(data, str) else data
        if self.local:
            return _write_local(self.local_path(rel), data, exclusive)
        path = self.path(rel)
        if not exclusive:
            self.fs.pipe_file(path, data)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a back-end without conditional writes: best effort
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True

    def remove_tree(self, rel: str) -> None:
        """Remove a folder (a prefix on object storage) and everything in it; nothing when it is absent."""
        if self.local:
            target = self.local_path(rel)
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            return
        path = self.path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache(path)

    def upload_tree(self, local_dir: Path, rel: str) -> int:
        """Copy every file under `local_dir` to `rel/`; returns the number of files."""
        files = [p for p in sorted(Path(local_dir).rglob("*")) if p.is_file()]
        if self.local:
            for p in files:
                target = self.local_path(rel) / p.relative_to(local_dir)
                _write_local(target, p.read_bytes(), False)
            return len(files)
        if files:
            self.fs.put([str(p) for p in files],
                        [self.path(f"{rel}/{p.relative_to(local_dir).as_posix()}") for p in files])
        return len(files)

    def check_writable(self) -> None:
        """Prove that a file can be written (and removed) here; raises OSError otherwise."""
        probe = f".ice-write-check-{os.getpid()}"
        if self.local:
            self.local_path().mkdir(parents=True, exist_ok=True)
        try:
            self.write_bytes(probe, b"")
        except OSError:
            raise
        except Exception as exc:  # a back-end's own error type: adlfs lets azure-core's through (no container)
            raise OSError((str(exc).splitlines() or [type(exc).__name__])[0]) from exc
        if self.local:
            self.local_path(probe).unlink()
        else:
            self.fs.rm_file(self.path(probe))


def _write_local(path: Path, data: bytes, exclusive: bool) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if exclusive:
            try:
                os.link(tmp, path)  # atomic, and fails when the file exists
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: check, then rename (best effort)
                if path.exists():
                    return False
                os.replace(tmp, path)
            return True
        os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
