"""Composition across jobs (docs/learner.md#composition-generatecomposition): prompts that mix the tokens of
several jobs of the concept library, on the base UNet, one job's refinement delta, or the jobs' LoRA deltas merged; and the export of a set of
concepts as a folder plain diffusers loads.

Every token of a job is loaded under a name of its own, `<&0>` of job J as `<&0@J>` (`renamed`): in its own job
each concept's tokens are `<&0>`, `<$0>`, ..., so the tokens of two jobs would otherwise clash. A request is
checked whole — syntax, limits, that every reference is in the library, the bundle, the delta — before any file is
fetched or any model is built (`plan`), so a refused request leaves nothing behind. Nothing here imports gRPC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import torch
from safetensors.torch import load_file, save_file

from ice.concept_names import BadName, Ref, parse_name, parse_prompt, references
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.learner.artifacts import EMBEDS, LORA, UNET_DELTA, add_unet_delta
from services.learner.library import Entry, Library

TOKENS_ONLY, ONE_JOB, MERGED_LORA = "tokens_only", "one_job", "merged_lora"
MAX_PROMPTS = 16


def renamed(token: str, job_id: str) -> str:
    """A job's token under its composition name: "<&0>" of job J is "<&0@J>"."""
    return f"{token[:-1]}@{job_id}>"


@dataclass(frozen=True)
class ComposedPrompt:
    text: str  # as the request gave it
    expanded: str  # as the text encoder reads it
    references: tuple[Ref, ...]


@dataclass(frozen=True, eq=False)
class Plan:
    """A checked composition: the jobs to load (with the concepts and tokens used), and the delta to apply."""

    prompts: tuple[ComposedPrompt, ...]
    jobs: tuple[Entry, ...]  # every referenced job, in order of first reference
    delta: str  # TOKENS_ONLY | ONE_JOB | MERGED_LORA
    deltas: tuple[Entry, ...]  # the jobs whose delta is applied (ONE_JOB: one; MERGED_LORA: those with a LoRA)

    @property
    def key(self) -> str:
        """What the loaded pipeline depends on (the generation cache keeps one)."""
        return f"compose:{self.delta}:{','.join(e.job_id for e in self.deltas)}:" + ",".join(
            sorted(e.job_id for e in self.jobs))


def _parse(prompt: str, field: str) -> list:
    try:
        parts = parse_prompt(prompt)
    except BadName as exc:
        raise InvalidArgument(str(exc), field=field) from None
    if not references(parts):
        raise InvalidArgument("references no token of the library: write one as {operations/JOB/concepts/C} "
                              "or {operations/JOB/concepts/C/tokens/ATTRIBUTE}", field=field)
    return parts


def _entries(library: Library, refs: list[Ref], bundle_digest: str, extra_jobs: list[str] = ()) -> dict[str, Entry]:
    """The entry of every referenced job (NOT_FOUND when absent), each concept and token checked, all of
    `bundle_digest` (FAILED_PRECONDITION otherwise)."""
    entries: dict[str, Entry] = {}
    for job_id in dict.fromkeys([r.job_id for r in refs] + list(extra_jobs)):
        entry = library.job(job_id)
        if entry.bundle != bundle_digest:
            raise FailedPrecondition(
                f"job {job_id} learned its concepts on another model bundle (sha256 {entry.bundle[:16]}...) than "
                f"this learner serves ({bundle_digest[:16]}...); tokens only mean something with their own "
                "bundle: compose them on a learner started with that bundle")
        entries[job_id] = entry
    for ref in refs:
        library.concept(ref, entries[ref.job_id])
    return entries


def _token_count(tokenizer, parts: list) -> int:
    """CLIP tokens of a parsed prompt, each reference one (an added token), BOS and EOS included."""
    text = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in parts if isinstance(p, str))
    return text + sum(1 for p in parts if isinstance(p, Ref)) + 2


def _expand(parts: list, entries: dict[str, Entry]) -> str:
    return "".join(renamed(entries[p.job_id].concept(p.concept_id).token(p.attribute), p.job_id)
                   if isinstance(p, Ref) else p for p in parts)


