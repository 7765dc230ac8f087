"""`ice`: the command line of the ICE services (run as `ice ...` or `python -m client ...`).

    ice serve --bundle build/tiny-bundle              # the three services on localhost, for development
    ice extract photo.jpg --out result/               # localize -> learn -> generate -> evaluate + report
    ice extract photo.jpg --out result/ --local --bundle build/tiny-bundle   # the same, in-process
    ice batch photos/ --out results/ --concurrency 2  # resumable; --shard-index/--shard-count for k8s
    ice localize photo.jpg --out masks/
    ice learn start photo.jpg --from masks/ ; ice learn status|watch|cancel|artifacts JOB ; ice learn list
    ice generate JOB --kind intrinsic --out images/
    ice evaluate result/                              # re-score one extraction (ACC among its own concepts)
    ice evaluate results/                             # a batch's results as one set: the paper's ACC protocol
    ice score-masks --predicted a.png b.png --ground-truth g1.png g2.png
    ice concepts list --noun cup ; ice concepts show JOB:c0 ; ice concepts export JOB:c0 JOB2:c1.color --out DIR
    ice compose "a photo of {JOB:c0} in {JOB2:c1.color} color" --out DIR [--delta tokens_only|one_job|merged_lora]

Exit codes, one per kind of failure (the `kind` of a `--json` error):
  0  success
  1  failed: a learning job failed or was cancelled, a service failed or hit a limit (RESOURCE_EXHAUSTED: a full
     queue, a job too large for the learner, an image above the pixel limit), any other service error
  2  refused: bad usage; a file that cannot be read or is not a PNG/JPEG/WebP image; an output folder that
     cannot be written; an input a service refuses as given (INVALID_ARGUMENT, OUT_OF_RANGE, NOT_FOUND: a 1x1
     image, a mask of the wrong size, an unknown job), whether the service or, with --local, the same checks
     in this process refuse it
  3  unavailable: a service cannot be reached
  130 interrupted; 143 `ice batch` stopped by SIGTERM
Errors are one line on stderr ("ice: cannot reach the localizer at localhost:50051: ..."); with `--json` the
result (or {"error": ..., "kind": ...}) is printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from client.errors import IceClientError, JobFailed, ServiceError, ServiceUnavailable

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 1, 2, 3, 130
EXIT_TERMINATED = 143
# status codes that mean "this input, as given, is refused": the same exit code as the CLI's own checks
REFUSED_CODES = ("INVALID_ARGUMENT", "OUT_OF_RANGE", "NOT_FOUND")


def _by_code(code: str, message: str) -> tuple[int, str, str]:
    """(exit code, message, kind) of an error with the gRPC status code named `code`, answered by a service or
    by the same checks made in this process (--local): the same exit code either way."""
    return (EXIT_USAGE, message, "refused") if code in REFUSED_CODES else (EXIT_FAILED, message, "failed")


class UsageError(Exception):
    """Bad input from the command line: a missing file, not an image, an unwritable folder."""


# --- checks that turn into one-line messages --------------------------------------------------------------
def read_image(path: str | Path) -> bytes:
    """The file's bytes, after checking that it is an image PIL can open (PNG, JPEG or WebP)."""
    import io

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not an image") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG", "WEBP"):
                raise UsageError(f"{path} is a {img.format} image; ICE takes PNG, JPEG or WebP")
            img.verify()
    except UnidentifiedImageError:
        raise UsageError(f"{path} is not an image (PNG, JPEG or WebP): {_what_it_is(data)}") from None
    except (OSError, SyntaxError, ValueError):
        raise UsageError(f"{path} is not a readable image (PNG, JPEG or WebP): its data is truncated or "
                         "corrupt") from None
    return data


def _what_it_is(data: bytes) -> str:
    """A few words on what a file that is no image holds (PIL's own message only names an in-memory buffer)."""
    if not data:
        return "the file is empty"
    head = data[:4096]
    if head.startswith(b"%PDF"):
        return "it is a PDF document"
    if head[:4] in (b"PK\x03\x04", b"\x1f\x8b\x08\x00") or head[:2] == b"\x1f\x8b":
        return "it is a compressed archive"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "its bytes are not in any image format"
    return "it is a text file"


