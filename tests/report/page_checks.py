"""Read a report page back with ``html.parser`` and check it against the JSON the command wrote, and screenshot it.

    from tests.report.page_checks import check_eval_page, screenshot
    page = check_eval_page(report_dir, expected_ids=[...])     # asserts; returns the parsed page
    screenshot(report_dir / "index.html", tmp_path / "shot.png")  # skips (with a message) without chromium

The checks are written from the page's markup, not from the writer's code: every sample row is there with every
image and every sampled video frame (``data-frame``: the frame indices the JSON lists), every image the page
references exists and decodes, the accuracy shown equals the JSON's, and each answer is marked right or wrong exactly
as the JSON marks it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image


@dataclass
class ParsedPage:
    images: list[str] = field(default_factory=list)  # every <img src>
    external: list[str] = field(default_factory=list)  # any src/href that leaves the folder (http, //, /abs)
    rows: list[dict] = field(default_factory=list)  # <tr class="sample">: attributes + images + answer cells
    accuracy: list[dict] = field(default_factory=list)  # <td data-run data-type data-correct data-total> + text
    bins: list[dict] = field(default_factory=list)  # <rect class="bin" data-lo data-hi data-count> per histogram
    histograms: dict[str, int] = field(default_factory=dict)  # data-histogram title -> data-n
    sections: dict[str, dict] = field(default_factory=dict)  # <section data-kind>: attributes + images + <li> rows
    sources: list[dict] = field(default_factory=list)  # <tr class="source">: attributes + {data-col: cell text}
    bars: dict[str, dict[str, int]] = field(default_factory=dict)  # data-bars title -> {data-label: data-count}
    text: list[str] = field(default_factory=list)


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.page = ParsedPage()
        self.row: dict | None = None
        self.cell: dict | None = None
        self.histogram: str | None = None
        self.section: dict | None = None
        self.source: dict | None = None  # a mixture entry's row, and the column of the cell being read
        self.column: str | None = None
        self.bars: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a and re.match(r"^(https?:|//|/)", a[key] or ""):
                self.page.external.append(a[key])
        if tag == "link" or (tag == "script" and "src" in a):
            self.page.external.append(a.get("href") or a.get("src"))
        if tag == "img":
            self.page.images.append(a["src"])
            if self.row is not None:
                self.row["images"].append(a["src"])
                if "data-frame" in a:
                    self.row["frames"].append(int(a["data-frame"]))
            if self.section is not None:
                self.section["images"].append(a["src"])
        if tag == "span" and "noimg" in (a.get("class") or "") and self.section is not None:
            self.section["noimg"].append(a.get("data-image"))
        if tag == "tr" and a.get("class") == "source":
            self.source = {**a, "cells": {}}
        if tag == "td" and self.source is not None and "data-col" in a:
            self.column = a["data-col"]
            self.source["cells"][self.column] = ""
        if tag == "div" and "data-bars" in a:
            self.bars = a["data-bars"]
            self.page.bars[self.bars] = {}
        if tag == "rect" and "data-label" in a and self.bars is not None:
            self.page.bars[self.bars][a["data-label"]] = int(a["data-count"])
        if tag == "li" and self.section is not None and "data-rid" in a:
            self.section["rows"].append(a)
        if tag == "tr" and a.get("class") == "sample":
            self.row = {**a, "images": [], "frames": [], "answers": []}
        if tag == "td" and "data-correct" in a:
            self.cell = {**a, "text": ""}
        if tag == "div" and "data-histogram" in a:
            self.histogram = a["data-histogram"]
            self.page.histograms[self.histogram] = int(a["data-n"])
        if tag == "rect" and a.get("class") == "bin":
            self.page.bins.append({**a, "histogram": self.histogram})
        if tag == "section" and "data-kind" in a:
            self.section = {**a, "images": [], "noimg": [], "text": "", "rows": []}
            self.page.sections[a["data-kind"]] = self.section

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            if self.row is not None:
                self.row["answers"].append(self.cell)
            else:
                self.page.accuracy.append(self.cell)
            self.cell = None
        if tag == "tr" and self.row is not None:
            self.page.rows.append(self.row)
            self.row = None
        if tag == "section":
            self.section = None
        if tag == "td":
            self.column = None
        if tag == "tr" and self.source is not None:
            self.page.sources.append(self.source)
            self.source = None

    def handle_data(self, data):
        self.page.text.append(data)
        if self.cell is not None:
            self.cell["text"] += data
        if self.section is not None:
            self.section["text"] += data
        if self.column is not None:
            self.source["cells"][self.column] += data


def parse_page(path: Path) -> ParsedPage:
    parser = _PageParser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    parser.close()
    return parser.page


def check_images(page: ParsedPage, folder: Path) -> None:
    """Every referenced image is a file under ``folder`` that PIL decodes; nothing is fetched from elsewhere."""
    assert page.external == [], page.external
    for src in page.images:
        path = (folder / src).resolve()
        assert path.is_relative_to(folder.resolve()) and path.is_file(), src
        with Image.open(path) as image:
            image.load()
            assert image.width > 0 and image.height > 0


def check_eval_page(report_dir: Path, *, accuracy_json: dict | None = None,
                    expected_ids: list[str] | None = None) -> ParsedPage:
    """The eval page against ``eval_results.json`` (and, if given, the accuracies the command printed as JSON)."""
    report_dir = Path(report_dir)
    page = parse_page(report_dir / "index.html")
    saved = json.loads((report_dir / "eval_results.json").read_text())
    runs = list(saved["predictions"])
    first = saved["predictions"][runs[0]]
    # every sample row, in order, with its type and every image of the sample
    assert [r["data-id"] for r in page.rows] == [p["id"] for p in first]
    if expected_ids is not None:
        assert [r["data-id"] for r in page.rows] == list(expected_ids)
    for row, p in zip(page.rows, first):
        assert row["data-type"] == p["type"]
        assert len(row["images"]) == len(p["images"]) + len(p.get("frames", [])), (row["data-id"], row["images"], p)
        assert row["frames"] == p.get("frames", []), (row["data-id"], row["frames"], p.get("frames"))
    check_images(page, report_dir)
    # right / wrong as the JSON marks it, per run, in the cell and in the row's filter attribute
    for j, run in enumerate(runs):
        for row, p in zip(page.rows, saved["predictions"][run]):
            cell = row["answers"][j]
            assert cell["data-run"] == run and cell["data-correct"] == str(int(p["correct"])), (run, p["id"])
            assert ("✓" if p["correct"] else "✗") in cell["text"] and p["answer"].strip() in cell["text"]
            assert row[f"data-wrong-{j}"] == str(int(not p["correct"]))
    # the accuracy shown: its counts give the JSON's accuracy, and its text is that number in percent
    expected = accuracy_json if accuracy_json is not None else saved["accuracy"]
    assert expected == saved["accuracy"]
    shown = {(c["data-run"], c["data-type"]): c for c in page.accuracy}
    assert set(shown) == {(run, kind) for run in runs for kind in expected[run]}
    for (run, kind), cell in shown.items():
        correct, total = int(cell["data-correct"]), int(cell["data-total"])
        assert correct / total == pytest.approx(expected[run][kind], abs=1e-12), (run, kind)
        assert cell["text"].split()[0] == f"{expected[run][kind]:.1%}" and f"({correct}/{total})" in cell["text"]
    return page


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(page: Path, png: Path, size: str = "1280,1600") -> Path:
    """A headless Chromium screenshot of ``page``; skips the test (saying why) where Chromium is not installed."""
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed: the page was not rendered (apt-get install chromium to render it)")
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", f"--window-size={size}", Path(page).resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(png) as image:
        image.load()
        assert image.size == tuple(int(x) for x in size.split(","))
        colours = image.convert("L").getextrema()
        assert colours[1] - colours[0] > 100, "the screenshot is blank"
    return png


def rendered_dom(page: Path, fragment: str = "") -> str:
    """The page's DOM after its script ran in headless Chromium (``fragment``: e.g. ``show=0``); skips without it."""
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed: the page's filters were not run in a browser")
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    done = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
                          check=True, capture_output=True, text=True, timeout=120)
    return done.stdout