def _deltas(delta: str, delta_job: str, entries: dict[str, Entry], jobs: list[str]) -> tuple[Entry, ...]:
    if delta == ONE_JOB:
        entry = entries[delta_job]
        if entry.delta_file is None:
            raise FailedPrecondition(f"job {delta_job} has no refinement delta (it refined nothing); compose with "
                                     "COMPOSITION_DELTA_TOKENS_ONLY, or choose a job that refined its UNet")
        return (entry,)
    if delta == MERGED_LORA:
        full = [j for j in jobs if entries[j].refinement == "full"]
        if full:
            raise FailedPrecondition(f"job {full[0]} refined its whole UNet (a full delta), which does not merge: "
                                     "merged deltas need LoRA jobs; compose with COMPOSITION_DELTA_ONE_JOB "
                                     "or COMPOSITION_DELTA_TOKENS_ONLY")
        lora = tuple(entries[j] for j in jobs if entries[j].refinement == "lora")
        if not lora:
            raise FailedPrecondition("none of the referenced jobs has a LoRA delta to merge; compose with "
                                     "COMPOSITION_DELTA_TOKENS_ONLY")
        return lora
    return ()


def delta_job_id(delta: str, delta_job: str, field: str = "delta_job") -> str:
    """The job of COMPOSITION_DELTA_ONE_JOB ('' for the other modes); INVALID_ARGUMENT when misplaced."""
    if delta != ONE_JOB:
        if delta_job:
            raise InvalidArgument("only allowed with COMPOSITION_DELTA_ONE_JOB", field=field)
        return ""
    job = delta_job.removeprefix("operations/")
    if not job or len(job) != 32 or any(ch not in "0123456789abcdef" for ch in job):
        raise InvalidArgument(f"expected 'operations/{{job_id}}', got {delta_job!r}", field=field)
    return job