def check_local_image(data: bytes, path: str | Path) -> None:
    """With --local: the checks the localizer makes on an image (size limits, decodable pixels), before any model
    loads (seconds), so that a 1-pixel image is refused at once."""
    from client.local import LocalError
    from services.common.errors import IceError
    from services.common.images import decode_image

    try:
        decode_image(data, field=str(path))
    except IceError as exc:  # the exit code a service's refusal of this image would give
        raise LocalError(exc.message, exc.code) from None


def writable_dir(path: str | Path) -> Path:
    """Create the folder if needed and prove that a file can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ice-write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to the output folder {path}: {exc.strerror or exc}") from None
    return path


# --- options shared by sub-commands -----------------------------------------------------------------------
def _connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection (flags win over ICE_* environment variables)")
    g.add_argument("--localizer", default=os.environ.get("ICE_LOCALIZER"),
                   help="localizer target, host:port or dns:///host:port [env ICE_LOCALIZER; localhost:50051]")
    g.add_argument("--learner", default=os.environ.get("ICE_LEARNER"),
                   help="learner target [env ICE_LEARNER; localhost:50052]")
    g.add_argument("--evaluator", default=os.environ.get("ICE_EVALUATOR"),
                   help="evaluator target [env ICE_EVALUATOR; localhost:50053]")
    g.add_argument("--token", default=os.environ.get("ICE_TOKEN"), help="bearer token [env ICE_TOKEN]")
    g.add_argument("--token-file", type=Path, default=os.environ.get("ICE_TOKEN_FILE"),
                   help="file holding the bearer token, read again when it changes [env ICE_TOKEN_FILE]")
    g.add_argument("--tls", action="store_true", default=os.environ.get("ICE_TLS", "") in ("1", "true"),
                   help="use TLS (system roots unless --ca) [env ICE_TLS=1]")
    g.add_argument("--ca", type=Path, default=os.environ.get("ICE_TLS_CA"), help="PEM CA bundle [env ICE_TLS_CA]")
    g.add_argument("--cert", type=Path, default=os.environ.get("ICE_TLS_CERT"),
                   help="PEM client certificate for mutual TLS [env ICE_TLS_CERT]")
    g.add_argument("--key", type=Path, default=os.environ.get("ICE_TLS_KEY"),
                   help="PEM client key for mutual TLS [env ICE_TLS_KEY]")
    g.add_argument("--timeout", type=float, default=float(os.environ.get("ICE_TIMEOUT", 600)),
                   help="deadline of each call in seconds [env ICE_TIMEOUT; 600]")
    g.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _local_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("in-process (no servers)")
    g.add_argument("--local", action="store_true", help="run every step in this process on --bundle")
    g.add_argument("--bundle", type=Path, default=os.environ.get("ICE_BUNDLE"),
                   help="model bundle folder for --local [env ICE_BUNDLE]")
    g.add_argument("--device", default="auto", help="torch device for --local: auto, cpu, cuda[:N]")


def _localize_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("localization (unset = server default)")
    g.add_argument("--max-concepts", type=int)
    g.add_argument("--max-rounds", type=int)
    g.add_argument("--remaining-fraction-threshold", type=float)
    g.add_argument("--l1-penalty", type=float)
    g.add_argument("--min-area-fraction", type=float)
    g.add_argument("--merge-threshold", type=float, help="DiffSeg KL merge threshold (default 1.1)")
    g.add_argument("--localize-seed", type=int)


def _schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learning (unset = server default: 400/400/300 steps, 1000 class images)")
    g.add_argument("--phase1-steps", type=int)
    g.add_argument("--phase2-steps", type=int)
    g.add_argument("--refinement-steps", type=int)
    g.add_argument("--num-class-images", type=int)
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--quick", action="store_true",
                   help="a few steps of each phase (2/2/1, 2 class images): a smoke test, not a result")
    g.add_argument("--few-class-images", action="store_true",
                   help="one class image per 10 training steps instead of one per step (a job never uses more "
                        "than one per step): a tenth of the preparation when they are not cached; the "
                        "prior-preservation loss then sees each image about 10 times")
    g.add_argument("--anchors", nargs="+", default=[], metavar="WORD",
                   help="intrinsic anchors (default texture material color)")
    g.add_argument("--seed", type=int, help="seed of the learning job")


def _generate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (unset = server default: 8 images, 50 steps, guidance 7.5)")
    g.add_argument("--num-images", type=int, help="images per prompt")
    g.add_argument("--inference-steps", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--generate-seed", type=int)


def _localize_options(a):
    from client.options import LocalizeOptions

    return LocalizeOptions(max_concepts=a.max_concepts, max_rounds=a.max_rounds,
                           remaining_fraction_threshold=a.remaining_fraction_threshold, l1_penalty=a.l1_penalty,
                           min_area_fraction=a.min_area_fraction, merge_threshold=a.merge_threshold,
                           seed=a.localize_seed)


def _schedule(a):
    from dataclasses import replace

    from client.options import Schedule

    base = Schedule.quick() if a.quick else Schedule()
    given = {k: getattr(a, k) for k in ("phase1_steps", "phase2_steps", "refinement_steps", "num_class_images",
                                        "checkpoint_every") if getattr(a, k) is not None}
    return replace(base, **given)


def _generate_options(a):
    from client.options import GenerateOptions

    return GenerateOptions(num_images=a.num_images, num_inference_steps=a.inference_steps,
                           guidance_scale=a.guidance_scale, seed=a.generate_seed)


def _extract_options(a):
    from client.options import ExtractOptions

    return ExtractOptions(localize=_localize_options(a), schedule=_schedule(a), anchors=tuple(a.anchors),
                          generate=_generate_options(a), seed=a.seed, composition=not a.no_composition,
                          encoders=tuple(a.encoder or ()), evaluate=not a.no_evaluate,
                          few_class_images=a.few_class_images)


def _say_plan(plan) -> None:
    """A job's plan, before it is created: what it will generate first, and how long that takes."""
    print(f"ice: learning job: {plan.line()}", file=sys.stderr, flush=True)


