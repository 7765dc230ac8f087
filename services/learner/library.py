"""The concept library: every succeeded job's concepts with their tokens and manifest, where every learner replica
of a deployment finds them (docs/learner.md#the-concept-library).

A job lives on the replica that learned it (its SQLite record, checkpoints and artifacts on that replica's
disk); its concepts are published, when it succeeds, to the library's location (`--concept-library`): by default
`<job-store>/library` (one replica), or a folder every replica shares — object storage through fsspec
(`s3://bucket/prefix`, `gs://...`, `az://...`) or a shared file system. Layout under it:

    entries/{job_id}.json                       the job's entry: what `ListConcepts` shows (written last)
    files/{job_id}/learned_embeds.safetensors   the job's tokens
    files/{job_id}/manifest.json                its manifest
    files/{job_id}/unet_delta.safetensors       its refinement delta, when it has one (or
                  /pytorch_lora_weights.safetensors)
    files/{job_id}/masks/{concept_id}.png       each concept's mask on the training square
    files/{job_id}/crops/{concept_id}.png       what the concept was learned from (for reports)

An entry is written once, after every file it names (each file one whole-object write: an object appears whole
or not at all; on a file system a temporary file renamed into place), and it records each file's SHA-256, which
a reader checks. So a reader sees a job's concepts complete or not at all, and an entry never changes: readers
cache it by job id. Deleting a job removes its entry first, then its files. Nothing here imports gRPC.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ice.concept_names import Ref
from services.common.bundle import sha256_file
from services.common.errors import FailedPrecondition, IceError, InvalidArgument, NotFound, Unavailable
from services.common.images import encode_png
from services.learner.artifacts import EMBEDS, LORA, MANIFEST, UNET_DELTA, read_manifest

log = logging.getLogger("ice.learner.library")

FORMAT = 1
SOURCE = "source.json"  # in a job's input folder: the SHA-256 of the image the request sent
SYNC_SECONDS = 30.0  # how often a replica publishes what it could not publish at once, and prunes its cache
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class Store:
    """The library's folder: local (a path or file://) or object storage (any other fsspec URL). Errors of the
    storage itself (unreachable, refused credentials) are `Unavailable`: the caller may retry."""

    def __init__(self, location: str | Path):
        self.location = str(location).rstrip("/")
        url = _URL.match(self.location)
        self.fs = None
        if url and url.group(1) != "file":
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.location)
            except (ImportError, ValueError) as exc:
                raise SystemExit(f"--concept-library {self.location}: {exc} (object storage needs fsspec and the "
                                 "cloud's package: s3fs, gcsfs or adlfs)") from None
            self.root = self.root.rstrip("/")
        else:
            self.root = self.location[len("file://"):] if url else self.location

    def __repr__(self) -> str:
        return self.location

    @property
    def local(self) -> bool:
        return self.fs is None

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    @contextlib.contextmanager
    def _errors(self, what: str):
        try:
            yield
        except (FileNotFoundError, NotADirectoryError, IceError):
            raise
        except Exception as exc:  # each back-end raises its own types (botocore, azure-core ...)
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise Unavailable(f"the concept library at {self.location} cannot be {what}: {first}") from exc

    def read(self, rel: str) -> bytes | None:
        """The file's bytes; None when it does not exist."""
        try:
            with self._errors("read"):
                if self.local:
                    return Path(self.path(rel)).read_bytes()
                return self.fs.cat_file(self.path(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """The contents of those of `rels` that exist, fetched concurrently from object storage."""
        if self.local or len(rels) < 2:
            return {r: data for r in rels if (data := self.read(r)) is not None}
        paths = {self.path(r): r for r in rels}
        with self._errors("read"):
            got = self.fs.cat(list(paths), on_error="omit")
        return {paths.get(p, paths.get(self.fs._strip_protocol(p))): data for p, data in got.items()}

    def write(self, rel: str, data: bytes) -> None:
        with self._errors("written"):
            if self.local:
                _replace_local(Path(self.path(rel)), lambda tmp: tmp.write_bytes(data))
            else:
                self.fs.pipe_file(self.path(rel), data)

    def put(self, local: Path, rel: str) -> None:
        """Copy a local file in (on the same file system a hard link: a job's artifacts cost no second copy)."""
        with self._errors("written"):
            if self.local:
                target = Path(self.path(rel))

                def fill(tmp: Path) -> None:
                    tmp.unlink()
                    try:
                        os.link(local, tmp)
                    except OSError:
                        shutil.copyfile(local, tmp)

                _replace_local(target, fill)
            else:
                self.fs.put_file(str(local), self.path(rel))

    def get(self, rel: str, local: Path) -> None:
        """Download one file to `local` (replaced whole)."""
        with self._errors("read"):
            if self.local:
                shutil.copyfile(self.path(rel), local)
            else:
                self.fs.get_file(self.path(rel), str(local))

    def names(self, rel: str) -> list[str]:
        """The names of the files directly in a folder; [] when it does not exist. Never a cached listing: what
        another replica wrote a moment ago is listed."""
        try:
            with self._errors("listed"):
                if self.local:
                    return sorted(p.name for p in Path(self.path(rel)).iterdir() if not p.name.startswith("."))
                path = self.path(rel)
                self.fs.invalidate_cache(path)
                return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, rel: str) -> None:
        """Remove a file or a folder and everything under it; nothing when it is absent."""
        with self._errors("written"):
            if self.local:
                target = Path(self.path(rel))
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
                return
            path = self.path(rel)
            with contextlib.suppress(FileNotFoundError):
                if self.fs.exists(path):
                    self.fs.rm(path, recursive=True)
            self.fs.invalidate_cache(path)


def _replace_local(target: Path, fill: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        fill(Path(tmp))
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# -- entries ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Concept:
    """One concept of an entry."""

    job_id: str
    index: int  # its order in the job
    concept_id: str
    noun: str
    tokens: tuple[dict, ...]  # {"token", "role", "attribute"} as in the manifest
    entry: Entry

    @property
    def name(self) -> str:
        return Ref(self.job_id, self.concept_id).name

    def token(self, attribute: str | None) -> str | None:
        """The concept token (attribute None) or the intrinsic token of `attribute`; None when it has none."""
        for t in self.tokens:
            if (attribute is None and t["role"] == "concept") or (
                    attribute is not None and t["role"] == "intrinsic" and t["attribute"] == attribute):
                return t["token"]
        return None

    @property
    def attributes(self) -> list[str]:
        return [t["attribute"] for t in self.tokens if t["role"] == "intrinsic"]


@dataclass(frozen=True, eq=False)
class Entry:
    """A published job: `entries/{job_id}.json`."""

    data: dict

    @property
    def job_id(self) -> str:
        return self.data["job_id"]

    @property
    def bundle(self) -> str:
        return self.data["bundle_sha256"]

    @property
    def refinement(self) -> str:
        return self.data["refinement"]  # "full" | "lora" | "none"

    @property
    def delta_file(self) -> str | None:
        return self.data.get("delta_file")

    def concepts(self) -> list[Concept]:
        return [Concept(self.job_id, i, c["concept_id"], c["noun"], tuple(c["tokens"]), self)
                for i, c in enumerate(self.data["concepts"])]

    def concept(self, concept_id: str) -> Concept | None:
        return next((c for c in self.concepts() if c.concept_id == concept_id), None)

    def sort_key(self) -> tuple:
        return (self.data["create_time"], self.job_id)


def entry_rel(job_id: str) -> str:
    return f"entries/{job_id}.json"


def crop(image: Image.Image, mask: np.ndarray, margin: float = 0.15) -> Image.Image:
    """The image cut to the mask's bounding box (plus a margin), the pixels outside the mask dimmed to a fifth."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    pixels[~mask] *= 0.2
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    pad_y, pad_x = int(margin * (ys.max() - ys.min() + 1)), int(margin * (xs.max() - xs.min() + 1))
    box = (max(0, xs.min() - pad_x), max(0, ys.min() - pad_y), min(w, xs.max() + 1 + pad_x),
           min(h, ys.max() + 1 + pad_y))
    return Image.fromarray(pixels.round().astype(np.uint8)).crop(box)


class Library:
    """The entries at one location, and a cache of their files on this replica (`cache_dir`)."""

    def __init__(self, location: str | Path, cache_dir: Path):
        self.store = Store(location)
        self.cache_dir = Path(cache_dir)
        self._entries: dict[str, Entry] = {}  # immutable once published: safe to keep
        self._verified: set[Path] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Library({self.store})"

    # -- writing (the replica that owns the job) ---------------------------------------------------------------

    def publish(self, job_id: str, job_dir: Path, create_time: float, replica_address: str = "") -> Entry:
        """Publish a succeeded job: its files, then its entry. Idempotent (a published job is left as it is)."""
        existing = self.entry(job_id)
        if existing is not None:
            return existing
        artifacts = job_dir / "artifacts"
        manifest = read_manifest(artifacts)
        files = {EMBEDS: artifacts / EMBEDS, MANIFEST: artifacts / MANIFEST}
        if manifest.get("unet_delta") in (UNET_DELTA, LORA):
            files[manifest["unet_delta"]] = artifacts / manifest["unet_delta"]
        with tempfile.TemporaryDirectory(prefix="ice-library-") as tmp:
            square = Image.open(job_dir / "input" / "image.png").convert("RGB")
            for c in manifest["concepts"]:
                mask_path = artifacts / c["mask"]
                mask = np.asarray(Image.open(mask_path).convert("L")) > 0
                files[f"masks/{c['concept_id']}.png"] = mask_path
                crop_path = Path(tmp) / f"crop-{c['concept_id']}.png"
                crop_path.write_bytes(encode_png(crop(square, mask)))
                files[f"crops/{c['concept_id']}.png"] = crop_path
            source = job_dir / "input" / SOURCE
            data = {
                "format": FORMAT, "job_id": job_id, "create_time": create_time, "publish_time": time.time(),
                "replica_address": replica_address, "bundle_sha256": manifest["base_bundle_digest"],
                "source_image_sha256": json.loads(source.read_text())["sha256"] if source.is_file() else "",
                "schedule": manifest["schedule"], "ablation": manifest["ablation"],
                "refinement": manifest["refinement"], "lora_rank": manifest.get("lora_rank"),
                "delta_file": manifest.get("unet_delta"), "anchors": manifest["anchors"], "seed": manifest["seed"],
                "image_size": manifest.get("image_size"),
                "concepts": [{"concept_id": c["concept_id"], "noun": c["noun"],
                              "tokens": [{"token": t["token"], "role": t["role"], "attribute": t["attribute"]}
                                         for t in manifest["tokens"] if t["concept_id"] == c["concept_id"]]}
                             for c in manifest["concepts"]],
                "files": {rel: {"sha256": sha256_file(p), "size_bytes": p.stat().st_size} for rel, p in files.items()},
            }
            for rel, p in files.items():
                self.store.put(p, f"files/{job_id}/{rel}")
        self.store.write(entry_rel(job_id), (json.dumps(data, indent=1) + "\n").encode())
        entry = Entry(data)
        with self._lock:
            self._entries[job_id] = entry
        log.info("job %s: %d concept(s) published to the concept library at %s", job_id, len(data["concepts"]),
                 self.store)
        return entry

    def remove(self, job_id: str) -> None:
        """Take a job's concepts out of the library: its entry first (readers stop seeing it), then its files."""
        self.store.remove(entry_rel(job_id))
        self.store.remove(f"files/{job_id}")
        with self._lock:
            self._entries.pop(job_id, None)
        shutil.rmtree(self.cache_dir / job_id, ignore_errors=True)

    # -- reading (any replica) ----------------------------------------------------------------------------------

    def entry(self, job_id: str) -> Entry | None:
        """The job's entry as the library holds it now (one read of the store); None when it has none."""
        data = self.store.read(entry_rel(job_id))
        if data is None:
            with self._lock:
                self._entries.pop(job_id, None)
            return None
        with self._lock:
            if job_id not in self._entries:
                self._entries[job_id] = Entry(json.loads(data))
            return self._entries[job_id]

    def entries(self) -> list[Entry]:
        """Every entry, oldest job first: one listing of the store, and a read of each entry not seen before."""
        ids = [n[: -len(".json")] for n in self.store.names("entries") if n.endswith(".json")]
        with self._lock:
            missing = [i for i in ids if i not in self._entries]
        fetched = self.store.read_many([entry_rel(i) for i in missing])
        with self._lock:
            for i in missing:
                data = fetched.get(entry_rel(i))
                if data is not None:
                    self._entries[i] = Entry(json.loads(data))
            for gone in set(self._entries) - set(ids):
                del self._entries[gone]
            found = [self._entries[i] for i in ids if i in self._entries]
        return sorted(found, key=Entry.sort_key)

    def job(self, job_id: str) -> Entry:
        """The job's entry; NOT_FOUND when the library has none."""
        entry = self.entry(job_id)
        if entry is None:
            raise NotFound(f"the concept library has no job {job_id} (it never succeeded, or it was deleted)")
        return entry

    def concept(self, ref: Ref, entry: Entry | None = None) -> Concept:
        """The concept a reference names (its token checked when it names one); NOT_FOUND otherwise. `entry`: the
        job's entry when the caller has just read it."""
        entry = entry or self.job(ref.job_id)
        concept = entry.concept(ref.concept_id)
        if concept is None:
            raise NotFound(f"job {ref.job_id} has no concept {ref.concept_id!r} (it has "
                           f"{', '.join(c.concept_id for c in entry.concepts())})")
        if concept.token(ref.attribute) is None:
            what = f"{ref.attribute!r} token" if ref.attribute is not None else "concept token"
            raise NotFound(f"concept {concept.name} has no {what} (its attributes: "
                           f"{', '.join(concept.attributes) or 'none'})")
        return concept

    def file(self, entry: Entry, rel: str) -> Path:
        """A local path of one of an entry's files, checked against its SHA-256: the library's own file for a
        local library, else a copy in this replica's cache (downloaded once)."""
        meta = entry.data["files"].get(rel)
        if meta is None:
            raise FailedPrecondition(f"job {entry.job_id} has no file {rel} in the concept library")
        store_rel = f"files/{entry.job_id}/{rel}"
        path = Path(self.store.path(store_rel)) if self.store.local else self.cache_dir / entry.job_id / rel
        with self._lock:
            if path in self._verified and path.is_file():
                return path
        if not self.store.local and not (path.is_file() and sha256_file(path) == meta["sha256"]):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
            os.close(fd)
            try:
                self.store.get(store_rel, Path(tmp))
                if sha256_file(Path(tmp)) != meta["sha256"]:
                    raise Unavailable(f"{store_rel} in the concept library does not match its entry's SHA-256")
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        elif self.store.local and (not path.is_file() or sha256_file(path) != meta["sha256"]):
            raise Unavailable(f"{store_rel} in the concept library is missing or does not match its entry")
        with self._lock:
            self._verified.add(path)
        return path

    def read_file(self, entry: Entry, rel: str) -> bytes:
        return self.file(entry, rel).read_bytes()

    def prune_cache(self, keep: Iterable[str]) -> None:
        """Drop the cached files of jobs no longer in the library."""
        keep = set(keep)
        if not self.cache_dir.is_dir():
            return
        for d in self.cache_dir.iterdir():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
                with self._lock:
                    self._verified = {p for p in self._verified if d not in p.parents}


# -- listing: filter and pages ---------------------------------------------------------------------------------

_FIELDS = {"noun": "noun", "attribute": "attribute", "job_id": "job_id", "job": "job_id",
           "bundle_sha256": "bundle_sha256", "bundle": "bundle_sha256", "source_image_sha256": "source_image_sha256",
           "refinement_delta": "refinement_delta"}
_TERM = re.compile(r'\s*([A-Za-z_]+)\s*(!=|=)\s*("(?:[^"\\]|\\.)*"|[^\s"()]+)\s*')


def parse_filter(text: str) -> list[tuple[str, str, str]]:
    """An AIP-160 filter of `FIELD = VALUE` / `FIELD != VALUE` terms joined by AND -> [(field, op, value)]."""
    terms, rest = [], text.strip()
    if not rest:
        return terms
    for i, part in enumerate(re.split(r"\s+AND\s+", rest)):
        m = _TERM.fullmatch(part)
        if m is None:
            raise InvalidArgument(f"term {i + 1} ({part.strip()!r}) is not FIELD = VALUE or FIELD != VALUE; terms "
                                  f"join with AND, on {', '.join(sorted(set(_FIELDS)))}", field="filter")
        name, op, value = m.groups()
        if name not in _FIELDS:
            raise InvalidArgument(f"unknown field {name!r}; filter on {', '.join(sorted(set(_FIELDS)))}",
                                  field="filter")
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        field = _FIELDS[name]
        if field == "job_id":
            value = value.removeprefix("operations/")
        elif field == "refinement_delta":
            value = value.upper().removeprefix("REFINEMENT_DELTA_")
            if value not in ("FULL", "LORA", "NONE"):
                raise InvalidArgument(f"refinement_delta is FULL, LORA or NONE, not {value!r}", field="filter")
        terms.append((field, op, value))
    return terms


def _values(c: Concept, field: str) -> list[str]:
    d = c.entry.data
    if field == "noun":
        return [c.noun]
    if field == "attribute":
        return c.attributes
    if field == "job_id":
        return [c.job_id]
    if field == "refinement_delta":
        return [d["refinement"].upper()]
    return [d.get(field, "")]


def matches(c: Concept, terms: list[tuple[str, str, str]]) -> bool:
    for field, op, value in terms:
        present = value in _values(c, field)
        if present != (op == "="):
            return False
    return True


def page_token(after: tuple, scope: str) -> str:
    data = json.dumps({"after": list(after), "scope": hashlib.sha256(scope.encode()).hexdigest()[:16]})
    return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def read_page_token(token: str, scope: str) -> tuple | None:
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, sent_scope = tuple(data["after"]), data["scope"]
        if len(after) != 3:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("not a page token from ListConcepts", field="page_token") from None
    if sent_scope != hashlib.sha256(scope.encode()).hexdigest()[:16]:
        raise InvalidArgument("was issued for another parent or filter; send the same ones", field="page_token")
    return after


def list_page(library: Library, parent_job: str | None, filter_text: str, page_size: int,
              token: str) -> tuple[list[Concept], str]:
    """One page of the concepts under `parent_job` (None: every job) that match the filter, and the next token.
    The token holds the last concept's sort key, so pages stay right while concepts come and go."""
    terms = parse_filter(filter_text)
    scope = f"{parent_job or '-'}\n{filter_text.strip()}"
    after = read_page_token(token, scope)
    out, more = [], False
    for entry in library.entries():
        if parent_job is not None and entry.job_id != parent_job:
            continue
        for c in entry.concepts():
            key = (*entry.sort_key(), c.index)
            if after is not None and key <= after:
                continue
            if not matches(c, terms):
                continue
            if len(out) == page_size:
                more = True
                break
            out.append(c)
        if more:
            break
    last = out[-1] if out else None
    return out, page_token((*last.entry.sort_key(), last.index), scope) if more and last else ""


# -- keeping the library in step with this replica's jobs -----------------------------------------------------


class Publisher:
    """Publishes this replica's succeeded jobs and removes deleted ones, under one lock so that a job being deleted
    is never published again behind its deletion. A job whose publication failed (the store unreachable) is
    retried every `SYNC_SECONDS`, as is the first publication of jobs that succeeded before the library existed."""

    def __init__(self, library: Library, succeeded: Callable[[], list[tuple[str, Path, float]]],
                 replica_address: str = ""):
        self.library = library
        self.succeeded = succeeded  # -> [(job_id, job_dir, create_time)] of this replica's succeeded jobs
        self.replica_address = replica_address
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self, job_id: str, job_dir: Path, create_time: float) -> None:
        """At a job's success: publish it now; a failure is logged and retried by `sync`."""
        try:
            with self.lock:
                self.library.publish(job_id, job_dir, create_time, self.replica_address)
        except Exception as exc:  # noqa: BLE001 - the job succeeded; its publication is retried
            log.warning("job %s: not published to the concept library yet (%s); retrying every %.0f s", job_id,
                        getattr(exc, "message", exc), SYNC_SECONDS)

    def delete(self, job_id: str, delete_job: Callable[[], None]) -> None:
        """Remove the job's concepts, then the job itself (`delete_job`); nothing is deleted when the library
        cannot be written (UNAVAILABLE: retry)."""
        with self.lock:
            self.library.remove(job_id)
            delete_job()

    def sync(self) -> None:
        listed = {e.job_id for e in self.library.entries()}
        for job_id, job_dir, create_time in self.succeeded():
            if job_id not in listed and not self._stop.is_set():
                with self.lock:
                    if (job_dir / "artifacts" / MANIFEST).is_file():
                        self.library.publish(job_id, job_dir, create_time, self.replica_address)
                        listed.add(job_id)
        self.library.prune_cache(listed)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 - the store may come back
                log.warning("concept library sync failed: %s", getattr(exc, "message", exc))
            self._stop.wait(SYNC_SECONDS)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="concept-library", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
