"""The extraction report: every file it links exists, it is self-contained, and headless Chromium renders it
with every image decoded (checked through the page's own `data-loaded` marks, with a broken-image control)."""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.options import ExtractOptions, GenerateOptions, Schedule
from client.report import grid, overlay, write_index


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])


def links(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text())
    return parser


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, photo_png):
    from test_client import FakeIce

    out = tmp_path_factory.mktemp("report")
    fakes = FakeIce()
    try:
        options = ExtractOptions(schedule=Schedule.quick(), generate=GenerateOptions(num_images=2, seed=1))
        with fakes.client() as ice:
            ice.extract(photo_png, out_dir=out, progress=False, options=options)
    finally:
        fakes.stop()
    return out


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed: apt-get install -y chromium")


def _run_chromium(page: Path, tmp_path: Path, *extra: str) -> str:
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000", *extra, page.resolve().as_uri()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _body_counts(dom: str) -> tuple[int, int]:
    start = dom.index("<body")
    tag = dom[start: dom.index(">", start)]

    def attr(name):
        key = f'{name}="'
        i = tag.index(key) + len(key)
        return int(tag[i: tag.index('"', i)])

    return attr("data-images-loaded"), attr("data-images-broken")


def test_report_links_only_files_that_exist(report_dir):
    page = report_dir / "report.html"
    found = links(page)
    assert len(found.images) >= 2 + 2 * 6 + 1  # source, overlay; per concept: region + 5 grids; composition
    for ref in found.images + found.links:
        assert "://" not in ref and not ref.startswith(("/", "//")), ref  # relative, no external assets
        assert (report_dir / ref).is_file(), ref
    text = page.read_text()
    assert "bowl" in text and "cup" in text and "SIM<sup>I</sup>" in text
    record = json.loads((report_dir / "extraction.json").read_text())
    for g in record["generated"]:
        assert (report_dir / g["file"]).is_file()
    grid_png = Image.open(report_dir / record["files"]["grids"]["c0_object"])
    assert grid_png.size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # two 64 px images with 2 px padding


def test_report_renders_in_headless_chromium_with_every_image(report_dir, tmp_path):
    page = report_dir / "report.html"
    n_images = len(links(page).images)
    dom = _run_chromium(page, tmp_path, "--dump-dom")
    assert _body_counts(dom) == (n_images, 0)
    assert dom.count('data-loaded="1"') == n_images

    shot = tmp_path / "report.png"
    _run_chromium(page, tmp_path, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2000, 1280, 3)
    # the photo is drawn: the coffee's red-brown dominates somewhere in the top part of the page
    top = pixels[40:400, :700].reshape(-1, 3).astype(int)
    assert ((top[:, 0] > 100) & (top[:, 0] > top[:, 2] + 40)).mean() > 0.2

    # control: the same page with one picture missing is reported broken, so the check above can fail
    broken = tmp_path / "broken"
    shutil.copytree(report_dir, broken)
    (broken / "overlay.png").unlink()
    dom = _run_chromium(broken / "report.html", tmp_path, "--dump-dom")
    assert _body_counts(dom) == (n_images - 1, 1)
    assert dom.count('data-loaded="0"') == 1


def test_overlay_tints_only_the_mask_and_labels_it():
    image = Image.new("RGB", (120, 80), (200, 200, 200))
    mask = np.zeros((80, 120), bool)
    mask[10:70, 10:60] = True
    out = np.asarray(overlay(image, [mask], ["bowl"]))
    assert (out[~mask] == 200).all()  # untouched outside
    assert (out[mask] != 200).any(axis=-1).all()  # tinted inside
    # the label's dark text is written near the mask's centre (x 35, y 40), not elsewhere
    dark = out.sum(axis=-1) < 150
    ys, xs = np.nonzero(dark)
    assert len(xs) > 0 and abs(xs.mean() - 35) < 10 and abs(ys.mean() - 40) < 10


def test_grid_layout():
    tiles = [Image.new("RGB", (10, 10), (i * 40, 0, 0)) for i in range(6)]
    sheet = grid(tiles, columns=4, pad=1)
    assert sheet.size == (4 * 10 + 5, 2 * 10 + 3)
    assert sheet.getpixel((1 + 11 + 5, 1 + 11 + 5)) == (200, 0, 0)  # the 6th tile: row 1, column 1
    assert sheet.getpixel((1 + 2 * 11 + 5, 1 + 11 + 5)) == (255, 255, 255)  # no 7th tile


def test_batch_index_links_items_and_lists_failures(report_dir, tmp_path):
    shutil.copytree(report_dir, tmp_path / "a")
    page = write_index(tmp_path, [
        {"id": "a", "status": "done", "dir": "a", "nouns": ["bowl", "cup"], "sim_i": 0.5},
        {"id": "b", "status": "failed", "error": "the localizer at x answered INVALID_ARGUMENT: image: <bad>"},
    ])
    found = links(page)
    assert found.links == ["a/report.html"] and found.images == ["a/overlay.png"]
    assert all((tmp_path / ref).is_file() for ref in found.links + found.images)
    assert "image: &lt;bad&gt;" in page.read_text()  # escaped