def _client(a):
    from client.channel import ChannelConfig
    from client.sdk import IceClient

    try:  # --token-file is read again whenever it changes (a rotated Secret, a long batch)
        config = ChannelConfig(tls=a.tls, root_certificates=a.ca, client_certificate=a.cert, client_key=a.key,
                               token=None if a.token_file else a.token,
                               token_file=Path(a.token_file) if a.token_file else None, timeout=a.timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return IceClient(a.localizer, a.learner, a.evaluator, config=config)


def _backend(a):
    if getattr(a, "local", False):
        if a.bundle is None:
            raise UsageError("--local needs --bundle DIR (or ICE_BUNDLE)")
        from client.local import LocalIce

        return LocalIce(a.bundle, device=a.device, work_dir=getattr(a, "out", None))
    return _client(a)


def _emit(a, data: Any, text: str | None) -> None:
    if a.json:
        print(json.dumps(data, indent=2, default=str))
    elif text:
        print(text)


# --- commands -------------------------------------------------------------------------------------------
def cmd_extract(a) -> int:
    from client.pipeline import run_extraction

    image = read_image(a.image)
    if a.local:
        check_local_image(image, a.image)
    out = writable_dir(a.out)
    backend = _backend(a)
    if hasattr(backend, "plan_job"):  # a learner service: it plans each job before it is created
        backend.on_plan = _say_plan
    extraction = run_extraction(backend, image, _extract_options(a), out_dir=out, progress=not a.no_progress)
    nouns = ", ".join(f"{c.concept_id}={c.noun}" for c in extraction.localization.concepts) or "none"
    lines = [f"concepts: {nouns}"]
    if extraction.evaluation:
        lines += [_score_line(s) for s in extraction.evaluation.scores]
        note = per_request_note(extraction.evaluation.scores)
        lines += [note] if note else []
    lines.append(f"report: {out / 'report.html'}")
    _emit(a, {**extraction.to_dict(), "report": str(out / "report.html")}, "\n".join(lines))
    return 0


def cmd_localize(a) -> int:
    from client.report import atomic_write

    image = read_image(a.image)
    if a.local:
        check_local_image(image, a.image)
    out = writable_dir(a.out) if a.out else None
    result = _backend(a).localize(image, _localize_options(a))
    if out is not None:
        for c in result.concepts:
            atomic_write(out / f"{c.concept_id}.png", c.mask_png)
        atomic_write(out / "concepts.json", json.dumps(result.to_dict(), indent=2))
    lines = [f"{c.concept_id}\t{c.noun}\t{c.area_fraction:.3f}\tround {c.round}" for c in result.concepts]
    lines.append(f"{len(result.concepts)} concept(s), {result.rounds} round(s), stopped: {result.stop_reason}")
    _emit(a, result.to_dict(), "\n".join(lines))
    return 0


def _concepts_from(a) -> list[tuple[str, bytes]]:
    pairs = []
    if a.from_dir:
        record = Path(a.from_dir) / "concepts.json"
        try:
            concepts = json.loads(record.read_text())["concepts"]
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"{record}: not the output of `ice localize --out` ({exc})") from None
        for c in concepts:
            pairs.append((c["noun"], read_image(Path(a.from_dir) / f"{c['concept_id']}.png")))
    for spec in a.concept or []:
        noun, _, mask = spec.partition("=")
        if not noun or not mask:
            raise UsageError(f"--concept {spec!r}: expected NOUN=MASK.png")
        pairs.append((noun, read_image(mask)))
    if not pairs:
        raise UsageError("give the concepts with --from DIR (from `ice localize --out DIR`) or --concept NOUN=MASK")
    return pairs


