"""The report of a scene whose truth is known shows the ground truth beside the extraction (ToyWorld demo)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from test_report import _body_counts, _run_chromium, links

from client.options import ExtractOptions, GenerateOptions, Schedule
from client.report import attach_ground_truth
from toyworld.world import BACKGROUNDS, held_out_scene


@pytest.fixture(scope="module")
def truth_report(tmp_path_factory):
    from test_client import FakeIce

    scene = held_out_scene(3)
    buf = io.BytesIO()
    scene.image.save(buf, format="PNG")
    out = tmp_path_factory.mktemp("truth")
    fakes = FakeIce()
    try:
        options = ExtractOptions(schedule=Schedule.quick(), generate=GenerateOptions(num_images=2, seed=1))
        with fakes.client() as ice:
            ice.extract(buf.getvalue(), out_dir=out, progress=False, options=options)
    finally:
        fakes.stop()
    attach_ground_truth(out, [(o.phrase(), o.mask) for o in scene.objects], "ToyWorld test scene 3")
    return out, scene


def test_ground_truth_is_recorded_and_linked(truth_report):
    out, scene = truth_report
    record = json.loads((out / "extraction.json").read_text())
    truth = record["ground_truth"]
    assert [t["name"] for t in truth["objects"]] == [o.phrase() for o in scene.objects]
    for t, o in zip(truth["objects"], scene.objects, strict=True):
        assert np.array_equal(np.asarray(Image.open(out / t["mask"])) > 127, o.mask)
        assert 0.0 <= t["iou"] <= 1.0
    page = (out / "report.html").read_text()
    assert "Against the ground truth" in page and "ToyWorld test scene 3" in page
    for ref in links(out / "report.html").images:
        assert (out / ref).is_file(), ref


def test_chromium_shows_the_ground_truth_beside_the_result(truth_report, tmp_path):
    out, scene = truth_report
    page = out / "report.html"
    dom = _run_chromium(page, tmp_path, "--dump-dom")
    assert _body_counts(dom) == (len(links(page).images), 0)
    first_row = dom[dom.index('<div class="row">'): dom.index("</div>", dom.index('<div class="row">'))]
    assert first_row.count("<figure") == 3 and "truth/overlay.png" in first_row  # source, result, truth

    def scene_copies(report_page) -> int:
        """How many times the scene's background shows side by side in the top band of a screenshot."""
        shot = tmp_path / "shot.png"
        _run_chromium(report_page, tmp_path, f"--screenshot={shot}")
        pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)[40:320, :1000]
        near = (np.abs(pixels - np.array(BACKGROUNDS[scene.background])).sum(-1) < 30).mean(axis=0) > 0.25
        return len(np.flatnonzero(np.diff(np.concatenate([[0], near.astype(int), [0]])) == 1))

    with_truth = scene_copies(page)
    # control: the same page without the ground truth draws one copy fewer in that band
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    record = json.loads((plain / "extraction.json").read_text())
    del record["ground_truth"]
    from client.report import render_report

    (plain / "report.html").write_text(render_report(record, json.loads((plain / "metrics.json").read_text())))
    assert with_truth == scene_copies(plain / "report.html") + 1 >= 2
