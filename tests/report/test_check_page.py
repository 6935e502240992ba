"""``llava data check --report DIR`` on the corpus with one record per problem kind: the page against ``--json``.

    .venv/bin/pytest tests/report/test_check_page.py
"""

from __future__ import annotations

import json
import re

from llava.cli import main
from tests.report.page_checks import check_images, parse_page, screenshot


def test_check_page_matches_the_json_report(tiny_models, bad_corpus, tmp_path, capsys):
    out = tmp_path / "data_report"
    code = main(["data", "check", "--data_path", str(bad_corpus["data_path"]), "--image_folder",
                 str(bad_corpus["image_folder"]), "--model_name_or_path", str(tiny_models["llm"]), "--vision_tower",
                 str(tiny_models["vision_tower"]), "--version", "vicuna_v1", "--model_max_length", "64", "--json",
                 "--report", str(out)])
    printed = capsys.readouterr().out
    assert code == 1  # the exit code of the check itself
    report = json.loads(printed[: printed.rindex("}") + 1])
    assert printed.rstrip().endswith(f"data check page: {out / 'index.html'}")
    assert json.loads((out / "check_results.json").read_text()) == report
    page = parse_page(out / "index.html")
    check_images(page, out)
    assert '<p class="bad" id="verdict" data-ok="0">' in (out / "index.html").read_text()
    # every problem kind, with the JSON's count, severity and record ids, and its advice
    assert set(page.sections) == set(report["problems"]) == set(bad_corpus["expected"])
    for kind, info in report["problems"].items():
        section = page.sections[kind]
        assert int(section["data-count"]) == info["count"] and section["data-severity"] == info["severity"], kind
        assert all(rid in section["text"] for rid in info["record_ids"]), kind
        if info["advice"]:
            assert info["advice"] in section["text"]
    # the offending images: shown where they decode, named with the reason where they cannot be
    assert len(page.sections["image_converted"]["images"]) == 2  # gray.png, anim.gif
    assert len(page.sections["image_animated"]["images"]) == 1
    assert page.sections["image_missing"]["noimg"] == ["nope.jpg"] and not page.sections["image_missing"]["images"]
    assert page.sections["image_too_large"]["noimg"] == ["bomb.png"]  # never decoded: the bomb guard refuses it
    assert page.sections["image_truncated"]["noimg"] == ["truncated.png"]
    assert len(page.sections["image_tokens_exceed_max_length"]["images"]) == 5  # the 5-image record, each image
    # histograms: every value counted once, over the JSON's min..max
    stats = report["stats"]
    for title, key in (("token length", "token_length"), ("image width (pixels)", "image_width")):
        bins = [b for b in page.bins if b["histogram"] == title]
        assert sum(int(b["data-count"]) for b in bins) == page.histograms[title] > 0
        assert float(bins[0]["data-lo"]) == stats[key]["min"] and float(bins[-1]["data-hi"]) == stats[key]["max"]
    # known counts of this corpus: 20 records tokenized + 2 measured, then dropped (toomany, nosupervised); images
    # decoded: 8 good + gray + anim + 2 dup + 5 of toomany + nosupervised's + long_ok's = 19
    assert page.histograms["token length"] == 22
    assert stats["modality"]["image"] + stats["modality"]["text_only"] + stats["dropped"] == 22
    n_images = page.histograms["image width (pixels)"]
    assert n_images == 19
    assert page.histograms["image height (pixels)"] == n_images == page.histograms["image tokens per image"]
    tokens = [b for b in page.bins if b["histogram"] == "image tokens per image" and int(b["data-count"])]
    assert len(tokens) == 1 and float(tokens[0]["data-lo"]) <= 16 <= float(tokens[0]["data-hi"])  # fixed: 16 each
    html = (out / "index.html").read_text()
    mix = dict(re.findall(r'data-label="([^"]+)" data-count="(\d+)"', html))
    assert mix["image"] == str(stats["modality"]["image"]) and mix["text only"] == str(stats["modality"]["text_only"])
    screenshot(out / "index.html", tmp_path / "check_page.png", size="1280,2400")


def test_report_flag_errors_name_the_flag(tiny_models, bad_corpus, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code = main(["data", "check", "--data_path", str(bad_corpus["data_path"]), "--model_name_or_path",
                 str(tiny_models["llm"]), "--report", str(a_file)])
    assert code == 2 and "--report" in capsys.readouterr().err