def cmd_learn(a) -> int:
    ice = _client(a)
    if a.learn_command == "start":
        from client.core import scaled_schedule

        image, concepts, schedule = read_image(a.image), _concepts_from(a), _schedule(a)
        plan = ice.plan_or_none(image, concepts, anchors=a.anchors, schedule=schedule, seed=a.seed)
        if a.few_class_images:
            schedule = scaled_schedule(schedule, plan)
            plan = plan and ice.plan_or_none(image, concepts, anchors=a.anchors, schedule=schedule, seed=a.seed)
        if plan is not None:
            _say_plan(plan)  # before the job exists: what it will generate first and how long that takes
        job = ice.create_job(image, concepts, anchors=a.anchors, schedule=schedule, seed=a.seed)
        planned = {"plan": plan.to_dict()} if plan is not None else {}
        if a.wait:
            result = ice.wait(job, progress=not (a.json or a.no_progress))
            _emit(a, {"job": job.ref, **planned, **result.to_dict()}, f"{job.ref} succeeded; tokens: "
                  + " ".join(t.token for t in result.tokens if t.role != "INSTANCE"))
        else:  # "operations/ID@replica" when the learner advertises its replica: later commands go there
            _emit(a, {"job": job.ref, **planned}, job.ref)
        return 0
    if a.learn_command == "list":
        jobs = ice.jobs()
        _emit(a, [j.to_dict() for j in jobs], "\n".join(f"operations/{j.job_id}\t{j.line()}" for j in jobs))
        return 0
    if a.learn_command == "status":
        p = ice.job(a.job)
        _emit(a, p.to_dict(), p.line())
        return 0 if p.state not in ("FAILED", "CANCELLED") else EXIT_FAILED
    if a.learn_command == "watch":
        last = None
        for last in ice.watch(a.job):
            if a.no_progress:  # only the final state
                continue
            if a.json:
                print(json.dumps(last.to_dict(), default=str), flush=True)
            else:
                print(last.line(), flush=True)
        if a.no_progress and last is not None:
            _emit(a, last.to_dict(), last.line())
        return 0 if last is not None and last.state == "SUCCEEDED" else EXIT_FAILED
    if a.learn_command == "cancel":
        ice.cancel(a.job)
        _emit(a, {"job": a.job, "cancel_requested": True}, f"cancellation of {a.job} requested")
        return 0
    if a.learn_command == "artifacts":
        files = ice.artifacts(a.job, writable_dir(a.out), a.files)
        _emit(a, [str(f) for f in files], "\n".join(str(f) for f in files))
        return 0
    raise UsageError(f"unknown learn command {a.learn_command}")


