"""The concept library and composition across jobs, through a real learner on loopback (tiny bundle, a few steps per
job): ListConcepts with its filter and pages, GetConcept by a concept's or a token's name, GenerateComposition
mixing the tokens of two jobs under each delta mode, every refusal with its code and nothing left behind (a
foreign bundle's concepts included), a deleted job's concepts gone, and ExportConcepts loaded by plain diffusers
(its example renders the composed image the service renders)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from safetensors.torch import load_file

from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from services.common.bundle import compute_digest, file_table
from services.common.images import encode_mask
from services.common.server import start_server
from services.common.settings import LearnerSettings, from_sources
from services.learner.server import build_spec

ROOT = Path(__file__).resolve().parents[1]
# a few steps of each phase: the tokens are learned enough to differ from job to job, which is all these tests need
TINY = dict(phase1_steps=2, phase2_steps=1, refinement_steps=1, num_class_images=0, checkpoint_every=0)
GEN = dict(num_images=1, num_inference_steps=3, seed=7)
MAX_TOKENS = 6


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _scene(seed: int, size=(48, 40)) -> bytes:
    return _png(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _request(image: bytes, nouns: list[str], delta=learner_pb2.REFINEMENT_DELTA_LORA, refinement_steps=1,
             seed=1) -> learner_pb2.CreateLearningJobRequest:
    w, h = Image.open(io.BytesIO(image)).size
    left = np.zeros((h, w), bool)
    left[:, : w // 2] = True
    masks = [left, ~left][: len(nouns)]
    concepts = [learner_pb2.ConceptInput(noun=n, mask=encode_mask(m)) for n, m in zip(nouns, masks, strict=True)]
    schedule = learner_pb2.Schedule(**{**TINY, "refinement_steps": refinement_steps})
    return learner_pb2.CreateLearningJobRequest(image=image, concepts=concepts, schedule=schedule,
                                                refinement_delta=delta, seed=seed)


def _field_of(err: grpc.RpcError) -> str:
    for detail in rpc_status.from_call(err).details:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            return br.field_violations[0].field
    return ""


def _learner(bundle: Path, store: Path, **settings):
    values = dict(env={}, cls=LearnerSettings, host="127.0.0.1", port=-1, metrics_port=0, bundle=bundle,
                  job_store=store, class_image_steps=2, max_composition_tokens=MAX_TOKENS)
    settings = from_sources(**{**values, **settings})
    running = start_server(build_spec(settings), settings)
    assert running.wait_ready(120)
    return running


class Learner:
    def __init__(self, running, store: Path):
        self.running, self.store = running, store
        self.channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        self.stub = learner_pb2_grpc.LearnerServiceStub(self.channel)
        self.ops = operations_pb2_grpc.OperationsStub(self.channel)

    def learn(self, request) -> str:
        """Run a job to success; its id."""
        op = self.stub.CreateLearningJob(request, timeout=300)
        for msg in self.stub.WatchLearningJob(learner_pb2.WatchLearningJobRequest(name=op.name), timeout=1800):
            last = msg
        assert last.metadata.state == learner_pb2.JOB_STATE_SUCCEEDED, last
        return op.name.removeprefix("operations/")

    def compose(self, *prompts, **kw) -> list[learner_pb2.GenerateCompositionResponse]:
        request = learner_pb2.GenerateCompositionRequest(prompts=list(prompts), **{**GEN, **kw})
        return list(self.stub.GenerateComposition(request, timeout=900))

    def concepts(self, **kw) -> list[learner_pb2.LibraryConcept]:
        out, token = [], ""
        while True:
            r = self.stub.ListConcepts(learner_pb2.ListConceptsRequest(page_token=token, **kw), timeout=30)
            out += r.concepts
            token = r.next_page_token
            if not token:
                return out

    def close(self) -> None:
        self.channel.close()
        self.running.stop(grace=0)


@pytest.fixture(scope="module")
def fleet(tiny_bundle_dir, tmp_path_factory):
    """One learner and three jobs: A (two concepts, LoRA), B (one concept, LoRA), F (full delta)."""
    store = tmp_path_factory.mktemp("jobs")
    learner = Learner(_learner(Path(tiny_bundle_dir), store), store)
    jobs = {"A": learner.learn(_request(_scene(1), ["cup", "table"], seed=1)),
            "B": learner.learn(_request(_scene(2), ["bowl"], seed=2)),
            "F": learner.learn(_request(_scene(3), ["vase"], learner_pb2.REFINEMENT_DELTA_FULL, seed=3))}
    yield learner, jobs
    learner.close()


def ref(job: str, concept: str = "c0", attribute: str | None = None) -> str:
    name = f"operations/{job}/concepts/{concept}"
    return "{" + (name if attribute is None else f"{name}/tokens/{attribute}") + "}"


# --- the names and the two prompt syntaxes (no services) -------------------------------------------------------
def test_names_and_prompts_parse_and_print_back():
    from client.compose import Readable, parse_readable
    from ice.concept_names import BadName, Ref, format_prompt, parse_name, parse_prompt

    job = "0123456789abcdef" * 2
    assert parse_name(f"operations/{job}/concepts/c0") == Ref(job, "c0")
    assert parse_name(f"operations/{job}/concepts/c0/tokens/light%20tone") == Ref(job, "c0", "light tone")
    assert Ref(job, "c0", "light tone").name == f"operations/{job}/concepts/c0/tokens/light%20tone"
    for bad in (f"operations/{job}/concepts/c0/", f"operations/{job[:-1]}/concepts/c0", f"jobs/{job}/concepts/c0",
                f"operations/{job}/concepts/c 0", f"operations/{job}/concepts/c0/tokens/"):
        with pytest.raises(BadName):
            parse_name(bad)
    prompt = f"{{{{x}}}} a {{operations/{job}/concepts/c1/tokens/color}} {{operations/{job}/concepts/c0}}"
    parts = parse_prompt(prompt)
    assert parts == ["{x} a ", Ref(job, "c1", "color"), " ", Ref(job, "c0")] and format_prompt(parts) == prompt
    for bad in ("a {b", "a } b", "{nothing}"):
        with pytest.raises(BadName):
            parse_prompt(bad)
    assert parse_readable("a {3f9a:c0} in {b07c : c1.colour} and {{x}}") == [
        "a ", Readable("3f9a", "c0", None, "3f9a:c0"), " in ", Readable("b07c", "c1", "colour", "b07c : c1.colour"),
        " and {x}"]
    with pytest.raises(ValueError, match="not a reference"):
        parse_readable("a {cup}")


def job_dir(root: Path, job_id: str, nouns: list[str], seed: int, refinement: str = "lora") -> Path:
    """A finished job's folder as the learner leaves it (inputs and artifacts), without training: the artifacts
    are written by the learner's own writer, from random token vectors and a random delta."""
    import torch

    from services.learner.artifacts import write_artifacts
    from services.learner.tokens import plan_tokens
    from services.learner.trainer import Concept, LearningSpec, Schedule, TrainResult

    folder = root / job_id
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    masks = [np.zeros((64, 64), bool) for _ in nouns]
    for i, m in enumerate(masks):
        m[:, i * 64 // len(nouns) : (i + 1) * 64 // len(nouns)] = True
    steps = 0 if refinement == "none" else 1
    spec = LearningSpec(image, [Concept(f"c{i}", n, m) for i, (n, m) in enumerate(zip(nouns, masks, strict=True))],
                        ["texture", "color"], Schedule(phase1_steps=2, phase2_steps=1, refinement_steps=steps),
                        refinement="full" if refinement == "none" else refinement, seed=seed)
    tokens = plan_tokens([(c.concept_id, c.noun) for c in spec.concepts], spec.anchors)
    g = torch.Generator().manual_seed(seed)
    delta = {"down.lora_A.weight": torch.randn(4, 8, generator=g)}
    result = TrainResult(tokens, {t.token: torch.randn(32, generator=g) for t in tokens},
                         delta if refinement == "full" else None, delta if refinement == "lora" else None)
    (folder / "input").mkdir(parents=True)
    image.save(folder / "input" / "image.png")
    write_artifacts(folder / "artifacts", result, spec, "b" * 64)
    return folder


def test_each_delta_mode_is_checked_against_what_each_job_refined(tiny_bundle, tmp_path):
    """The delta cases of `composition.plan` on a library of jobs that refined with LoRA, fully, or nothing."""
    from services.common.errors import FailedPrecondition
    from services.learner import composition as C
    from services.learner.library import Library

    library = Library(tmp_path / "library", tmp_path / "cache")
    lora, full, none = (f"{k:032x}" for k in (1, 2, 3))
    for k, (job, refinement) in enumerate(((lora, "lora"), (full, "full"), (none, "none"))):
        library.publish(job, job_dir(tmp_path / "jobs", job, ["cup"], k, refinement), create_time=float(k))
    tokenizer = tiny_bundle.tokenizer()

    def plan(delta, *jobs, delta_job=""):
        prompt = " and ".join(ref(j) for j in jobs)
        return C.plan(library, [prompt], delta, delta_job, "b" * 64, tokenizer, 16)

    assert plan(C.TOKENS_ONLY, lora, full, none).deltas == ()
    assert [e.job_id for e in plan(C.MERGED_LORA, lora, none).deltas] == [lora]  # a job without delta adds none
    assert [e.job_id for e in plan(C.ONE_JOB, lora, delta_job=f"operations/{full}").deltas] == [full]
    for args, kw, message in (((C.ONE_JOB, lora), {"delta_job": none}, "refined nothing"),
                              ((C.MERGED_LORA, none), {}, "none of the referenced jobs has a LoRA"),
                              ((C.MERGED_LORA, lora, full), {}, "merged deltas need LoRA jobs")):
        with pytest.raises(FailedPrecondition, match=message):
            plan(*args, **kw)
    with pytest.raises(FailedPrecondition, match="another model bundle"):
        C.plan(library, [ref(lora)], C.TOKENS_ONLY, "", "c" * 64, tokenizer, 16)


# --- the library ----------------------------------------------------------------------------------------------
def test_every_succeeded_job_is_listed_with_its_manifest_and_filtered(fleet, tiny_bundle):
    learner, jobs = fleet
    listed = learner.concepts()
    assert [(c.job_id, c.concept_id) for c in listed] == [
        (jobs["A"], "c0"), (jobs["A"], "c1"), (jobs["B"], "c0"), (jobs["F"], "c0")]
    cup = listed[0]
    assert cup.name == f"operations/{jobs['A']}/concepts/c0" and cup.noun == "cup" and cup.concept_token == "<&0>"
    assert cup.instance_token == "<*0>" and list(cup.anchors) == ["texture", "material", "color"]
    assert [(t.attribute, t.token, t.name) for t in cup.intrinsic_tokens] == [
        (a, tok, f"{cup.name}/tokens/{a}") for a, tok in (("texture", "<#0>"), ("material", "<%0>"), ("color", "<$0>"))]
    assert listed[1].concept_token == "<&1>" and listed[1].noun == "table"
    assert cup.bundle_sha256 == tiny_bundle.digest
    import hashlib

    assert cup.source_image_sha256 == hashlib.sha256(_scene(1)).hexdigest()  # the request's image, as sent
    assert cup.schedule.phase1_steps == 2 and cup.schedule.refinement_steps == 1 and cup.seed == 1
    assert cup.refinement_delta == learner_pb2.REFINEMENT_DELTA_LORA and cup.lora_rank == 4
    assert listed[3].refinement_delta == learner_pb2.REFINEMENT_DELTA_FULL and not listed[3].HasField("lora_rank")
    assert not cup.mask and not cup.source_crop  # BASIC view

    def names(**kw):
        return [(c.job_id, c.concept_id) for c in learner.concepts(**kw)]

    assert names(filter='noun = "bowl"') == [(jobs["B"], "c0")]
    assert names(filter=f"job = operations/{jobs['A']} AND noun != cup") == [(jobs["A"], "c1")]
    assert names(filter="refinement_delta = FULL") == [(jobs["F"], "c0")]
    assert names(filter="refinement_delta = NONE") == []
    assert len(names(filter=f"bundle = {tiny_bundle.digest} AND attribute = color")) == 4
    assert names(filter="attribute = colour") == []
    assert names(parent=f"operations/{jobs['B']}") == [(jobs["B"], "c0")]
    # pages of one walk the same order; a token is tied to its filter
    assert names(page_size=1) == [(c.job_id, c.concept_id) for c in listed]
    first = learner.stub.ListConcepts(learner_pb2.ListConceptsRequest(page_size=2, filter="attribute = color"))
    assert len(first.concepts) == 2 and first.next_page_token
    for bad, field in ((dict(page_size=2, page_token=first.next_page_token), "page_token"),  # the filter changed
                       (dict(filter="noun ~ cup"), "filter"), (dict(filter="colour = red"), "filter"),
                       (dict(filter="refinement_delta = BIG"), "filter"), (dict(page_size=-1), "page_size"),
                       (dict(parent="jobs/1"), "parent"), (dict(page_token="nonsense"), "page_token")):
        with pytest.raises(grpc.RpcError) as e:
            learner.stub.ListConcepts(learner_pb2.ListConceptsRequest(**bad), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and _field_of(e.value) == field, bad


def test_a_concept_or_a_token_is_looked_up_by_its_name(fleet):
    learner, jobs = fleet
    name = f"operations/{jobs['A']}/concepts/c1"
    got = learner.stub.GetConcept(learner_pb2.GetConceptRequest(name=name, view=learner_pb2.CONCEPT_VIEW_FULL))
    assert got.concept.noun == "table" and not got.HasField("token")
    mask = np.asarray(Image.open(io.BytesIO(got.concept.mask))) > 0
    assert mask.shape == (64, 64) and mask[:, 40:].all() and not mask[:, :24].any()  # the right half, squared
    crop = Image.open(io.BytesIO(got.concept.source_crop))
    assert crop.mode == "RGB" and crop.width < 64 and crop.height == 64  # cut to the mask's box
    token = learner.stub.GetConcept(learner_pb2.GetConceptRequest(name=f"{name}/tokens/material"))
    assert token.token.token == "<%1>" and token.token.attribute == "material" and token.concept.name == name
    for bad, code in ((f"operations/{jobs['A']}/concepts/c9", grpc.StatusCode.NOT_FOUND),
                      (f"{name}/tokens/shape", grpc.StatusCode.NOT_FOUND),
                      (f"operations/{'0' * 32}/concepts/c0", grpc.StatusCode.NOT_FOUND),
                      ("operations/abc/concepts/c0", grpc.StatusCode.INVALID_ARGUMENT),
                      (f"{name}/tokens/", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as e:
            learner.stub.GetConcept(learner_pb2.GetConceptRequest(name=bad), timeout=10)
        assert e.value.code() == code, bad


# --- composition ----------------------------------------------------------------------------------------------
def test_a_prompt_mixes_the_tokens_of_two_jobs_under_each_delta_mode(fleet):
    learner, jobs = fleet
    a, b = jobs["A"], jobs["B"]
    prompt = f"a photo of {ref(a)} in {ref(b, attribute='color')} color"
    out = learner.compose(prompt)
    (img,) = out
    # both jobs' tokens are "<&0>" and "<$0>" in their own job: each is loaded under its own name
    assert img.prompt == prompt and img.expanded_prompt == f"a photo of <&0@{a}> in <$0@{b}> color"
    assert list(img.references) == [f"operations/{a}/concepts/c0", f"operations/{b}/concepts/c0/tokens/color"]
    assert Image.open(io.BytesIO(img.image)).size == (64, 64) and img.seed == 7
    assert learner.compose(prompt)[0].image == img.image  # seeded: the same request, the same image
    # the tokens matter: job B's concept in place of job A's (same words otherwise) draws another image
    assert learner.compose(f"a photo of {ref(b)} in {ref(b, attribute='color')} color")[0].image != img.image
    # each delta mode is its own model
    one_a = learner.compose(prompt, delta=learner_pb2.COMPOSITION_DELTA_ONE_JOB, delta_job=f"operations/{a}")
    one_b = learner.compose(prompt, delta=learner_pb2.COMPOSITION_DELTA_ONE_JOB, delta_job=f"operations/{b}")
    merged = learner.compose(prompt, delta=learner_pb2.COMPOSITION_DELTA_MERGED_LORA)
    full = learner.compose(f"a photo of {ref(jobs['F'])}", delta=learner_pb2.COMPOSITION_DELTA_ONE_JOB,
                           delta_job=f"operations/{jobs['F']}")
    images = [img.image, one_a[0].image, one_b[0].image, merged[0].image]
    assert len(set(images)) == 4 and full[0].expanded_prompt == f"a photo of <&0@{jobs['F']}>"
    # two prompts, two images each, in order; literal braces pass through
    two = learner.compose(f"{{{{ {ref(a, 'c1')} }}}}", f"{ref(a)} and {ref(a, 'c1')}", num_images=2)
    assert [(r.prompt, r.index) for r in two] == [(two[0].prompt, 0), (two[0].prompt, 1), (two[2].prompt, 0),
                                                  (two[2].prompt, 1)]
    assert two[0].expanded_prompt == f"{{ <&1@{a}> }}" and two[2].expanded_prompt == f"<&0@{a}> and <&1@{a}>"
    assert two[1].seed == 8


def _leftovers(store: Path) -> dict:
    return {p.relative_to(store).as_posix(): p.stat().st_mtime_ns for p in store.rglob("*")
            if p.is_file() and ("library-cache" in p.parts or "exports" in p.parts)}


def test_every_bad_composition_is_refused_with_its_code_and_leaves_nothing_behind(fleet):
    learner, jobs = fleet
    a, f = jobs["A"], jobs["F"]
    C = learner_pb2
    good = f"a photo of {ref(a)}"
    before = _leftovers(learner.store)
    cases = [
        (dict(prompts=[f"a photo of {{operations/{a}/concept/c0}}"]), "INVALID_ARGUMENT", "prompts[0]"),
        (dict(prompts=[good, "a photo of {operations/x/concepts/c0"]), "INVALID_ARGUMENT", "prompts[1]"),
        (dict(prompts=["a photo of a cup }"]), "INVALID_ARGUMENT", "prompts[0]"),
        (dict(prompts=["a photo of a cup"]), "INVALID_ARGUMENT", "prompts[0]"),  # no reference
        (dict(prompts=[]), "INVALID_ARGUMENT", "prompts"),
        (dict(prompts=[good] * 17), "INVALID_ARGUMENT", "prompts"),
        (dict(prompts=[good + " very" * 80]), "INVALID_ARGUMENT", "prompts[0]"),  # over 77 tokens
        (dict(prompts=[" ".join(ref(a, c, t) for c in ("c0", "c1") for t in ("texture", "material", "color"))
                       + ref(a)]), "RESOURCE_EXHAUSTED", ""),  # 7 distinct tokens, the limit is 6
        (dict(prompts=[good], num_images=0), "INVALID_ARGUMENT", "num_images"),
        (dict(prompts=[good], delta=9), "INVALID_ARGUMENT", "delta"),
        (dict(prompts=[good], delta=C.COMPOSITION_DELTA_ONE_JOB), "INVALID_ARGUMENT", "delta_job"),
        (dict(prompts=[good], delta_job=f"operations/{a}"), "INVALID_ARGUMENT", "delta_job"),
        (dict(prompts=[f"a photo of {ref('0' * 32)}"]), "NOT_FOUND", ""),
        (dict(prompts=[f"a photo of {ref(a, 'c7')}"]), "NOT_FOUND", ""),
        (dict(prompts=[f"a photo of {ref(a, 'c0', 'shape')}"]), "NOT_FOUND", ""),
        (dict(prompts=[f"{good} {ref(f)}"], delta=C.COMPOSITION_DELTA_MERGED_LORA),
         "FAILED_PRECONDITION", ""),  # job F's delta is a full one
        (dict(prompts=[good], delta=C.COMPOSITION_DELTA_ONE_JOB, delta_job=f"operations/{'2' * 32}"),
         "NOT_FOUND", ""),
    ]
    for kw, code, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(learner.stub.GenerateComposition(C.GenerateCompositionRequest(**kw), timeout=30))
        assert (e.value.code().name, _field_of(e.value)) == (code, field), (kw, e.value.details())
    assert "merged deltas need LoRA jobs" in _details(learner, cases[-2][0])
    assert _leftovers(learner.store) == before  # nothing fetched, nothing written
    assert learner.compose(good)  # and the learner serves on


def _details(learner, kw) -> str:
    with pytest.raises(grpc.RpcError) as e:
        list(learner.stub.GenerateComposition(learner_pb2.GenerateCompositionRequest(**kw), timeout=30))
    return e.value.details()


def test_concepts_of_another_bundle_are_refused_with_failed_precondition(fleet, tiny_bundle_dir, tmp_path):
    """A second learner on another bundle, sharing the first one's library: it lists the concepts, and refuses to
    compose them (their tokens mean nothing with its text encoder)."""
    learner, jobs = fleet
    other = tmp_path / "other-bundle"
    shutil.copytree(tiny_bundle_dir, other)
    config = other / "diffusion" / "scheduler" / "scheduler_config.json"  # one file changed: another bundle
    config.write_text(json.dumps({**json.loads(config.read_text()), "steps_offset": 0}))
    info = json.loads((other / "bundle.json").read_text())
    info["files"] = file_table(other)
    info["digest"] = compute_digest(info["files"])
    (other / "bundle.json").write_text(json.dumps(info, indent=2))
    store = tmp_path / "jobs"
    second = Learner(_learner(other, store, concept_library=str(learner.store / "library")), store)
    try:
        assert len(second.concepts()) == 4  # the library is shared
        with pytest.raises(grpc.RpcError) as e:
            second.compose(f"a photo of {ref(jobs['A'])}")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "another model bundle" in e.value.details() and jobs["A"] in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(second.stub.ExportConcepts(learner_pb2.ExportConceptsRequest(
                names=[f"operations/{jobs['A']}/concepts/c0"]), timeout=30))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert not list((store / "library-cache").glob("*")) and not list((store / "exports").glob("*"))
    finally:
        second.close()


# --- export ---------------------------------------------------------------------------------------------------
def _export(learner, out: Path, **kw) -> list[str]:
    files: dict[str, bytearray] = {}
    for chunk in learner.stub.ExportConcepts(learner_pb2.ExportConceptsRequest(**kw), timeout=60):
        files.setdefault(chunk.file_name, bytearray()).extend(chunk.chunk)
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(bytes(data))
    return sorted(files)


def test_an_export_is_loaded_by_plain_diffusers_and_renders_the_composed_image(fleet, tiny_bundle_dir, tmp_path):
    learner, jobs = fleet
    a, b = jobs["A"], jobs["B"]
    prompt = f"a photo of {ref(a, 'c1')} in {ref(b, attribute='color')} color"
    names = [f"operations/{a}/concepts/c1", f"operations/{b}/concepts/c0/tokens/color"]
    files = _export(learner, tmp_path, names=names, prompt=prompt, delta=learner_pb2.COMPOSITION_DELTA_MERGED_LORA,
                    num_inference_steps=3, seed=5)
    embeds = [f for f in files if f.endswith("learned_embeds.safetensors")]
    assert len(embeds) == 5  # job A's c1: concept + three intrinsic tokens; job B's colour token
    assert f"tokens/{b}/c0/attributes/color/learned_embeds.safetensors" in embeds
    assert {f"deltas/{a}/pytorch_lora_weights.safetensors", f"deltas/{b}/pytorch_lora_weights.safetensors",
            "concepts.json", "README.md", "compose_example.py"} <= set(files)
    loaded = [load_file(str(tmp_path / f)) for f in embeds]
    assert all(len(sd) == 1 for sd in loaded)  # one token per file: what load_textual_inversion reads
    assert f"<$0@{b}>" in {k for sd in loaded for k in sd}
    manifest = json.loads((tmp_path / "concepts.json").read_text())
    assert manifest["example_prompt"] == f"a photo of <&1@{a}> in <$0@{b}> color"
    example = (tmp_path / "compose_example.py").read_text()
    assert len([line for line in example.splitlines() if line.strip()]) <= 22

    # the example, run by plain Python with plain diffusers, renders what GenerateComposition renders
    done = subprocess.run([sys.executable, str(tmp_path / "compose_example.py"),
                           str(Path(tiny_bundle_dir).resolve() / "diffusion"), str(tmp_path / "composed.png")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    served = list(learner.stub.GenerateComposition(learner_pb2.GenerateCompositionRequest(
        prompts=[prompt], delta=learner_pb2.COMPOSITION_DELTA_MERGED_LORA, num_images=1, num_inference_steps=3,
        seed=5), timeout=300))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "composed.png").convert("RGB")),
                          np.asarray(Image.open(io.BytesIO(served[0].image)).convert("RGB")))
    # an export of a full delta applies it in its example too
    full = tmp_path / "full"
    files = _export(learner, full, names=[f"operations/{jobs['F']}/concepts/c0"],
                    delta=learner_pb2.COMPOSITION_DELTA_ONE_JOB, delta_job=f"operations/{jobs['F']}")
    assert f"deltas/{jobs['F']}/unet_delta.safetensors" in files
    assert "unet[name].data += d" in (full / "compose_example.py").read_text()
    with pytest.raises(grpc.RpcError) as e:
        _export(learner, tmp_path / "bad", names=names[:1], prompt=prompt)  # B's colour token is not exported
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and _field_of(e.value) == "prompt"
    assert not list((learner.store / "exports").glob("*"))  # each export's scratch folder is gone


# --- deletion (last: it removes a job of the fleet) ------------------------------------------------------------
def test_deleting_a_job_removes_its_concepts(fleet):
    learner, jobs = fleet
    n = jobs["F"]
    assert learner.compose(f"a photo of {ref(n)}")
    learner.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=f"operations/{n}"), timeout=30)
    assert n not in {c.job_id for c in learner.concepts()}
    assert not (learner.store / "library" / "entries" / f"{n}.json").exists()
    assert not (learner.store / "library" / "files" / n).exists()
    for call in (lambda: learner.stub.GetConcept(learner_pb2.GetConceptRequest(name=f"operations/{n}/concepts/c0")),
                 lambda: learner.compose(f"a photo of {ref(n)}")):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "deleted" in e.value.details()
    # a job this replica does not have is NOT_FOUND, and the library is left as it is
    with pytest.raises(grpc.RpcError) as e:
        learner.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=f"operations/{'1' * 32}"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(learner.concepts()) == 3


# --- the SDK and the CLI ---------------------------------------------------------------------------------------
def test_the_sdk_and_the_cli_compose_in_the_readable_syntax_and_write_the_report(fleet, tmp_path):
    import asyncio

    from client import IceClient
    from client.aio import AsyncIceClient
    from client.options import GenerateOptions

    learner, jobs = fleet
    a, b = jobs["A"], jobs["B"]
    target = f"127.0.0.1:{learner.running.port}"
    opts = GenerateOptions(num_images=2, num_inference_steps=3, seed=7)
    readable = f"a photo of {{{a[:6]}:c1}} in {{bee:c0.colour}} colour"  # a prefix, an alias, British spelling
    with IceClient(learner=target, timeout=300) as ice:
        assert [c.noun for c in ice.concepts(filter='attribute = "color" AND noun != bowl')] == ["cup", "table"]
        shown = ice.concept(f"{a}:c1")
        assert shown.name == f"operations/{a}/concepts/c1" and shown.crop().size[1] == 64
        composition = ice.compose(readable, aliases={"bee": b}, options=opts, out_dir=tmp_path / "report",
                                  delta="merged_lora")
        with pytest.raises(ValueError, match="beginning of 0 jobs"):
            ice.compose("a photo of {ffff:c0}", options=opts)
    wire = f"a photo of {{operations/{a}/concepts/c1}} in {{operations/{b}/concepts/c0/tokens/color}} colour"
    assert composition.wire_prompts == [wire] and composition.prompts == [readable]
    assert [i.index for i in composition.images] == [0, 1] and composition.images[0].prompt == readable
    assert [c.name for c in composition.concepts] == [f"operations/{a}/concepts/c1", f"operations/{b}/concepts/c0"]
    # the same request through the wire form gives the same images
    served = learner.compose(wire, delta=learner_pb2.COMPOSITION_DELTA_MERGED_LORA, num_images=2)
    assert [s.image for s in served] == [i.image_png for i in composition.images]

    page = (tmp_path / "report" / "composition.html").read_text()
    record = json.loads((tmp_path / "report" / "composition.json").read_text())
    links = record["files"]["images"] + list(record["files"]["crops"].values())
    assert len(links) == 4 and all((tmp_path / "report" / rel).is_file() and rel in page for rel in links)
    assert "table" in page and "bowl" in page and "(color)" in page  # each crop labelled with its noun and token

    async def async_compose():
        async with AsyncIceClient(learner=target, timeout=300) as aio:
            return await aio.compose(readable, aliases={"bee": b}, options=opts, delta="merged_lora")

    again = asyncio.run(async_compose())
    assert [i.image_png for i in again.images] == [i.image_png for i in composition.images]

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "client", *args, "--learner", target, "--json"], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None, done.stderr

    code, listed, err = cli("concepts", "list", "--noun", "bowl")
    assert code == 0 and [c["name"] for c in listed] == [f"operations/{b}/concepts/c0"], err
    code, out, err = cli("compose", f"a photo of {{x:c0}} in {{{b}:c0.color}} color", "--job", f"x={a}",
                         "--out", str(tmp_path / "cli"), "--num-images", "1", "--inference-steps", "2")
    assert code == 0 and len(out["images"]) == 1 and (tmp_path / "cli" / "composition.html").is_file(), err
    code, out, err = cli("concepts", "export", f"{a}:c0", f"{b}:c0.color", "--out", str(tmp_path / "export"),
                         "--prompt", f"a {{{a}:c0}} in {{{b}:c0.color}} color")
    assert code == 0 and (tmp_path / "export" / "compose_example.py").is_file(), err
    assert len(list((tmp_path / "export").glob("tokens/**/learned_embeds.safetensors"))) == 5
    code, out, err = cli("compose", "a photo of {nothing:c0}", "--out", str(tmp_path / "bad"))
    assert code == 2 and "is not a job" in err  # one clear line, no traceback
    assert len(err.strip().splitlines()) == 1
