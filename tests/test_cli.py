"""The `ice` CLI: every command against the contract doubles on loopback, its error paths (service down, not an
image, unwritable output), and `ice batch` interrupted with Ctrl-C and resumed with nothing redone or lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import interruptible
from PIL import Image

from client.cli import main

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--quick", "--num-images", "1", "--inference-steps", "2"]


@pytest.fixture(scope="module")
def fakes():
    from test_client import FakeIce

    ice = FakeIce(steps=3, step_seconds=0.05)
    yield ice
    ice.stop()


def _targets(fakes) -> list[str]:
    t = fakes.targets()
    return ["--localizer", t["localizer"], "--learner", t["learner"], "--evaluator", t["evaluator"]]


def _photo(path: Path, seed: int = 0, size=(80, 60)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _ice(*args: str, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=120, **kw)


# --- error paths --------------------------------------------------------------------------------------------
def test_service_down_is_one_clear_line_and_exit_3(tmp_path, refusing_port):
    port = refusing_port
    photo = _photo(tmp_path / "p.png")
    done = _ice("localize", str(photo), "--localizer", f"127.0.0.1:{port}")
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ice: cannot reach the localizer at 127.0.0.1:{port}: ")
    done = _ice("extract", str(photo), "--out", str(tmp_path / "out"), "--json", "--localizer",
                f"dns:///localhost:{port}")
    assert done.returncode == 3
    assert json.loads(done.stdout)["kind"] == "unavailable"
    assert f"cannot reach the localizer at localhost:{port}" in json.loads(done.stdout)["error"]


def test_not_an_image_and_missing_file(tmp_path, fakes, capsys):
    calls = fakes.localizer.calls
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    assert main(["extract", str(text), "--out", str(tmp_path / "o"), *_targets(fakes)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ice: {text} is not an image (PNG, JPEG or WebP)") and "\n" not in err
    Image.new("RGB", (8, 8)).save(tmp_path / "pic.gif")
    assert main(["localize", str(tmp_path / "pic.gif"), *_targets(fakes)]) == 2
    assert "is a GIF image; ICE takes PNG, JPEG or WebP" in capsys.readouterr().err
    assert main(["localize", str(tmp_path / "missing.jpg"), *_targets(fakes)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert fakes.localizer.calls == calls  # refused before any call


def test_a_file_that_is_no_image_is_described_in_words(tmp_path, fakes, capsys):
    for name, content, words in (("notes.png", b"shopping list: milk", "it is a text file"),
                                 ("empty.jpg", b"", "the file is empty"),
                                 ("doc.png", b"%PDF-1.7\n\x80\x81", "it is a PDF document"),
                                 ("noise.webp", bytes(range(256)) * 4, "its bytes are not in any image format")):
        (tmp_path / name).write_bytes(content)
        assert main(["localize", str(tmp_path / name), *_targets(fakes)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"ice: {tmp_path / name} is not an image (PNG, JPEG or WebP): {words}"
        assert "BytesIO" not in err and "0x" not in err
    truncated = (tmp_path / "cut.png")
    truncated.write_bytes(_photo(tmp_path / "whole.png").read_bytes()[:60])
    assert main(["localize", str(truncated), *_targets(fakes)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_local_refuses_a_tiny_image_before_any_model_loads(tmp_path, tiny_bundle_dir, capsys, monkeypatch):
    import sys
    import types

    import services.localizer
    from client.local import LocalError, LocalIce

    def no_models(*args, **kwargs):
        raise AssertionError("the localizer's models were loaded for an image that is refused")

    # the localizer's pipeline module, replaced by one whose models cannot load
    fake = types.ModuleType("services.localizer.pipeline")
    fake.Localizer = no_models
    monkeypatch.setitem(sys.modules, "services.localizer.pipeline", fake)
    monkeypatch.setattr(services.localizer, "pipeline", fake, raising=False)
    pixel = tmp_path / "pixel.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(pixel)
    for command in (["extract", str(pixel), "--out", str(tmp_path / "o")], ["localize", str(pixel)]):
        assert main([*command, "--local", "--bundle", str(tiny_bundle_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ice: {pixel}: size 1x1 is below the minimum of 8 px a side"), err
    with pytest.raises(LocalError, match="below the minimum"):  # the SDK's in-process back-end too
        LocalIce(tiny_bundle_dir).localize(pixel.read_bytes())


def test_a_refused_image_is_one_message_and_the_same_exit_code_from_the_service_and_local(
        tmp_path, tiny_bundle_dir, capsys):
    """The real localizer refusing a 1x1 image: its detail once, on one line, and exit 2 as the same refusal made
    in-process (--local) and as a file that is no image (each kind of failure has one exit code)."""
    from tests.reliability.harness import start_inprocess

    pixel = tmp_path / "pixel.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(pixel)
    running = start_inprocess("localizer", tiny_bundle_dir)
    try:
        for extra in ([], ["--json"]):
            code = main(["localize", str(pixel), "--localizer", f"127.0.0.1:{running.port}", *extra])
            out = capsys.readouterr()
            assert code == 2, out.err
            err = out.err.strip()
            assert "\n" not in err and err.startswith("ice: the localizer at ") and "INVALID_ARGUMENT" in err, err
            assert err.count("size 1x1 is below the minimum") == 1, err
            if extra:
                assert json.loads(out.out) == {"error": err.removeprefix("ice: "), "kind": "refused"}
    finally:
        running.stop(grace=0)
    assert main(["localize", str(pixel), "--local", "--bundle", str(tiny_bundle_dir)]) == 2
    assert capsys.readouterr().err.count("size 1x1 is below the minimum") == 1


def test_unwritable_output_folder(tmp_path, fakes, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    photo = _photo(tmp_path / "p.png")
    for command in (["extract", str(photo)], ["localize", str(photo)], ["batch", str(tmp_path)]):
        code = main([*command, "--out", str(blocker / "sub"), *_targets(fakes)])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert err == f"ice: cannot write to the output folder {blocker / 'sub'}: Not a directory"


def test_bad_service_answer_is_exit_2_with_the_field(tmp_path, fakes, capsys):
    mask = tmp_path / "m.png"
    Image.fromarray(np.ones((10, 10), np.uint8) * 255).save(mask)  # not the photo's size
    code = main(["learn", "start", str(_photo(tmp_path / "p.png")), "--concept", f"bowl={mask}", *_targets(fakes)])
    assert code == 2  # the input is refused as given: the exit code of the CLI's own refusals
    err = capsys.readouterr().err
    assert "answered INVALID_ARGUMENT" in err and "concepts[0].mask" in err


# --- commands -----------------------------------------------------------------------------------------------
def test_extract_json_and_reevaluate(tmp_path, fakes, capsys):
    photo = _photo(tmp_path / "p.png")
    out = tmp_path / "out"
    assert main(["extract", str(photo), "--out", str(out), "--json", "--no-progress", *QUICK, *_targets(fakes)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["noun"] for c in result["localization"]["concepts"]] == ["bowl", "cup"]
    assert Path(result["report"]).is_file() and result["evaluation"]["scores"][0]["encoder"] == "CLIP"
    (out / "metrics.json").unlink()
    assert main(["evaluate", str(out), "--encoder", "clip", *_targets(fakes)]) == 0
    assert "CLIP: SIM^I" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["scores"]
    sent = fakes.evaluator.requests[-1]
    assert list(sent.options.encoders) == [1] and [c.concept_id for c in sent.concepts] == ["c0", "c1"]


def test_per_image_accuracy_is_flagged_and_a_batch_is_evaluated_as_one_set(tmp_path, fakes, tiny_bundle_dir,
                                                                            capsys):
    results = tmp_path / "results"
    for k in range(2):
        photo = _photo(tmp_path / f"p{k}.png", seed=k)
        assert main(["extract", str(photo), "--out", str(results / f"p{k}"), "--no-progress", *QUICK,
                     *_targets(fakes)]) == 0
    printed = capsys.readouterr().out
    assert "note: ACC ranked among this image's 2 concept(s) only, not the paper's protocol" in printed
    assert "Per-image accuracy" in (results / "p0" / "report.html").read_text()
    # the batch's results as one set, on the real evaluator code (in-process, the tiny bundle)
    assert main(["evaluate", str(results), "--local", "--bundle", str(tiny_bundle_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["item_count"], data["concept_count"]) == (2, 4)
    assert [i[0] for i in data["items"]] == ["p0", "p1"]
    assert all(s["accuracy_scope"] == "SET" and s["concepts_in_scope"] == 4 for s in data["scores"])
    assert json.loads((results / "set_metrics.json").read_text())["item_count"] == 2


def test_localize_learn_generate_commands(tmp_path, fakes, capsys):
    photo = _photo(tmp_path / "p.png")
    assert main(["localize", str(photo), "--out", str(tmp_path / "loc"), *_targets(fakes)]) == 0
    assert "c1\tcup" in capsys.readouterr().out
    assert main(["learn", "start", str(photo), "--from", str(tmp_path / "loc"), "--json", "--quick",
                 *_targets(fakes)]) == 0
    job = json.loads(capsys.readouterr().out)["job"]
    assert main(["learn", "watch", job, *_targets(fakes)]) == 0
    watched = capsys.readouterr().out.strip().splitlines()
    assert watched[-1].startswith("SUCCEEDED") and len(watched) >= 2
    assert main(["learn", "watch", job, "--no-progress", *_targets(fakes)]) == 0  # as `extract` accepts it
    assert capsys.readouterr().out.strip().splitlines() == [watched[-1]]  # the final state only
    assert main(["learn", "status", job.removeprefix("operations/"), "--json", *_targets(fakes)]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "SUCCEEDED"
    assert main(["learn", "list", *_targets(fakes)]) == 0
    assert job in capsys.readouterr().out
    assert main(["learn", "artifacts", job, "--out", str(tmp_path / "art"), *_targets(fakes)]) == 0
    assert (tmp_path / "art" / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["generate", job, "--kind", "intrinsic", "--num-images", "1", "--out", str(tmp_path / "gen"),
                 "--json", *_targets(fakes)]) == 0
    images = json.loads(capsys.readouterr().out)
    assert [i["attribute"] for i in images] == ["texture", "material", "color", ""] * 2
    assert all(Path(i["file"]).is_file() for i in images)
    assert main(["generate", job, "--prompt", "a photo of <&0> in the snow", "--num-images", "2",
                 "--out", str(tmp_path / "gen2"), *_targets(fakes)]) == 0
    assert len(list((tmp_path / "gen2").glob("*.png"))) == 2


def test_learn_cancel(tmp_path, fakes, capsys):
    fakes.learner.step_seconds = 0.3
    try:
        photo = _photo(tmp_path / "p.png")
        mask = tmp_path / "m.png"
        Image.fromarray(np.ones((60, 80), np.uint8) * 255).save(mask)
        assert main(["learn", "start", str(photo), "--concept", f"bowl={mask}", *_targets(fakes)]) == 0
        job = capsys.readouterr().out.strip()
        assert main(["learn", "cancel", job, *_targets(fakes)]) == 0
        assert main(["learn", "watch", job, *_targets(fakes)]) == 1
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("CANCELLED")
        assert main(["learn", "status", job, *_targets(fakes)]) == 1
    finally:
        fakes.learner.step_seconds = 0.05


# --- batch --------------------------------------------------------------------------------------------------
def _mtimes(out: Path, ids) -> dict[str, tuple[float, float]]:
    return {i: ((out / i / ".done").stat().st_mtime_ns, (out / i / "report.html").stat().st_mtime_ns) for i in ids}


def test_batch_interrupted_then_resumed_redoes_nothing_and_loses_nothing(tmp_path, fakes):
    photos = tmp_path / "photos"
    photos.mkdir()
    good = [f"img{i}" for i in range(5)]
    for i, name in enumerate(good):
        _photo(photos / f"{name}.png", seed=i)
    (photos / "z_bad.png").write_text("not an image")  # the localizer refuses it: a failed item, not a crash
    out = tmp_path / "out"
    # 5 steps of 1 s per item: the 3 items left after the second one finishes take 15 s, ample time for the
    # signal even on a loaded machine (at 0.25 s a starved test process saw the batch end first)
    fakes.learner.step_seconds = 1.0
    try:
        args = [sys.executable, "-m", "client", "batch", str(photos), "--out", str(out), "--concurrency", "1",
                *QUICK, *_targets(fakes)]
        batch = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=interruptible,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while len(list(out.glob("*/.done"))) < 2:
            assert batch.poll() is None, batch.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        batch.send_signal(signal.SIGINT)  # Ctrl-C
        stdout, stderr = batch.communicate(timeout=60)
    finally:
        fakes.learner.step_seconds = 0.05
    assert batch.returncode == 130, stderr
    summary = json.loads((out / "batch-summary.json").read_text())
    first = sorted(p.parent.name for p in out.glob("*/.done"))
    assert summary["interrupted"] and sorted(summary["done_now"]) == first
    assert 2 <= len(first) < 5 and summary["pending"]
    assert set(first) | set(summary["pending"]) == set(good + ["z_bad"])  # every item accounted for
    before = _mtimes(out, first)

    done = _ice("batch", str(photos), "--out", str(out), "--concurrency", "2", "--json", *QUICK, *_targets(fakes))
    assert done.returncode == 1, done.stderr  # the bad item still fails
    summary = json.loads(done.stdout)
    assert summary["skipped"] == first  # nothing redone ...
    assert _mtimes(out, first) == before
    assert sorted(summary["skipped"] + summary["done_now"]) == good  # ... nothing lost
    assert [f["id"] for f in summary["failed"]] == ["z_bad"]
    assert "INVALID_ARGUMENT" in summary["failed"][0]["error"] and not summary["pending"]
    assert all((out / g / ".done").is_file() and (out / g / "report.html").is_file() for g in good)
    index = (out / "index.html").read_text()
    assert all(f'href="{g}/report.html"' in index for g in good) and "z_bad" in index


def test_batch_shards_split_a_manifest(tmp_path, fakes, capsys):
    lines = ["# a manifest: paths relative to it"]
    for i in range(3):
        _photo(tmp_path / f"m{i}.png", seed=10 + i, size=(32, 24))
        lines.append(f"m{i}.png")
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    for index in (0, 1):
        assert main(["batch", str(manifest), "--out", str(out), "--shard-index", str(index), "--shard-count", "2",
                     "--json", "--no-composition", *QUICK, *_targets(fakes)]) == 0
    capsys.readouterr()
    s0 = json.loads((out / "batch-summary-shard-0.json").read_text())
    s1 = json.loads((out / "batch-summary-shard-1.json").read_text())
    assert s0["done_now"] == ["m0", "m2"] and s1["done_now"] == ["m1"]
    assert sorted(p.parent.name for p in out.glob("*/.done")) == ["m0", "m1", "m2"]