def cmd_generate(a) -> int:
    from client.report import atomic_write

    out = writable_dir(a.out)
    ice = _client(a)
    kind = "free" if a.prompt else a.kind
    written = []
    for n, g in enumerate(ice.iter_generate(a.job, kind, a.prompt or (), a.concept or (), _generate_options(a))):
        name = f"{n:03d}_{g.concept_id or 'free'}_{g.attribute or g.kind.lower()}_{g.index}.png"
        atomic_write(out / name, g.image_png)
        written.append({**g.to_dict(), "file": str(out / name)})
        if not a.json:
            print(f"{out / name}\t{g.prompt}\tseed {g.seed}", flush=True)
    if a.json:
        print(json.dumps(written, indent=2))
    return 0


def _score_line(s) -> str:
    sim_c = f" SIM^C {s.sim_c:.3f}" if s.sim_c is not None else ""
    return f"{s.encoder}: SIM^I {s.sim_i:.3f}{sim_c} ACC^1 {s.acc1:.3f} ACC^3 {s.acc3:.3f}"


def per_request_note(scores) -> str | None:
    """The caveat printed under per-request accuracies (None when they were measured over a set)."""
    s = next((s for s in scores if s.per_request), None)
    if s is None:
        return None
    return (f"note: ACC ranked among this image's {s.concepts_in_scope} concept(s) only, not the paper's protocol "
            "(which ranks among a whole set's concepts): `ice evaluate RESULTS_DIR` scores a batch as one set")


def _extraction_folders(folders: list[Path]) -> list[tuple[str, Path]]:
    """(item id, folder) of every extraction: a folder holding extraction.json, or a batch results folder whose
    sub-folders hold one each."""
    found = []
    for folder in folders:
        if (folder / "extraction.json").is_file():
            found.append((folder.name, folder))
        elif folder.is_dir():
            subs = sorted(p.parent for p in folder.glob("*/extraction.json"))
            if not subs:
                raise UsageError(f"{folder} holds no extraction (from `ice extract --out` or `ice batch --out`)")
            found += [(f"{folder.name}/{p.name}" if len(folders) > 1 else p.name, p) for p in subs]
        else:
            raise UsageError(f"{folder} is not a folder")
    return found


def cmd_evaluate(a) -> int:
    """Re-score one extraction folder (e.g. with other encoders) and refresh its metrics and report; or score
    several extractions, or a batch's results folder, as one set (accuracy among all their concepts)."""
    from client.report import load_extraction, write_extraction
    from client.sdk import evaluation_inputs

    folders = _extraction_folders([Path(f) for f in a.folder])
    if len(a.folder) == 1 and (Path(a.folder[0]) / "extraction.json").is_file() and not a.set:
        folder = folders[0][1]
        try:
            extraction = load_extraction(folder)
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"{folder} is not an extraction folder (from `ice extract --out`): {exc}") from None
        writable_dir(folder)
        composition = [g.image_png for g in extraction.generated if g.kind == "FREE"]
        extraction.evaluation = _backend(a).evaluate(
            extraction.image_png, evaluation_inputs(extraction.localization.concepts, extraction.generated),
            composition, tuple(a.encoder or ()), a.background_fill, a.crop)
        write_extraction(extraction, folder)
        lines = [_score_line(s) for s in extraction.evaluation.scores]
        note = per_request_note(extraction.evaluation.scores)
        _emit(a, extraction.evaluation.to_dict(), "\n".join(lines + ([note] if note else [])))
        return 0
    return _evaluate_set(a, folders)


