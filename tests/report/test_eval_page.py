"""The evaluation page (``llava eval --report``) from known answers: rows, images, marks, accuracy, filters, speed.

A stub predictor with known answers drives the real ``evaluate``. The pages of real checkpoints are checked where
their fixtures train them: Llava in tests/serve/test_predict_eval.py, LlavaNext and a merged OneVision LoRA run in
tests/train/test_anyres_train.py, the demo's page in tests/demo/test_demo_run.py.

    .venv/bin/pytest tests/report/test_eval_page.py
"""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from llava.report.eval_page import write_eval_report
from llava.serve.eval import evaluate
from tests.report.page_checks import check_eval_page, parse_page, rendered_dom, screenshot, visible_rows


class KnownAnswers:
    """Answers record i with its gold (upper-cased) when i % 3 == 0, else "nonsense"; counts the images it got."""

    def __init__(self, golds: list[str]):
        self.golds, self.done, self.images = golds, 0, []

    def generate(self, conversations, images, max_new_tokens=16):
        start, self.done = self.done, self.done + len(conversations)
        self.images += [len(ims) for ims in images]
        return [self.golds[i].upper() if i % 3 == 0 else "nonsense" for i in range(start, self.done)]


def _qa(rid, question, answer, kind, images=None):
    rec = {"id": rid, "question_type": kind, "conversations": [{"from": "human", "value": question},
                                                               {"from": "gpt", "value": answer}]}
    if images:
        rec["images" if len(images) > 1 else "image"] = images if len(images) > 1 else images[0]
    return rec


@pytest.fixture
def mixed_records(tmp_path):
    """Single-image, two-image, three-image and text-only records, with HTML-like text that must be escaped."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 200, 20)]):
        Image.new("RGB", (48 + 200 * (i == 3), 40 + 150 * (i == 3)), colour).save(folder / f"c{i}.png")
    records = [_qa("one", "<image>\nWhat colour?", "red", "colour", ["c0.png"]),
               _qa("two", "<image>\n<image>\nSame colour?", "no", "compare", ["c0.png", "c1.png"]),
               _qa("three", "<image><image><image>\nHow many blue?", "1", "count", ["c1.png", "c2.png", "c3.png"]),
               _qa("text", "Say <b>hi</b> & bye", "<b>hi</b>", "text"),
               _qa("big", "<image>\nWhat colour?", "yellow", "colour", ["c3.png"]),
               _qa("blue", "<image>\nWhat colour?", "blue", "colour", ["c2.png"])]
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps(records))
    return {"data": path, "image_folder": folder, "records": records}


def test_page_shows_every_sample_image_and_mark(mixed_records, tmp_path):
    golds = [r["conversations"][-1]["value"] for r in mixed_records["records"]]
    results = {}
    for name, blank in (("real images", False), ("blank images", True)):
        stub = KnownAnswers(golds)
        results[name] = evaluate(stub, str(mixed_records["data"]), str(mixed_records["image_folder"]), batch_size=4,
                                 blank_images=blank, show_progress=False)
        assert stub.images == [1, 2, 3, 0, 1, 1]
    out = tmp_path / "report"
    page_path = write_eval_report(out, results, image_folder=str(mixed_records["image_folder"]), model="ckpt",
                                  data=mixed_records["data"])
    page = check_eval_page(out, expected_ids=["one", "two", "three", "text", "big", "blue"])
    # known marks: records 0 and 3 answered with their (upper-cased) gold, the rest wrong
    assert [r["data-wrong-0"] for r in page.rows] == ["0", "1", "1", "0", "1", "1"]
    counts = {c["data-type"]: (c["data-correct"], c["data-total"])
              for c in page.accuracy if c["data-run"] == "real images"}
    assert counts == {"colour": ("1", "3"), "compare": ("0", "1"), "count": ("0", "1"), "text": ("1", "1"),
                      "overall": ("2", "6")}
    # the same image used by several samples is written once; the big one is shrunk, the small ones kept exact
    assert len(set(page.images)) == 4 and len(page.images) == 8
    thumbs = {src: Image.open(out / src) for src in set(page.images)}
    assert sorted(max(im.size) for im in thumbs.values()) == [48, 48, 48, 192]
    # text is escaped, never markup
    raw = page_path.read_text()
    assert "Say &lt;b&gt;hi&lt;/b&gt; &amp; bye" in raw and "<b>hi</b>" not in raw
    # the filters: one option per question type and one "wrong with ..." per run
    assert 'option value="compare"' in raw and ">wrong with blank images<" in raw
    screenshot(page_path, tmp_path / "eval_page.png")
    # the filters, run by a real browser: wrong answers of a run, a question type, both
    assert visible_rows(rendered_dom(page_path)) == ["one", "two", "three", "text", "big", "blue"]
    assert visible_rows(rendered_dom(page_path, "show=0")) == ["two", "three", "big", "blue"]
    assert visible_rows(rendered_dom(page_path, "type=colour")) == ["one", "big", "blue"]
    assert visible_rows(rendered_dom(page_path, "type=colour&show=1")) == ["big", "blue"]


def test_thousand_samples_take_seconds(tmp_path):
    """The issue's bar: writing the page of 1,000 samples (1,000 distinct 320x240 JPEGs) takes seconds."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    records = []
    for i in range(1000):
        Image.radial_gradient("L").resize((320, 240)).convert("RGB").save(folder / f"{i}.jpg", quality=90)
        records.append(_qa(f"r{i}", "<image>\nWhat is it?", "a gradient", ["colour", "shape"][i % 2], [f"{i}.jpg"]))
    data = tmp_path / "heldout.json"
    data.write_text(json.dumps(records))
    result = evaluate(KnownAnswers(["a gradient"] * 1000), str(data), str(folder), show_progress=False)
    start = time.perf_counter()
    write_eval_report(tmp_path / "report", {"real images": result}, image_folder=str(folder))
    seconds = time.perf_counter() - start
    print(f"eval page of 1000 samples: {seconds:.2f} s")
    page = parse_page(tmp_path / "report" / "index.html")
    assert len(page.rows) == 1000 and len(set(page.images)) == 1000
    assert seconds < 60, seconds


def test_report_flag_error_comes_before_the_model_loads(tmp_path, capsys):
    from llava.cli import main

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", str(a_file), "--report", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llava eval: error: --report") and "is a file" in err and len(err.strip().splitlines()) == 1
