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


def _mixture_corpus(root):
    """Two sources: ``a.jsonl`` (images from --image_folder, text-only records, a missing and a gray image; 10 rows,
    ``first:9`` takes 9) and ``b.json`` (its own image_folder and video_folder: two clips, a two-image record, a
    text-only record, a gray image, a missing video and an empty answer)."""
    import yaml
    from PIL import Image

    from tests.data.video_clips import moving_dot_frames, write_clip

    def rec(rid, question="What is it?", answer="A shape.", **media):
        return {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                **media}

    for folder, prefix, sizes in (("images", "a", (40, 48, 56, 64)), ("images_b", "b", (36, 72))):
        (root / folder).mkdir()  # names found in one folder only: an image read from the wrong folder is missing
        for i, w in enumerate(sizes):
            Image.new("RGB", (w, 32), (30 * i, 120, 200)).save(root / folder / f"{prefix}{i}.png")
        Image.new("L", (24, 24), 128).save(root / folder / f"gray_{prefix}.png")
    for i in range(2):
        write_clip(root / "videos" / f"clip{i}.mp4", moving_dot_frames(8, 1 if i else -1), fps=4)
    a = [rec(f"a{i}", "<image>\nWhat is it?", image=f"a{i}.png") for i in range(4)]
    a += [rec("a_text0"), rec("a_text1"), rec("a_missing", "<image>\nWhat?", image="nope.png"),
          rec("a_gray", "<image>\nWhat?", image="gray_a.png"), rec("a_text2"), rec("a_not_taken")]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    b = [rec(f"b_clip{i}", "<image>\nWhich way?", "left", video=f"clip{i}.mp4") for i in range(2)]
    b += [rec("b_pair", "<image>\n<image>\nSame?", "No.", images=["b0.png", "b1.png"]), rec("b_text"),
          rec("b_gray", "<image>\nWhat?", image="gray_b.png"), rec("b_novideo", "<image>\nWhich way?", video="nope.mp4"),
          rec("b_empty", "hi", "  ")]
    (root / "b.json").write_text(json.dumps(b))
    mix = root / "mix.yaml"
    mix.write_text(yaml.safe_dump({"datasets": [
        {"json_path": "a.jsonl", "sampling_strategy": "first:9"},
        {"json_path": "b.json", "image_folder": str(root / "images_b"), "video_folder": str(root / "videos")}]}))
    return mix