def _evaluate_set(a, folders: list[tuple[str, Path]]) -> int:
    from client.messages import extraction_set_item
    from client.report import atomic_write, load_extraction

    skipped: list[str] = []

    def items():
        for item_id, folder in folders:
            try:
                extraction = load_extraction(folder)
            except (OSError, ValueError, KeyError) as exc:
                raise UsageError(f"{folder} is not an extraction folder: {exc}") from None
            item = extraction_set_item(extraction, item_id)
            if not item[2]:  # no concept with generated images: nothing to rank
                skipped.append(item_id)
                continue
            yield item

    result = _backend(a).evaluate_set(items(), tuple(a.encoder or ()), a.background_fill, a.crop)
    data = {**result.to_dict(), "skipped": skipped}
    out = a.out
    if out is None and len(a.folder) == 1 and not (Path(a.folder[0]) / "extraction.json").is_file():
        out = Path(a.folder[0]) / "set_metrics.json"  # beside a batch's items
    if out is not None:
        atomic_write(Path(out), json.dumps(data, indent=2))
    lines = [f"set of {result.item_count} item(s), {result.concept_count} concept(s); accuracy ranked among all "
             "of them (the paper's protocol)"]
    lines += [_score_line(s) for s in result.scores]
    if skipped:
        lines.append(f"skipped (no concept with generated images): {', '.join(skipped)}")
    if out is not None:
        lines.append(f"written to {out}")
    _emit(a, data, "\n".join(lines))
    return 0


def cmd_score_masks(a) -> int:
    predicted = [read_image(p) for p in a.predicted]
    truth = [read_image(p) for p in a.ground_truth]
    scores = _backend(a).score_masks(predicted, truth)
    _emit(a, scores.to_dict(), f"mIoU {scores.miou:.3f} recall {scores.recall:.3f} precision {scores.precision:.3f}")
    return 0


def cmd_batch(a) -> int:
    from client.batch import list_items, run_batch
    from client.storage import Store, is_url

    try:
        items = list_items(a.source if is_url(a.source) else Path(a.source))
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if not items:
        raise UsageError(f"{a.source}: no PNG, JPEG or WebP images found")
    shard_count = a.shard_count
    shard_index = a.shard_index if a.shard_index is not None else int(os.environ.get("JOB_COMPLETION_INDEX", 0))
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise UsageError(f"--shard-index {shard_index} must be in [0, --shard-count {shard_count})")
    if is_url(a.out):  # object storage: results, markers and summaries are written there
        try:
            out = Store(a.out)
            out.check_writable()
        except OSError as exc:
            raise UsageError(f"cannot write to the output location {a.out}: {exc}") from None
        a.out = Path(tempfile.mkdtemp(prefix="ice-batch-"))  # --local: the in-process learner's working files
    else:
        a.out = writable_dir(a.out)
        out = Store(a.out)
    backend = _backend(a)
    concurrency = 1 if a.local else a.concurrency  # one model in this process: one item at a time
    summary = run_batch(backend, items, out, _extract_options(a), concurrency, shard_index, shard_count,
                        on_sigterm=a.on_sigterm)
    text = (f"{summary['done']} of {summary['items']} item(s) done ({len(summary['skipped'])} from earlier runs), "
            f"{len(summary['failed'])} failed, {len(summary['pending'])} not done; index: {out.url('index.html')}")
    _emit(a, summary, text)
    if summary["interrupted"]:
        return EXIT_TERMINATED if summary["stopped_by"] == "SIGTERM" else EXIT_INTERRUPTED
    return EXIT_FAILED if summary["failed"] else 0