def visible_rows(dom: str) -> list[str]:
    """``data-id`` of the sample rows the page's script left visible."""
    rows = re.findall(r'<tr class="sample"([^>]*)>', dom)
    return [re.search(r'data-id="([^"]*)"', r).group(1) for r in rows if "display: none" not in r]


def eval_report_via_cli(model_dir: Path, data: Path, image_folder: Path, out: Path, capsys, *, extra=()) -> ParsedPage:
    """``llava eval ... --blank_images --json --report OUT`` on a checkpoint, then :func:`check_eval_page` against the
    JSON line it printed and the record ids read from ``data`` (``extra``: more flags, e.g. ``--video_folder``)."""
    from llava.cli import main

    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--image_folder", str(image_folder),
                 "--batch_size", "8", "--blank_images", "--json", "--report", str(out), *extra]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"evaluation page: {out / 'index.html'}"
    accuracy = json.loads(printed[-2])
    records = json.loads(Path(data).read_text())
    page = check_eval_page(out, accuracy_json=accuracy, expected_ids=[str(r["id"]) for r in records])
    for row, record in zip(page.rows, records):
        n_images = len(record.get("images") or ([record["image"]] if record.get("image") else []))
        assert len(row["images"]) - len(row["frames"]) == n_images
        assert bool(row["frames"]) == bool(record.get("video")), record["id"]  # a video record shows its frames
    return page