def test_mixture_page_has_each_source_as_the_json_report_has_it(tiny_models, tmp_path, capsys):
    """A mixture YAML: the per-entry table equals the ``--json`` report's entries (and the known counts of the
    corpus), the whole-mixture chart and histograms are the entries' together, each problem row names its entry, and
    each entry's images come from its own image folder."""
    mix = _mixture_corpus(tmp_path)
    out = tmp_path / "mix_report"
    # video on (b.json's own video_folder): OneVision's flags, one frame per second (two 2 s clips: 2 frames each)
    code = main(["data", "check", "--data_path", str(mix), "--image_folder", str(tmp_path / "images"),
                 "--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
                 "--version", "vicuna_v1", "--model_max_length", "512", "--image_aspect_ratio", "anyres_max_2",
                 "--mm_patch_merge_type", "spatial_unpad", "--mm_newline_position", "one_token", "--video_fps", "1",
                 "--json", "--report", str(out)])
    printed = capsys.readouterr().out
    assert code == 1  # a_missing, b_novideo and b_empty stop training
    report = json.loads(printed[: printed.rindex("}") + 1])
    assert printed.rstrip().endswith(f"data check page: {out / 'index.html'}")
    assert json.loads((out / "check_results.json").read_text()) == report
    page = parse_page(out / "index.html")
    check_images(page, out)
    sources = report["sources"]
    # the corpus's known numbers, in the JSON: rows available / taken, trainable, modality
    got = [(s["stats"]["available"], s["stats"]["records"], s["stats"]["trainable"], s["stats"]["modality"])
           for s in sources]
    assert got == [(10, 9, 8, {"image": 5, "video": 0, "text_only": 3}),  # a_missing: checked, not trainable
                   (7, 7, 5, {"image": 2, "video": 2, "text_only": 1})]  # b_novideo and b_empty never tokenized
    # the page's table: one row per entry with the JSON's numbers
    assert [row["data-entry"] for row in page.sources] == [str(s["entry"]) for s in sources]
    for row, src in zip(page.sources, sources):
        cells, stats = row["cells"], src["stats"]
        assert cells["file"] == src["json_path"] and cells["sampling"] == src["sampling"]
        for col in ("available", "records", "trainable", "tokens"):
            assert int(cells[col]) == stats[col], (src["entry"], col)
        for kind, n in stats["modality"].items():
            assert int(cells[f"modality.{kind}"]) == n, (src["entry"], kind)
        assert int(cells["problems"]) == sum(p["count"] for p in src["problems"].values())
        assert cells["token_length"] == f"{stats['token_length']['p50']} / {stats['token_length']['max']}"
        assert row["data-ok"] == str(int(src["ok"]))
    assert [row["data-ok"] for row in page.sources] == ["0", "0"]  # each entry has an error
    # the whole mixture: the modality chart has every category the JSON counts, summed over the entries
    modality = {}
    for src in sources:
        for kind, n in src["stats"]["modality"].items():
            modality[kind.replace("_", " ")] = modality.get(kind.replace("_", " "), 0) + n
    assert page.bars["modality mix"] == modality == {"image": 7, "video": 2, "text only": 4}
    html = (out / "index.html").read_text()
    total = re.search(r'<tr class="source-total">(.*?)</tr>', html).group(1)
    for col in ("available", "records", "trainable", "tokens"):
        value = re.search(rf'data-col="{col}">(\d+)<', total).group(1)
        assert int(value) == sum(s["stats"][col] for s in sources), col
    # histograms over both entries' values: the extremes are the entries' extremes
    for title, key in (("token length", "token_length"), ("image width (pixels)", "image_width")):
        bins = [b for b in page.bins if b["histogram"] == title]
        assert float(bins[0]["data-lo"]) == min(s["stats"][key]["min"] for s in sources)
        assert float(bins[-1]["data-hi"]) == max(s["stats"][key]["max"] for s in sources)
    # images decoded: a's 4 good + gray, b's pair + gray (the missing image none), 24 (gray) to 72 (b1.png) wide
    widths = [b for b in page.bins if b["histogram"] == "image width (pixels)"]
    assert page.histograms["image width (pixels)"] == 8 == sum(int(b["data-count"]) for b in widths)
    assert float(widths[0]["data-lo"]) == 24 and float(widths[-1]["data-hi"]) == 72
    # problems: the entries' kinds, counts summed, each row naming the entry whose JSON lists the record
    kinds = {k for s in sources for k in s["problems"]}
    assert set(page.sections) == kinds == {"image_missing", "image_converted", "video_missing", "empty_text"}
    for kind in kinds:
        listed = [(f"entry {s['entry']} ({s['json_path']})", rid) for s in sources
                  for rid in s["problems"].get(kind, {}).get("record_ids", [])]
        section = page.sections[kind]
        assert int(section["data-count"]) == sum(s["problems"].get(kind, {}).get("count", 0) for s in sources)
        assert [(r["data-source"], r["data-rid"]) for r in section["rows"]] == listed, kind
    assert [r["data-rid"] for r in page.sections["image_converted"]["rows"]] == ["a_gray", "b_gray"]
    assert len(page.sections["image_converted"]["images"]) == 2  # each gray image from its entry's own folder
    assert page.sections["image_missing"]["noimg"] == ["nope.png"]
    screenshot(out / "index.html", tmp_path / "check_page_mixture.png", size="1280,2000")