def cmd_serve(a) -> int:
    from client.devservers import DevServices, ServicesFailed

    if not (Path(a.bundle) / "bundle.json").is_file():
        raise UsageError(f"{a.bundle} is not a model bundle (no bundle.json); build one with `ice-bundle tiny`")
    ports = dict(zip(("localizer", "learner", "evaluator"), a.ports, strict=True))
    services = DevServices(Path(a.bundle), ports=ports, host=a.host, job_store=a.job_store, log_dir=a.log_dir)
    print(f"starting the services on {a.host} (logs in {services.log_dir or 'a temporary folder'}) ...",
          file=sys.stderr, flush=True)
    try:
        services.start(timeout=a.start_timeout)
    except ServicesFailed as exc:
        print(f"ice: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        targets = services.targets()
        _emit(a, {"targets": targets, "logs": str(services.log_dir), "job_store": str(services.job_store)},
              "\n".join(f"{name:9s} {t}" for name, t in targets.items())
              + f"\nlogs in {services.log_dir}; Ctrl-C stops the services")
        sys.stdout.flush()
        while True:
            dead = services.dead()
            if dead:
                print(f"ice: the {dead[0]} stopped:\n{services.log_tail(dead[0])}", file=sys.stderr)
                return EXIT_FAILED
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping the services ...", file=sys.stderr, flush=True)
        return 0
    finally:
        services.stop()


# --- the parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    conn = argparse.ArgumentParser(add_help=False)
    _connection_args(conn)
    local = argparse.ArgumentParser(add_help=False)
    _local_args(local)
    loc = argparse.ArgumentParser(add_help=False)
    _localize_args(loc)
    sched = argparse.ArgumentParser(add_help=False)
    _schedule_args(sched)
    gen = argparse.ArgumentParser(add_help=False)
    _generate_args(gen)
    extract_only = argparse.ArgumentParser(add_help=False)
    g = extract_only.add_argument_group("evaluation")
    g.add_argument("--encoder", action="append", choices=["clip", "dino"], help="encoder(s) to score with")
    g.add_argument("--no-composition", action="store_true", help="skip the all-concepts prompt (SIM^C)")
    g.add_argument("--no-evaluate", action="store_true", help="skip the metrics")

    parser = argparse.ArgumentParser(prog="ice", description="Intrinsic Concept Extraction: SDK command line.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", parents=[conn, local, loc, sched, gen, extract_only],
                       help="localize, learn, generate and evaluate one image; write its report")
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_extract)

    p = sub.add_parser("localize", parents=[conn, local, loc], help="find the concepts (nouns and masks) of an image")
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, help="write the masks and concepts.json here")
    p.set_defaults(run=cmd_localize)

    p = sub.add_parser("learn", help="learning jobs: start, list, status, watch, cancel, artifacts")
    lsub = p.add_subparsers(dest="learn_command", required=True, metavar="ACTION")
    q = lsub.add_parser("start", parents=[conn, sched], help="queue a learning job")
    q.add_argument("image", type=Path)
    q.add_argument("--from", dest="from_dir", type=Path, help="folder written by `ice localize --out`")
    q.add_argument("--concept", action="append", metavar="NOUN=MASK.png", help="a concept (repeatable)")
    q.add_argument("--wait", action="store_true", help="follow the job to its end")
    q.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")
    for name, text in (("status", "a job's progress"), ("watch", "stream a job's progress until it ends"),
                       ("cancel", "cancel a job")):
        q = lsub.add_parser(name, parents=[conn], help=text)
        q.add_argument("job", help="operations/JOB_ID or JOB_ID")
        if name == "watch":
            q.add_argument("--no-progress", action="store_true",
                           help="print only the final state, not every change (as `extract --no-progress`)")
    lsub.add_parser("list", parents=[conn], help="every job the learner knows")
    q = lsub.add_parser("artifacts", parents=[conn], help="download a succeeded job's files")
    q.add_argument("job")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--files", nargs="*", default=[], help="only these files")
    p.set_defaults(run=cmd_learn)

    p = sub.add_parser("generate", parents=[conn, gen], help="generate images with a job's learned tokens")
    p.add_argument("job")
    p.add_argument("--kind", choices=["object_level", "intrinsic"], default="object_level")
    p.add_argument("--prompt", action="append", help="free prompt using the job's tokens (repeatable)")
    p.add_argument("--concept", action="append", help="only this concept id (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("evaluate", parents=[conn, local],
                       help="re-score an extraction folder, or score a batch's results (or several extractions) as "
                            "one set: accuracy among all their concepts, as the paper")
    p.add_argument("folder", nargs="+", type=Path,
                   help="an extraction folder (from `ice extract --out`), a batch results folder, or several")
    p.add_argument("--set", action="store_true", help="score even a single extraction folder through EvaluateSet")
    p.add_argument("--out", type=Path, help="write the set's scores here as JSON (default for a batch results "
                                            "folder: FOLDER/set_metrics.json)")
    p.add_argument("--encoder", action="append", choices=["clip", "dino"])
    p.add_argument("--background-fill", choices=["black", "white", "gray", "mean"])
    p.add_argument("--crop", choices=["none", "mask_box"])
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("score-masks", parents=[conn, local], help="mIoU/recall/precision of masks vs ground truth")
    p.add_argument("--predicted", nargs="*", default=[], type=Path)
    p.add_argument("--ground-truth", nargs="+", required=True, type=Path)
    p.set_defaults(run=cmd_score_masks)

    p = sub.add_parser("batch", parents=[conn, local, loc, sched, gen, extract_only],
                       help="extract every image of a folder or manifest, resumably")
    p.add_argument("source", help="folder of images, or a manifest (one path per line, or JSON lines); a local "
                                  "path or a URL: s3://, gs://, az://, file://")
    p.add_argument("--out", required=True, help="results folder: a local path or a URL (s3://, gs://, az://)")
    p.add_argument("--concurrency", type=int, default=2, help="items in flight (with services)")
    p.add_argument("--on-sigterm", choices=["hand-back", "cancel"], default="hand-back",
                   help="on SIGTERM (eviction, Job deletion): leave the learning jobs in flight running for a retry "
                        "to pick up, or cancel them (Ctrl-C always cancels)")
    p.add_argument("--shard-index", type=int, help="this worker's shard [env JOB_COMPLETION_INDEX; 0]")
    p.add_argument("--shard-count", type=int, default=int(os.environ.get("ICE_SHARD_COUNT", 1)),
                   help="number of shards [env ICE_SHARD_COUNT; 1]")
    p.set_defaults(run=cmd_batch)

    p = sub.add_parser("serve", help="run the three services locally (development); Ctrl-C stops them")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ports", type=int, nargs=3, default=[50051, 50052, 50053], metavar=("LOC", "LEARN", "EVAL"),
                   help="gRPC ports; 0 = any free port (the ports bound are printed)")
    p.add_argument("--job-store", type=Path, help="the learner's job store (default: under the log folder)")
    p.add_argument("--log-dir", type=Path)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_serve)

    from client.compose import add_commands  # ice concepts list|show|export, ice compose

    add_commands(sub, conn, gen)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    as_json = getattr(a, "json", False)

    def fail(code: int, message: str, kind: str) -> int:
        print(f"ice: {message}", file=sys.stderr)
        if as_json:
            print(json.dumps({"error": message, "kind": kind}))
        return code

    try:
        return a.run(a)
    except UsageError as exc:
        return fail(EXIT_USAGE, str(exc), "usage")
    except ServiceUnavailable as exc:
        return fail(EXIT_UNREACHABLE, str(exc), "unavailable")
    except ServiceError as exc:
        return fail(*_by_code(exc.code.name, str(exc)))
    except JobFailed as exc:
        return fail(EXIT_FAILED, str(exc), "failed")
    except IceClientError as exc:  # with --local: a step refused its input, as a service would have
        return fail(*_by_code(getattr(exc, "code", ""), str(exc)))
    except ValueError as exc:  # e.g. an unknown enum name in an option
        return fail(EXIT_USAGE, str(exc), "usage")
    except OSError as exc:
        return fail(EXIT_FAILED, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), "os")
    except KeyboardInterrupt:
        print("ice: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
