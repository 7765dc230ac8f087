"""Mutation check: for each documented guarantee, remove (or break) the code that provides it and show that the
test named for it then fails. A guarantee whose test still passes with its code removed is not proven by the suite.

    .venv/bin/python tests/mutation_check.py                   # every mutation (long: each runs its tests)
    .venv/bin/python tests/mutation_check.py --list            # the mutations, their files and tests
    .venv/bin/python tests/mutation_check.py --only NAME ...   # some of them
    .venv/bin/python tests/mutation_check.py --baseline ...    # also run each test unmutated first (it must pass)
    .venv/bin/python tests/mutation_check.py --record FILE     # write the outcome as JSON (bench/results/...)

The working tree is copied (tracked and untracked files that git does not ignore) into a temporary folder once;
each mutation edits one file of that copy (its text must occur exactly once), runs the named tests there with
pytest, and restores the file. The repository itself is never modified, so the check is safe beside other work.
A mutation is CAUGHT when its tests fail, MISSED when they pass, BROKEN when the snippet to mutate is not found
(the code changed: update the mutation). The exit status is 0 only when every mutation run was caught.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str  # the guarantee, as the docs state it
    file: str  # relative to the repository root
    find: str  # text that occurs exactly once in the file
    replace: str
    tests: tuple[str, ...]  # pytest node ids that must fail once the mutation is applied


MUTATIONS = (
    Mutation(
        "SIGTERM checkpoints the running job at the step it reached",
        "services/learner/trainer.py",
        "            except Interrupted:\n                if done < total:\n                    self.save_checkpoint(done)\n",
        "            except Interrupted:\n                pass\n",
        ("tests/reliability/test_faults.py::test_sigterm_checkpoints_the_running_job_and_it_resumes_there",)),
    Mutation(
        "readiness turns NOT_SERVING only after the store has been unwritable for the whole window",
        "services/learner/jobs.py",
        "            return time.monotonic() - self._unwritable_since < UNREADY_AFTER_SECONDS",
        "            return False",
        ("tests/reliability/test_faults.py::"
         "test_refused_record_writes_fail_the_job_clearly_keep_the_runner_and_turn_readiness_off_for_a_while",)),
    Mutation(
        "readiness turns NOT_SERVING once the store has been unwritable for the window",
        "services/learner/jobs.py",
        "            return time.monotonic() - self._unwritable_since < UNREADY_AFTER_SECONDS",
        "            return True",
        ("tests/reliability/test_faults.py::"
         "test_refused_record_writes_fail_the_job_clearly_keep_the_runner_and_turn_readiness_off_for_a_while",)),
    Mutation(
        "a full disk refuses a new job with RESOURCE_EXHAUSTED and leaves no folder",
        "services/learner/jobs.py",
        "            except OSError as exc:  # the inputs could not be saved: leave nothing half-made behind\n"
        "                shutil.rmtree(self.job_dir(job_id), ignore_errors=True)\n",
        "            except OSError as exc:  # the inputs could not be saved: leave nothing half-made behind\n",
        ("tests/reliability/test_faults.py::test_a_full_disk_refuses_new_jobs_clearly_and_leaves_no_record",)),
    Mutation(
        "a service whose bundle fails to load exits 1",
        "services/common/server.py",
        "        if running.failed.is_set():\n            running.stop(grace=0)\n            return 1\n",
        "        if running.failed.is_set():\n            running.stop(grace=0)\n            return 0\n",
        ("tests/reliability/test_faults.py::test_a_service_whose_bundle_does_not_load_exits_1_naming_the_fault",)),
    Mutation(
        "a call whose deadline passed while it waited for the model never reaches the model",
        "services/localizer/server.py",
        "            ensure_active(context)  # a call that waited for the model past its deadline is dropped here\n",
        "",
        ("tests/reliability/test_faults.py::"
         "test_a_deadline_that_passes_while_the_call_waits_is_deadline_exceeded_and_never_reaches_the_model",)),
    Mutation(
        "the localizer checks the deadline between rounds",
        "services/localizer/pipeline.py",
        "        for rnd in range(options.max_rounds):\n            check()\n",
        "        for rnd in range(options.max_rounds):\n",
        ("tests/test_localizer_service.py::"
         "test_a_deadline_passing_mid_round_stops_the_loop_on_the_server_before_the_next_round",)),
    Mutation(
        "the plaintext health port serves health and nothing else",
        "services/common/server.py",
        "        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)\n",
        "        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)\n"
        "        spec.register(health_server)\n",
        ("tests/test_runtime.py::test_plaintext_health_port_beside_tls_serves_health_and_nothing_else",)),
    Mutation(
        "MASK_ONLY starts the concept tokens at the word \"object\"",
        "services/learner/trainer.py",
        "        if self.ablation == \"mask_only\":\n            return [GENERIC_WORD] * len(self.concepts)\n",
        "",
        ("tests/test_learner_service.py::test_ablations_start_the_tokens_where_the_paper_says_and_drop_stage_two",)),
    Mutation(
        "WITHOUT_TEXT_INIT starts the concept tokens at random vocabulary rows",
        "services/learner/trainer.py",
        "        if self.ablation == \"without_text_init\":\n            return [None] * len(self.concepts)\n",
        "",
        ("tests/test_learner_service.py::test_ablations_start_the_tokens_where_the_paper_says_and_drop_stage_two",)),
    Mutation(
        "WITHOUT_STAGE_TWO runs phase 1 only",
        "services/learner/trainer.py",
        "        return replace(self, phase2_steps=0, refinement_steps=0) if ablation == \"without_stage_two\" else self",
        "        return self",
        ("tests/test_learner_service.py::test_ablations_start_the_tokens_where_the_paper_says_and_drop_stage_two",)),
    Mutation(
        "a running job cannot be deleted (FAILED_PRECONDITION) until it has ended",
        "services/learner/jobs.py",
        "            if not record.done:\n                raise FailedPrecondition(",
        "            if False:\n                raise FailedPrecondition(",
        ("tests/test_learner_service.py::test_a_running_job_cannot_be_deleted_until_it_has_ended",)),
    Mutation(
        "--resume-jobs=false fails an interrupted job instead of resuming it",
        "services/learner/jobs.py",
        "                if not resume_jobs:\n",
        "                if False:\n",
        ("tests/test_learner_service.py::test_resume_jobs_false_fails_the_interrupted_job_instead_of_resuming_it",)),
    Mutation(
        "a resumed job ends bit-identical to an uninterrupted run (the RNG state is restored)",
        "services/learner/trainer.py",
        "        self.generator.set_state(tensors[\"rng.torch\"])\n",
        "",
        ("tests/test_learner_service.py::test_sigkilled_learner_resumes_and_matches_an_uninterrupted_run",)),
    Mutation(
        "refinement=NONE uses the merged proposals without K-means",
        "services/localizer/pipeline.py",
        "refine_kmeans=options.refinement == \"kmeans\", kl_backend",
        "refine_kmeans=True, kl_backend",
        ("tests/test_localizer_service.py::test_refinement_none_skips_kmeans_and_gives_other_segments",)),
    Mutation(
        "a round that removes nothing stops the loop with NO_PROGRESS",
        "services/localizer/pipeline.py",
        "            if not newly_removed.any():\n                stop = \"no_progress\"\n                break\n",
        "",
        ("tests/test_localizer_service.py::test_each_stop_reason_is_reported",)),
    Mutation(
        "a penalty that keeps no word is NO_NEW_NOUN, not an internal error",
        "services/localizer/lasso.py",
        "                if not idx.numel():  # no word lowers the objective (a large λ): w = 0 is the solution\n"
        "                    continue\n",
        "",
        ("tests/test_localizer_service.py::test_each_stop_reason_is_reported",)),
    Mutation(
        "--max-images-per-request is the limit of a request's images",
        "services/evaluator/server.py",
        "        if total > s.max_images_per_request:\n            raise ResourceExhausted(f\"{total} images exceed the "
        "limit of {s.max_images_per_request} per \"",
        "        if total > 1024:\n            raise ResourceExhausted(f\"{total} images exceed the "
        "limit of {s.max_images_per_request} per \"",
        ("tests/test_evaluator_server.py::test_max_images_per_request_and_max_set_items_are_the_settings_limits",)),
    Mutation(
        "--max-set-items is the limit of a set's items",
        "services/evaluator/server.py",
        "            if index >= self.settings.max_set_items:",
        "            if index >= 10_000:",
        ("tests/test_evaluator_server.py::test_max_images_per_request_and_max_set_items_are_the_settings_limits",)),
    Mutation(
        "the CLI sends the token read from --token-file",
        "client/cli.py",
        "                               token_file=Path(a.token_file) if a.token_file else None, timeout=a.timeout)",
        "                               token_file=None, timeout=a.timeout)",
        ("tests/test_cli_connection.py::test_tls_and_the_token_from_a_file_or_a_flag_get_through",)),
    Mutation(
        "a client given a token file sends the rotated token without a restart",
        "client/channel.py",
        "        if stamp != self._stamp:\n",
        "        if self._stamp is None:\n",
        ("tests/test_credential_reload.py::test_a_client_given_a_token_file_follows_its_rotation_without_a_restart",)),
    Mutation(
        "the CLI speaks TLS with --tls",
        "client/cli.py",
        "        config = ChannelConfig(tls=a.tls, root_certificates=a.ca,",
        "        config = ChannelConfig(tls=False, root_certificates=None,",
        ("tests/test_cli_connection.py::test_tls_and_the_token_from_a_file_or_a_flag_get_through",)),
    Mutation(
        "`ice score-masks` scores the predicted masks against the ground truth",
        "client/cli.py",
        "    scores = _backend(a).score_masks(predicted, truth)\n",
        "    scores = _backend(a).score_masks(truth, predicted)\n",
        ("tests/test_cli_connection.py::test_tls_and_the_token_from_a_file_or_a_flag_get_through",)),
    Mutation(
        "a resumed batch skips every item already done",
        "client/batch.py",
        "    skipped = [i.id for i in mine if f\"{i.id}/{DONE}\" in markers]\n"
        "    todo = [i for i in mine if f\"{i.id}/{DONE}\" not in markers]\n",
        "    skipped = []\n    todo = list(mine)\n",
        ("tests/test_cli.py::test_batch_interrupted_then_resumed_redoes_nothing_and_loses_nothing",)),
    Mutation(
        "the SDK balances calls round robin over every address",
        "client/channel.py",
        "    load_balancing: str = \"round_robin\"",
        "    load_balancing: str = \"pick_first\"",
        ("tests/test_client.py::test_round_robin_spreads_calls_over_every_address",)),
    Mutation(
        "calls during a drain are refused while in-flight calls finish",
        "services/common/server.py",
        "        done = self.server.stop(grace)\n",
        "        done = self.server.stop(0)\n",
        ("tests/test_runtime.py::test_graceful_shutdown_finishes_in_flight_and_refuses_new",)),
    Mutation(
        "a renewed certificate or client CA is used for new connections without a restart",
        "services/common/credentials.py",
        "        if not self._throttle.due():\n            return None\n",
        "        return None\n",
        ("tests/test_credential_reload.py::test_a_renewed_certificate_is_served_to_new_connections_without_a_restart",
         "tests/test_credential_reload.py::test_a_rotated_client_ca_accepts_its_clients_and_refuses_the_old_ones")),
    Mutation(
        "a certificate that does not parse or does not match its key keeps the previous one, with a warning",
        "services/common/credentials.py",
        "            context.load_cert_chain(self._paths[0], self._paths[1], password=_encrypted_key)\n",
        "",
        ("tests/test_credential_reload.py::test_a_bad_certificate_keeps_the_previous_one_serving",)),
    Mutation(
        "a client CA file that does not parse keeps the previous CA, with a warning",
        "services/common/credentials.py",
        "                context.load_verify_locations(cadata=contents[2].decode(\"ascii\"))\n",
        "                pass\n",
        ("tests/test_credential_reload.py::test_a_rotated_client_ca_accepts_its_clients_and_refuses_the_old_ones",)),
    Mutation(
        "a rotated bearer token is required from the next reload interval, without a restart",
        "services/common/credentials.py",
        "        if self._throttle.due():\n            with self._lock:\n                self._reload()\n",
        "",
        ("tests/test_credential_reload.py::test_a_rotated_token_is_required_from_the_next_interval_and_an_emptied_file_keeps_it",)),
    Mutation(
        "the server accepts the replaced token for --auth-token-overlap-s after a rotation",
        "services/common/credentials.py",
        "        return self._overlap.tokens(self._token)\n",
        "        return (self._token,)\n",
        ("tests/test_credential_reload.py::test_the_replaced_token_is_accepted_for_the_overlap_then_refused",
         "tests/test_credential_reload.py::test_a_client_given_a_token_file_follows_its_rotation_without_a_restart")),
    Mutation(
        "a client sends the replaced token too during its overlap after its token file changed",
        "client/channel.py",
        "        return self._overlap.tokens(self())\n",
        "        return (self(),)\n",
        ("tests/test_credential_reload.py::test_a_client_sends_the_replaced_token_only_during_its_overlap",
         "tests/test_credential_reload.py::test_a_client_given_a_token_file_follows_its_rotation_without_a_restart")),
    Mutation(
        "a call carrying several bearer tokens gets through when one of them is accepted",
        "services/common/interceptors.py",
        "                    presented.append(credential.strip().encode())\n",
        "                    presented = presented or [credential.strip().encode()]  # the first one only\n",
        ("tests/test_credential_reload.py::test_the_replaced_token_is_accepted_for_the_overlap_then_refused",
         "tests/test_credential_reload.py::test_a_client_given_a_token_file_follows_its_rotation_without_a_restart")),
    Mutation(
        "an emptied token file keeps the previous token",
        "services/common/credentials.py",
        "            problem = None if token else \"the file is empty\"\n",
        "            problem = None\n",
        ("tests/test_credential_reload.py::test_a_rotated_token_is_required_from_the_next_interval_and_an_emptied_file_keeps_it",)),
    Mutation(
        "a killed `ice serve` leaves no services behind",
        "client/devservers.py",
        "                                                        preexec_fn=_stop_with_parent)",
        "                                                        )",
        ("tests/test_e2e_client.py::test_services_stop_when_ice_serve_is_killed",)),
    Mutation(
        "`--local` gives the services' result for the same seed (tokens in the learner's order)",
        "client/local.py",
        "                  for t in by_concept(manifest[\"tokens\"])]",
        "                  for t in manifest[\"tokens\"]]",
        ("tests/test_e2e_client.py::test_local_gives_the_result_of_the_services_for_the_same_seed",)),
    Mutation(
        "`ice batch` stopped by SIGTERM hands its in-flight learning jobs back instead of cancelling them",
        "client/batch.py",
        "            run.cancel_jobs = stopped_by == \"SIGINT\" or on_sigterm == \"cancel\" or not hasattr(backend, \"create_job\")",
        "            run.cancel_jobs = True",
        ("tests/test_e2e_client.py::test_batch_sharded_stopped_by_sigterm_and_resumed_against_the_services",)),
)


@dataclass
class Outcome:
    name: str
    file: str
    tests: tuple[str, ...]
    verdict: str  # CAUGHT | MISSED | BROKEN | BASELINE-FAILS
    seconds: float
    detail: str = ""


def _copy_tree(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _pytest(copy: Path, tests: tuple[str, ...], env: dict[str, str], timeout: float) -> tuple[int, str]:
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, (lines[-1] if lines else done.stderr[-300:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME",
                        help="run the mutations whose name contains one of these words")
    parser.add_argument("--baseline", action="store_true", help="first run each test unmutated: it must pass")
    parser.add_argument("--record", type=Path, help="write the outcome as JSON to this file")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds each pytest run may take")
    a = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not a.only or any(w.lower() in m.name.lower() for w in a.only)]
    if a.list:
        for m in MUTATIONS:
            print(f"{m.name}\n    {m.file}\n    " + "\n    ".join(m.tests))
        return 0
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="ice-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        _copy_tree(copy)
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        if not env.get("ICE_TEST_BUNDLE"):  # one tiny bundle for every run instead of one per pytest session
            from services.common.tiny_bundle import build_tiny_bundle

            env["ICE_TEST_BUNDLE"] = str(build_tiny_bundle(Path(tmp) / "bundle", seed=0))
        # the copy's modules, not the repository's, are the ones imported
        where = subprocess.run([sys.executable, "-c", "import services, client; print(services.__file__, "
                                "client.__file__)"], cwd=copy, env=env, capture_output=True, text=True, check=True)
        assert all(path.startswith(str(copy)) for path in where.stdout.split()), where.stdout
        for m in chosen:
            started = time.monotonic()
            path = copy / m.file
            original = path.read_text()
            if original.count(m.find) != 1:
                outcomes.append(Outcome(m.name, m.file, m.tests, "BROKEN", 0.0,
                                        f"the text to mutate occurs {original.count(m.find)} times"))
                print(f"BROKEN  {m.name}", flush=True)
                continue
            if a.baseline:
                code, last = _pytest(copy, m.tests, env, a.timeout)
                if code != 0:
                    outcomes.append(Outcome(m.name, m.file, m.tests, "BASELINE-FAILS",
                                            time.monotonic() - started, last))
                    print(f"BASELINE-FAILS  {m.name}: {last}", flush=True)
                    continue
            path.write_text(original.replace(m.find, m.replace))
            try:
                code, last = _pytest(copy, m.tests, env, a.timeout)
            finally:
                path.write_text(original)
            verdict = "CAUGHT" if code != 0 else "MISSED"
            outcomes.append(Outcome(m.name, m.file, m.tests, verdict, time.monotonic() - started, last))
            print(f"{verdict:7s} {m.name} ({time.monotonic() - started:.0f} s): {last}", flush=True)
    caught = sum(o.verdict == "CAUGHT" for o in outcomes)
    print(f"\n{caught} of {len(outcomes)} mutations caught")
    if a.record:
        a.record.parent.mkdir(parents=True, exist_ok=True)
        a.record.write_text(json.dumps({
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "tests/mutation_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "caught": caught, "run": len(outcomes), "outcomes": [asdict(o) for o in outcomes]}, indent=2) + "\n")
    return 0 if outcomes and caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
