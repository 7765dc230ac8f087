"""The concept library and composition in the SDK: the readable prompt syntax, the typed results, the report of a
composition, and the `ice concepts` / `ice compose` commands. `IceClient` and `AsyncIceClient` call these.

The readable syntax (what `ice compose` and `IceClient.compose` take) names a token as `{JOB:CONCEPT}` (the concept
token) or `{JOB:CONCEPT.ATTRIBUTE}` (an intrinsic token), e.g.

    "a photo of {3f9a:c0} in {b07c:c1.colour} colour"

JOB is a job id, `operations/ID`, a unique prefix of a job id in the library (at least 4 characters), or an alias
given with `aliases` (`--job NAME=JOB`); CONCEPT is the concept id ("c0"); ATTRIBUTE the anchor word ("color";
British "colour" is read as "color" when the concept has no "colour" token). `{operations/ID/concepts/C}` and
`{operations/ID/concepts/C/tokens/A}`, the contract's own form, pass through; `{{` and `}}` are literal braces.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.types import _Jsonable, _no_json, decode_png
from ice.concept_names import BadName, Ref, format_prompt, parse_name, parse_prompt
from ice.learner.v1 import learner_pb2

MIN_PREFIX = 4
SPELLINGS = {"colour": "color", "color": "colour"}  # tried when a concept has no token of the word as written
_READABLE = re.compile(r"^\s*([^:{}\s]+)\s*:\s*([A-Za-z0-9_-]{1,64})(?:\.([^{}]+?))?\s*$")
DELTAS = ("tokens_only", "one_job", "merged_lora")


# --- typed results --------------------------------------------------------------------------------------------
@dataclass
class LibraryToken(_Jsonable):
    name: str  # operations/{job}/concepts/{concept}/tokens/{attribute}
    token: str  # in its own job, e.g. "<$0>"
    attribute: str


@dataclass
class LibraryConcept(_Jsonable):
    """A concept of the library (`ListConcepts`, `GetConcept`): a succeeded job's concept, its tokens, its job's
    manifest; `mask_png` and `source_crop_png` with the full view only."""

    name: str  # operations/{job}/concepts/{concept}
    job_id: str
    concept_id: str
    noun: str
    concept_token: str
    instance_token: str
    intrinsic_tokens: list[LibraryToken]
    anchors: list[str]
    source_image_sha256: str
    bundle_sha256: str
    schedule: dict[str, Any]
    ablation: str
    refinement_delta: str  # FULL | LORA | NONE
    lora_rank: int | None
    seed: int
    create_time: float
    replica_address: str
    mask_png: bytes = _no_json()
    source_crop_png: bytes = _no_json()

    @property
    def attributes(self) -> list[str]:
        return [t.attribute for t in self.intrinsic_tokens]

    def crop(self):
        return decode_png(self.source_crop_png).convert("RGB")


@dataclass
class ComposedImage(_Jsonable):
    prompt: str  # as written (the readable syntax, when that is what was given)
    expanded_prompt: str  # as the text encoder read it ("a photo of <&0@JOB>")
    index: int
    seed: int
    references: list[str]  # resource names of the tokens it uses
    image_png: bytes = _no_json()

    def pil(self):
        return decode_png(self.image_png).convert("RGB")


@dataclass
class Composition(_Jsonable):
    """What `compose` returns: the images, the concepts they use (with their source crops), how they were made."""

    prompts: list[str]
    wire_prompts: list[str]
    delta: str
    delta_job: str
    images: list[ComposedImage]
    concepts: list[LibraryConcept] = field(default_factory=list)
    out_dir: str | None = None


def library_concept(c: learner_pb2.LibraryConcept) -> LibraryConcept:
    from google.protobuf.json_format import MessageToDict

    delta = {learner_pb2.REFINEMENT_DELTA_FULL: "FULL", learner_pb2.REFINEMENT_DELTA_LORA: "LORA"}
    return LibraryConcept(
        c.name, c.job_id, c.concept_id, c.noun, c.concept_token, c.instance_token,
        [LibraryToken(t.name, t.token, t.attribute) for t in c.intrinsic_tokens], list(c.anchors),
        c.source_image_sha256, c.bundle_sha256, MessageToDict(c.schedule, preserving_proto_field_name=True),
        learner_pb2.Ablation.Name(c.ablation).removeprefix("ABLATION_"), delta.get(c.refinement_delta, "NONE"),
        c.lora_rank if c.HasField("lora_rank") else None, c.seed, c.create_time.ToNanoseconds() / 1e9,
        c.replica_address, c.mask, c.source_crop)


def composed_image(r: learner_pb2.GenerateCompositionResponse, readable: dict[str, str]) -> ComposedImage:
    return ComposedImage(readable.get(r.prompt, r.prompt), r.expanded_prompt, r.index, r.seed, list(r.references),
                         r.image)


# --- requests -------------------------------------------------------------------------------------------------
def view(full: bool) -> int:
    return learner_pb2.CONCEPT_VIEW_FULL if full else learner_pb2.CONCEPT_VIEW_BASIC


def delta_value(delta: str) -> int:
    key = delta.lower().replace("-", "_")
    if key not in DELTAS:
        raise ValueError(f"unknown delta {delta!r}; one of: {', '.join(DELTAS)}")
    return learner_pb2.CompositionDelta.Value("COMPOSITION_DELTA_" + key.upper())


def filter_text(filter: str = "", **fields: str | None) -> str:
    """An AIP-160 filter from `filter` and field=value pairs (None and "" left out), joined by AND."""
    terms = [filter.strip()] if filter.strip() else []
    terms += [f'{k} = "{v}"' for k, v in fields.items() if v]
    return " AND ".join(terms)


def composition_request(prompts: list[str], delta: str, delta_job: str | None,
                        options) -> learner_pb2.GenerateCompositionRequest:
    request = learner_pb2.GenerateCompositionRequest(prompts=prompts, delta=delta_value(delta),
                                                     delta_job=_job_name(delta_job) if delta_job else "")
    for name in ("num_images", "seed", "num_inference_steps", "guidance_scale"):
        if options is not None and getattr(options, name) is not None:
            setattr(request, name, getattr(options, name))
    return request


def export_request(names: list[str], delta: str, delta_job: str | None, prompt: str,
                   options) -> learner_pb2.ExportConceptsRequest:
    request = learner_pb2.ExportConceptsRequest(names=names, delta=delta_value(delta), prompt=prompt,
                                                delta_job=_job_name(delta_job) if delta_job else "")
    for name in ("seed", "num_inference_steps", "guidance_scale"):
        if options is not None and getattr(options, name) is not None:
            setattr(request, name, getattr(options, name))
    return request


def _job_name(job: str) -> str:
    return job if job.startswith("operations/") else f"operations/{job}"


# --- the readable syntax ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Readable:
    """One `{JOB:CONCEPT.ATTRIBUTE}` reference as written, before its job is resolved."""

    job: str
    concept_id: str
    attribute: str | None
    text: str


def _reference(inner: str) -> Ref | Readable:
    if inner.startswith("operations/") and "/concepts/" in inner:
        return parse_name(inner)
    m = _READABLE.match(inner)
    if m is None:
        raise BadName(f"{{{inner}}} is not a reference: write {{JOB:CONCEPT}} or {{JOB:CONCEPT.ATTRIBUTE}}, "
                      "e.g. {3f9a:c0.color}")
    return Readable(m.group(1), m.group(2), m.group(3).strip() if m.group(3) else None, inner)


def parse_readable(prompt: str) -> list[str | Ref | Readable]:
    """A prompt in the readable syntax as text, resolved references (the contract's own form) and readable ones;
    ValueError saying what is wrong."""
    try:
        return parse_prompt(prompt, _reference)
    except BadName as exc:
        raise ValueError(f"{prompt!r}: {exc}") from None


def job_of(job: str, known_jobs: list[str], aliases: dict[str, str]) -> str:
    """The job id a reference's JOB stands for (an alias, an id, operations/ID, or a unique prefix)."""
    job = aliases.get(job, job).removeprefix("operations/")
    if job in known_jobs:
        return job
    if re.fullmatch(r"[0-9a-f]{32}", job):
        return job  # a full id the library does not list: the server says NOT_FOUND
    if len(job) < MIN_PREFIX or not re.fullmatch(r"[0-9a-f]+", job):
        raise ValueError(f"{job!r} is not a job: give its id (or at least {MIN_PREFIX} of its first characters), "
                         "operations/ID, or an alias (--job NAME=ID)")
    hits = [j for j in known_jobs if j.startswith(job)]
    if len(hits) != 1:
        raise ValueError(f"{job!r} is the beginning of {len(hits)} jobs of the library"
                         + (f" ({', '.join(h[:12] for h in hits[:4])}...); give more of it" if hits else ""))
    return hits[0]


def needs_listing(parts: list, aliases: dict[str, str]) -> bool:
    """True when a reference names its job by a prefix: the whole library is listed to resolve it."""
    for p in parts:
        if isinstance(p, Readable):
            job = aliases.get(p.job, p.job).removeprefix("operations/")
            if not re.fullmatch(r"[0-9a-f]{32}", job):
                return True
    return False


def resolve(parts: list, concepts: list[LibraryConcept], aliases: dict[str, str]) -> list[str | Ref]:
    """The parsed prompt with every readable reference resolved against the library's `concepts`."""
    jobs = list(dict.fromkeys(c.job_id for c in concepts))
    by_name = {c.name: c for c in concepts}
    out: list[str | Ref] = []
    for p in parts:
        if not isinstance(p, Readable):
            out.append(p)
            continue
        ref = Ref(job_of(p.job, jobs, aliases), p.concept_id, p.attribute)
        concept = by_name.get(ref.concept_name)
        if concept is not None and p.attribute is not None and p.attribute not in concept.attributes:
            other = SPELLINGS.get(p.attribute)
            if other in concept.attributes:
                ref = Ref(ref.job_id, ref.concept_id, other)
        out.append(ref)
    return out


def wire_prompt(parts: list[str | Ref]) -> str:
    return format_prompt(parts)


def braced(ref: str) -> str:
    """A reference given alone (`JOB:c0`, `operations/J/concepts/c0`) as the prompt piece `{...}`."""
    return ref if ref.strip().startswith("{") else "{" + ref.strip() + "}"


def listing(parsed: list[list], aliases: dict[str, str], jobs: list[str | None] = ()) -> list[str] | None:
    """What to list to resolve `parsed` (and the `jobs` named on their own, e.g. a delta job): None = the whole
    library (a job named by a prefix), else the ids of the jobs whose concepts are fetched."""
    named = [Readable(j, "c0", None, j) for j in jobs if j]
    if needs_listing([p for parts in parsed for p in parts] + named, aliases):
        return None
    ids = [aliases.get(p.job, p.job).removeprefix("operations/") if isinstance(p, Readable) else p.job_id
           for parts in parsed for p in parts if isinstance(p, Readable | Ref)]
    ids += [aliases.get(j, j).removeprefix("operations/") for j in jobs if j]
    return list(dict.fromkeys(ids))


def resolve_job(job: str | None, concepts: list[LibraryConcept], aliases: dict[str, str]) -> str:
    """The id of a job named on its own (an alias, an id, a prefix); "" for None."""
    if not job:
        return ""
    return job_of(job, list(dict.fromkeys(c.job_id for c in concepts)), aliases)


def single_ref(parts: list, given: str) -> Ref:
    refs = [p for p in parts if isinstance(p, Ref)]
    if len(refs) != 1 or len(parts) != 1:
        raise ValueError(f"{given!r} is not one reference: write JOB:CONCEPT or JOB:CONCEPT.ATTRIBUTE")
    return refs[0]


def referenced_concepts(parts_list: list[list]) -> list[str]:
    """Concept names of every reference, in order of first appearance."""
    return list(dict.fromkeys(p.concept_name for parts in parts_list for p in parts if isinstance(p, Ref)))


# --- the report -------------------------------------------------------------------------------------------------
def write_composition(c: Composition, out_dir: Path) -> Path:
    """`out_dir/composition.html` (each prompt's source crops beside its images), the images in `composed/`, the
    crops in `concepts/`, and `composition.json`. Returns the page's path."""
    from client.report import _e, _img, _page, atomic_write, grid

    out_dir.mkdir(parents=True, exist_ok=True)
    crops = {}
    for concept in c.concepts:
        rel = f"concepts/{concept.job_id}_{concept.concept_id}.png"
        if concept.source_crop_png:
            atomic_write(out_dir / rel, concept.source_crop_png)
            crops[concept.name] = rel
    files = []
    for k, prompt in enumerate(dict.fromkeys(i.prompt for i in c.images)):
        images = [i for i in c.images if i.prompt == prompt]
        names = []
        for img in images:
            rel = f"composed/p{k}/{img.index}.png"
            atomic_write(out_dir / rel, img.image_png)
            names.append(rel)
        grid_rel = f"composed/p{k}/grid.png"
        buf = io.BytesIO()
        grid([i.pil() for i in images]).save(buf, format="PNG")
        atomic_write(out_dir / grid_rel, buf.getvalue())
        files.append((prompt, images, names, grid_rel))
    by_name = {concept.name: concept for concept in c.concepts}
    parts = [f"<h1>ICE composition: {len(c.prompts)} prompt(s), {len(c.images)} image(s)</h1>",
             f"<p>Delta: <b>{_e(c.delta.replace('_', ' '))}</b>"
             + (f" (job <code>{_e(c.delta_job)}</code>)" if c.delta_job else "") + ".</p>"]
    for prompt, images, names, grid_rel in files:
        block = [f'<div class="concept"><h3><code>{_e(prompt)}</code></h3>',
                 f"<p>as read by the text encoder: <code>{_e(images[0].expanded_prompt)}</code></p>",
                 '<div class="row">']
        for ref in images[0].references:
            concept_name = ref.split("/tokens/")[0]
            concept = by_name.get(concept_name)
            attribute = ref.split("/tokens/")[1] if "/tokens/" in ref else "concept"
            if concept is None or concept_name not in crops:
                continue
            block.append(f"<figure>{_img(crops[concept_name], 'source of ' + concept.noun, 128, True)}"
                         f"<figcaption><b>{_e(concept.noun)}</b> ({_e(attribute)})<br>job "
                         f"<code>{_e(concept.job_id[:12])}</code> {_e(concept.concept_id)}</figcaption></figure>")
        block.append(f'<figure>{_img(grid_rel, "composed images", 320, True)}<figcaption>'
                     + ", ".join(f'<a href="{_e(n)}">seed {i.seed}</a>' for n, i in zip(names, images, strict=True))
                     + "</figcaption></figure></div></div>")
        parts.append("".join(block))
    record = c.to_dict()
    record["files"] = {"crops": crops, "images": [n for _, _, names, _ in files for n in names]}
    atomic_write(out_dir / "composition.json", json.dumps(record, indent=2))
    c.out_dir = str(out_dir)
    page = out_dir / "composition.html"
    atomic_write(page, _page("ICE composition", "\n".join(parts)))
    return page


# --- the CLI ----------------------------------------------------------------------------------------------------
def _aliases(values: list[str] | None) -> dict[str, str]:
    from client.cli import UsageError

    out = {}
    for v in values or []:
        name, sep, job = v.partition("=")
        if not sep or not name or not job:
            raise UsageError(f"--job {v!r}: expected NAME=JOB")
        out[name] = job
    return out


def _concept_line(c: LibraryConcept) -> str:
    tokens = " ".join([c.concept_token] + [f"{t.token}={t.attribute}" for t in c.intrinsic_tokens])
    return f"{c.name}  {c.noun:12s} {tokens}  delta {c.refinement_delta.lower()}"


def cmd_concepts(a) -> int:
    from client.cli import _client, _emit, writable_dir

    ice = _client(a)
    if a.concepts_command == "list":
        found = ice.concepts(filter=filter_text(a.filter or "", noun=a.noun, attribute=a.attribute, job=a.job,
                                                bundle=a.bundle, refinement_delta=a.delta))
        _emit(a, [c.to_dict() for c in found], "\n".join(_concept_line(c) for c in found) or "no concepts")
        return 0
    if a.concepts_command == "show":
        c = ice.concept(a.name)
        text = _concept_line(c) + f"\nlearned on bundle {c.bundle_sha256[:16]}..., source image " \
                                  f"{c.source_image_sha256[:16]}..., seed {c.seed}"
        if a.out:
            out = writable_dir(a.out)
            (out / f"{c.concept_id}_mask.png").write_bytes(c.mask_png)
            (out / f"{c.concept_id}_crop.png").write_bytes(c.source_crop_png)
            (out / f"{c.concept_id}.json").write_text(json.dumps(c.to_dict(), indent=2))
            text += f"\nwritten to {out}"
        _emit(a, c.to_dict(), text)
        return 0
    out = writable_dir(a.out)  # export
    written = ice.export_concepts(a.refs, out, delta=a.delta, delta_job=a.delta_job, prompt=a.prompt or "",
                                  aliases=_aliases(a.alias))
    _emit(a, {"files": [str(p) for p in written], "out": str(out)},
          f"{len(written)} file(s) in {out}; render with: python {out / 'compose_example.py'} BUNDLE/diffusion")
    return 0


def cmd_compose(a) -> int:
    from client.cli import _client, _emit, _generate_options, writable_dir

    out = writable_dir(a.out)
    composition = _client(a).compose(a.prompt, delta=a.delta, delta_job=a.delta_job, options=_generate_options(a),
                                     aliases=_aliases(a.alias), out_dir=out)
    _emit(a, composition.to_dict(), f"{len(composition.images)} image(s); report: {out / 'composition.html'}")
    return 0


def add_commands(sub, conn, gen) -> None:
    """`ice concepts list|show|export` and `ice compose` on the CLI's sub-command parser."""
    delta_help = "refinement delta: tokens_only (the base UNet), one_job (--delta-job's), merged_lora"
    p = sub.add_parser("concepts", help="the concept library: list, show, export for plain diffusers")
    csub = p.add_subparsers(dest="concepts_command", required=True, metavar="ACTION")
    q = csub.add_parser("list", parents=[conn], help="every concept of the library (filters join with AND)")
    q.add_argument("--filter", help='an AIP-160 filter, e.g. \'noun = "cup" AND attribute = color\'')
    for name in ("noun", "attribute", "job", "bundle"):
        q.add_argument(f"--{name}")
    q.add_argument("--delta", choices=["FULL", "LORA", "NONE"], help="the job's refinement delta")
    q = csub.add_parser("show", parents=[conn], help="one concept: its tokens and manifest (and its images)")
    q.add_argument("name", help="operations/JOB/concepts/C (or .../tokens/ATTRIBUTE), or JOB:C")
    q.add_argument("--out", type=Path, help="write its mask, source crop and record here")
    q = csub.add_parser("export", parents=[conn], help="a folder plain diffusers loads, with an example")
    q.add_argument("refs", nargs="+", metavar="REF", help="JOB:CONCEPT (all its tokens) or JOB:CONCEPT.ATTRIBUTE")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--prompt", help='the example\'s prompt, e.g. "a photo of {JOB:c0} in {JOB2:c1.color} color"')
    q.add_argument("--delta", choices=DELTAS, default="tokens_only", help=delta_help)
    q.add_argument("--delta-job", help="with --delta one_job: the job whose delta is applied")
    q.add_argument("--job", dest="alias", action="append", metavar="NAME=JOB", help="an alias for a job")
    p.set_defaults(run=cmd_concepts)

    p = sub.add_parser("compose", parents=[conn, gen], help="images from tokens of several jobs; a report")
    p.add_argument("prompt", nargs="+", help='e.g. "a photo of {3f9a:c0} in {b07c:c1.colour} colour"')
    p.add_argument("--out", type=Path, required=True, help="output folder: composition.html and the images")
    p.add_argument("--delta", choices=DELTAS, default="tokens_only", help=delta_help)
    p.add_argument("--delta-job", help="with --delta one_job: the job whose delta is applied")
    p.add_argument("--job", dest="alias", action="append", metavar="NAME=JOB",
                   help="an alias for a job, used as {NAME:c0} (repeatable)")
    p.set_defaults(run=cmd_compose)
