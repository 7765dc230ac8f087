"""The learner's concept-library RPCs (`ListConcepts`, `GetConcept`, `GenerateComposition`, `ExportConcepts`): decode
the request, call the library (`library.py`) and the composition (`composition.py`), encode the answer. The
servicer (`server.py`) hands each call here; no math here either."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ice.concept_names import BadName, parse_name, token_name
from ice.learner.v1 import learner_pb2
from services.common.bundle import sha256_file
from services.common.errors import InvalidArgument
from services.common.images import encode_png
from services.common.interceptors import call_active, iter_with_context_check
from services.common.tracing import tracer
from services.learner import composition as C
from services.learner import generate as G
from services.learner.artifacts import ArtifactFile
from services.learner.library import Concept, list_page

TRACER = tracer("learner")
_MODES = {learner_pb2.COMPOSITION_DELTA_UNSPECIFIED: C.TOKENS_ONLY, learner_pb2.COMPOSITION_DELTA_TOKENS_ONLY: C.TOKENS_ONLY,
          learner_pb2.COMPOSITION_DELTA_ONE_JOB: C.ONE_JOB, learner_pb2.COMPOSITION_DELTA_MERGED_LORA: C.MERGED_LORA}
_ABLATIONS = {"none": learner_pb2.ABLATION_NONE, "mask_only": learner_pb2.ABLATION_MASK_ONLY,
              "without_stage_two": learner_pb2.ABLATION_WITHOUT_STAGE_TWO,
              "without_text_init": learner_pb2.ABLATION_WITHOUT_TEXT_INIT}
_REFINEMENTS = {"full": learner_pb2.REFINEMENT_DELTA_FULL, "lora": learner_pb2.REFINEMENT_DELTA_LORA,
                "none": learner_pb2.REFINEMENT_DELTA_UNSPECIFIED}
_VIEWS = (learner_pb2.CONCEPT_VIEW_UNSPECIFIED, learner_pb2.CONCEPT_VIEW_BASIC, learner_pb2.CONCEPT_VIEW_FULL)
MAX_PAGE = 1000


def _mode(value: int) -> str:
    if value not in _MODES:
        raise InvalidArgument(f"unknown value {value}", field="delta")
    return _MODES[value]


def _view(value: int) -> int:
    if value not in _VIEWS:
        raise InvalidArgument(f"unknown value {value}", field="view")
    return value


def concept_message(library, c: Concept, view: int) -> learner_pb2.LibraryConcept:
    d = c.entry.data
    instance = next((t["token"] for t in c.tokens if t["role"] == "instance"), "")
    msg = learner_pb2.LibraryConcept(
        name=c.name, job_id=c.job_id, concept_id=c.concept_id, noun=c.noun, concept_token=c.token(None) or "",
        instance_token=instance, anchors=d["anchors"], source_image_sha256=d["source_image_sha256"],
        bundle_sha256=d["bundle_sha256"], schedule=learner_pb2.Schedule(**d["schedule"]),
        ablation=_ABLATIONS.get(d["ablation"], learner_pb2.ABLATION_UNSPECIFIED),
        refinement_delta=_REFINEMENTS.get(d["refinement"], learner_pb2.REFINEMENT_DELTA_UNSPECIFIED),
        seed=d["seed"], replica_address=d.get("replica_address", ""),
        intrinsic_tokens=[learner_pb2.LibraryToken(name=token_name(c.job_id, c.concept_id, t["attribute"]),
                                                   token=t["token"], attribute=t["attribute"])
                          for t in c.tokens if t["role"] == "intrinsic"])
    if d["refinement"] == "lora" and d.get("lora_rank") is not None:
        msg.lora_rank = d["lora_rank"]
    msg.create_time.FromNanoseconds(int(d["create_time"] * 1e9))
    if view == learner_pb2.CONCEPT_VIEW_FULL:
        msg.mask = library.read_file(c.entry, f"masks/{c.concept_id}.png")
        msg.source_crop = library.read_file(c.entry, f"crops/{c.concept_id}.png")
    return msg


def _parent(parent: str) -> str | None:
    if parent in ("", "operations/-"):
        return None
    job = parent.removeprefix("operations/")
    if parent == job or len(job) != 32 or any(ch not in "0123456789abcdef" for ch in job):
        raise InvalidArgument(f"expected 'operations/-' or 'operations/{{job_id}}', got {parent!r}", field="parent")
    return job


def list_concepts(state, request) -> learner_pb2.ListConceptsResponse:
    if request.page_size < 0:
        raise InvalidArgument("must not be negative", field="page_size")
    view = _view(request.view)
    size = min(request.page_size or 50, MAX_PAGE)
    page, token = list_page(state.library, _parent(request.parent), request.filter, size, request.page_token)
    return learner_pb2.ListConceptsResponse(concepts=[concept_message(state.library, c, view) for c in page],
                                            next_page_token=token)


def get_concept(state, request) -> learner_pb2.GetConceptResponse:
    view = _view(request.view)
    try:
        ref = parse_name(request.name)
    except BadName as exc:
        raise InvalidArgument(str(exc), field="name") from None
    concept = state.library.concept(ref)
    response = learner_pb2.GetConceptResponse(concept=concept_message(state.library, concept, view))
    if ref.attribute is not None:
        response.token.CopyFrom(next(t for t in response.concept.intrinsic_tokens if t.attribute == ref.attribute))
    return response


def generate_composition(state, request, context):
    s = state
    delta = _mode(request.delta)
    num_images, steps, guidance, seed = G.request_options(s.bundle, request)
    plan = C.plan(s.library, list(request.prompts), delta, request.delta_job, s.bundle.digest, s.bundle.tokenizer(),
                  s.settings.max_composition_tokens)
    by_text = {p.expanded: p for p in plan.prompts}
    with s.generation.held():
        pipe = s.generation.get(plan.key, lambda: G.base_pipeline(
            s.bundle, s.device, lambda pipe: C.prepare(pipe, s.library, plan)))
        span = TRACER.start_span("generate_composition", attributes={  # ends with the stream
            "ice.jobs": len(plan.jobs), "ice.composition_delta": delta, "ice.prompts": len(plan.prompts),
            "ice.images_per_prompt": num_images, "ice.inference_steps": steps})
        try:
            prompts = [G.Prompt(p.expanded) for p in plan.prompts]
            for prompt, index, image_seed, image in G.generate(pipe, prompts, num_images, seed, steps, guidance):
                if not call_active(context):
                    return
                p = by_text[prompt.text]
                yield learner_pb2.GenerateCompositionResponse(
                    prompt=p.text, expanded_prompt=p.expanded, index=index, image=encode_png(image), seed=image_seed,
                    references=[r.name for r in p.references])
        finally:
            span.end()


def export_concepts(state, request, context, chunks):
    """The export folder, written to a temporary folder of the job store and streamed (then removed)."""
    s = state
    plan = C.plan_export(s.library, list(request.names), _mode(request.delta), request.delta_job, request.prompt,
                         s.bundle.digest, s.bundle.tokenizer(), s.settings.max_composition_tokens)
    _, steps, guidance, _ = G.request_options(s.bundle, request)
    scratch = Path(s.settings.job_store) / "exports"
    scratch.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="export-", dir=scratch))
    try:
        names = C.write_export(folder, s.library, plan, steps, guidance, request.seed)
        files = [ArtifactFile(n, (folder / n).stat().st_size, sha256_file(folder / n)) for n in names]
        yield from iter_with_context_check(chunks(folder, files, learner_pb2.ExportConceptsResponse), context)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