def plan(library: Library, prompts: list[str], delta: str, delta_job: str, bundle_digest: str, tokenizer,
         max_tokens: int) -> Plan:
    """Check a composition request whole, in the order a caller fixes things: syntax and limits
    (INVALID_ARGUMENT, RESOURCE_EXHAUSTED), then what the library holds (NOT_FOUND), then the bundle and the
    delta (FAILED_PRECONDITION). Reads the library's entries only."""
    if not prompts:
        raise InvalidArgument("at least one prompt is required", field="prompts")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidArgument(f"at most {MAX_PROMPTS} prompts", field="prompts")
    job = delta_job_id(delta, delta_job)
    parsed = [_parse(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    refs = list(dict.fromkeys(r for parts in parsed for r in references(parts)))
    _check_count(refs, max_tokens, "prompts")
    for i, parts in enumerate(parsed):
        n = _token_count(tokenizer, parts)
        if n > tokenizer.model_max_length:
            raise InvalidArgument(f"{n} tokens, longer than {tokenizer.model_max_length} (each reference counts "
                                  "as one)", field=f"prompts[{i}]")
    entries = _entries(library, refs, bundle_digest, [job] if job else [])
    jobs = list(dict.fromkeys(r.job_id for r in refs))
    deltas = _deltas(delta, job, entries, jobs)
    composed = tuple(ComposedPrompt(p, _expand(parts, entries), tuple(references(parts)))
                     for p, parts in zip(prompts, parsed, strict=True))
    return Plan(composed, tuple(entries[j] for j in jobs), delta, deltas)


def _check_count(refs: list[Ref], max_tokens: int, field: str) -> None:
    if len(refs) > max_tokens:
        raise ResourceExhausted(f"{len(refs)} distinct tokens exceed this learner's limit of {max_tokens} per "
                                "request (--max-composition-tokens)", field=field)


# -- building the pipeline ----------------------------------------------------------------------------------


@torch.no_grad()
def prepare(pipe, library: Library, p: Plan) -> None:
    """Load every token of each planned job under its composition name, then the planned deltas, onto `pipe`
    (a private pipeline of the bundle)."""
    dtype = pipe.text_encoder.get_input_embeddings().weight.dtype
    for entry in p.jobs:
        embeds = load_file(str(library.file(entry, EMBEDS)))
        names = [renamed(t, entry.job_id) for t in embeds]
        pipe.load_textual_inversion([{n: v.to(dtype)} for n, v in zip(names, embeds.values(), strict=True)],
                                    token=names)
    if p.delta == ONE_JOB:
        entry = p.deltas[0]
        path = library.file(entry, entry.delta_file)
        if entry.delta_file == UNET_DELTA:
            add_unet_delta(pipe, path)
        else:
            pipe.load_lora_weights(str(path.parent), weight_name=LORA)
    elif p.delta == MERGED_LORA:
        names = []
        for entry in p.deltas:
            path = library.file(entry, LORA)
            names.append(f"job_{entry.job_id}")
            pipe.load_lora_weights(str(path.parent), weight_name=LORA, adapter_name=names[-1])
        pipe.set_adapters(names, adapter_weights=[1.0] * len(names))


# -- export -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportPlan:
    tokens: tuple[Ref, ...]  # every exported token (a concept's name expands to its concept and intrinsic tokens)
    entries: dict
    delta: str
    deltas: tuple[Entry, ...]
    prompt: str  # the example's prompt, expanded


MAX_EXPORT_NAMES = 64


def plan_export(library: Library, names: list[str], delta: str, delta_job: str, prompt: str, bundle_digest: str,
                tokenizer, max_tokens: int) -> ExportPlan:
    """Check an export request whole (as `plan`), before anything is read but the library's entries."""
    if not names:
        raise InvalidArgument("at least one concept or token name is required", field="names")
    if len(names) > MAX_EXPORT_NAMES:
        raise InvalidArgument(f"at most {MAX_EXPORT_NAMES} names", field="names")
    job = delta_job_id(delta, delta_job)
    asked = []
    for i, name in enumerate(names):
        try:
            asked.append(parse_name(name))
        except BadName as exc:
            raise InvalidArgument(str(exc), field=f"names[{i}]") from None
    parts = _parse(prompt, "prompt") if prompt else None
    entries = _entries(library, asked + (references(parts) if parts else []), bundle_digest, [job] if job else [])
    tokens = []
    for ref in asked:  # a concept: its concept token and every intrinsic token
        if ref.attribute is None:
            concept = entries[ref.job_id].concept(ref.concept_id)
            tokens += [ref] + [Ref(ref.job_id, ref.concept_id, a) for a in concept.attributes]
        else:
            tokens.append(ref)
    tokens = list(dict.fromkeys(tokens))
    _check_count(tokens, max_tokens, "names")
    if parts is None:  # the first concept token, else the first token
        parts = ["a photo of ", next((r for r in tokens if r.attribute is None), tokens[0])]
    missing = [r.name for r in references(parts) if r not in tokens]
    if missing:
        raise InvalidArgument(f"references {missing[0]}, which the export does not hold: add it to the names",
                              field="prompt")
    n = _token_count(tokenizer, parts)
    if n > tokenizer.model_max_length:
        raise InvalidArgument(f"{n} tokens, longer than {tokenizer.model_max_length}", field="prompt")
    jobs = list(dict.fromkeys(r.job_id for r in tokens))
    deltas = _deltas(delta, job, entries, jobs)
    return ExportPlan(tuple(tokens), entries, delta, deltas, _expand(parts, entries))


def token_folder(ref: Ref) -> str:
    """Where an exported token's `learned_embeds.safetensors` goes, relative to the export folder."""
    if ref.attribute is None:
        return f"tokens/{ref.job_id}/{ref.concept_id}/concept"
    return f"tokens/{ref.job_id}/{ref.concept_id}/attributes/{quote(ref.attribute, safe='')}"


_EXAMPLE = '''"""Renders a prompt composed of concepts from several ICE learning jobs, with plain diffusers.
Usage: python compose_example.py BUNDLE/diffusion [OUT.png]  (BUNDLE: the model bundle the jobs learned on)."""
import sys
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

here = Path(__file__).resolve().parent
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
for embeds in sorted(here.glob("tokens/**/learned_embeds.safetensors")):  # one token each
    pipe.load_textual_inversion(str(embeds))
{delta}prompt = {prompt!r}
image = pipe(prompt, num_inference_steps={steps}, guidance_scale={guidance},
             generator=torch.Generator("cpu").manual_seed({seed})).images[0]
image.save(sys.argv[2] if len(sys.argv) > 2 else "composed.png")
'''


def _example_delta(p: ExportPlan) -> str:
    if p.delta == ONE_JOB and p.deltas[0].delta_file == UNET_DELTA:
        return ("unet = dict(pipe.unet.named_parameters())  # the full refinement delta: trained - base\n"
                f"for name, d in load_file(here / 'deltas/{p.deltas[0].job_id}/{UNET_DELTA}').items():\n"
                "    unet[name].data += d\n")
    if p.delta == ONE_JOB:
        return f"pipe.load_lora_weights(str(here / 'deltas/{p.deltas[0].job_id}'), weight_name='{LORA}')\n"
    if p.delta == MERGED_LORA:
        lines = [f"pipe.load_lora_weights(str(here / 'deltas/{e.job_id}'), weight_name='{LORA}',\n"
                 f"                        adapter_name='job_{e.job_id}')\n"
                 for e in p.deltas]
        names = [f"job_{e.job_id}" for e in p.deltas]
        return "".join(lines) + f"pipe.set_adapters({names!r}, adapter_weights={[1.0] * len(names)!r})\n"
    return ""


def write_export(out: Path, library: Library, p: ExportPlan, steps: int, guidance: float, seed: int = 0) -> list[str]:
    """Write the export folder; returns its files, relative, in a stable order."""
    files = []
    records = []
    for ref in p.tokens:
        entry = p.entries[ref.job_id]
        concept = entry.concept(ref.concept_id)
        token = concept.token(ref.attribute)
        embeds = load_file(str(library.file(entry, EMBEDS)))
        name = renamed(token, ref.job_id)
        rel = f"{token_folder(ref)}/learned_embeds.safetensors"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file({name: embeds[token].contiguous()}, str(out / rel), metadata={"format": "pt"})
        files.append(rel)
        records.append({"name": ref.name, "token": name, "token_in_its_job": token, "job_id": ref.job_id,
                        "concept_id": ref.concept_id, "noun": concept.noun, "attribute": ref.attribute or "",
                        "file": rel})
    deltas = []
    for entry in p.deltas:
        rel = f"deltas/{entry.job_id}/{entry.delta_file}"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(library.read_file(entry, entry.delta_file))
        files.append(rel)
        deltas.append({"job_id": entry.job_id, "kind": entry.refinement, "file": rel})
    bundle = p.entries[p.tokens[0].job_id].bundle
    manifest = {"bundle_sha256": bundle, "delta": p.delta, "deltas": deltas, "tokens": records,
                "example_prompt": p.prompt}
    (out / "concepts.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    example = _EXAMPLE.replace("{delta}", _example_delta(p)).format(prompt=p.prompt, steps=steps,
                                                                     guidance=guidance, seed=seed)
    (out / "compose_example.py").write_text(example, encoding="utf-8")
    lines = ["# ICE concepts, exported", "",
             f"{len(records)} token(s) from {len({r['job_id'] for r in records})} learning job(s), all learned on the "
             f"model bundle with sha256 `{bundle}`; they only mean something with that bundle's text encoder and UNet.",
             "", "Each `tokens/.../learned_embeds.safetensors` holds one token, under its composition name (the job's "
             "own token name with `@JOB_ID` added, so that tokens of different jobs never clash), and loads with "
             "diffusers' `pipe.load_textual_inversion(path)`.", ""]
    if deltas:
        lines += [f"Refinement delta ({p.delta.replace('_', ' ')}): " + ", ".join(f"`{d['file']}` ({d['kind']})"
                                                                             for d in deltas) + ".", ""]
    else:
        lines += ["No refinement delta: the tokens on the base UNet.", ""]
    lines += ["`python compose_example.py BUNDLE/diffusion out.png` renders:", "", f"    {p.prompt}", "",
              "| token | noun | attribute | job |", "|---|---|---|---|"]
    lines += [f"| `{r['token']}` | {r['noun']} | {r['attribute'] or '(concept)'} | {r['job_id']} |" for r in records]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["README.md", "concepts.json", "compose_example.py", *files]
