"""``llava data check`` on a corpus holding one record per problem kind: kinds -> record ids, exit codes, --json.

    .venv/bin/pytest tests/test_data_check.py
"""

from __future__ import annotations

import json
import shutil

from llava.cli import main


def check_argv(tiny_models, corpus, *extra) -> list[str]:
    return ["data", "check", "--data_path", str(corpus["data_path"]), "--image_folder", str(corpus["image_folder"]),
            "--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--model_max_length", "64", *extra]




def run_json(tiny_models, corpus, capsys, *extra) -> tuple[int, dict]:
    code = main(check_argv(tiny_models, corpus, "--json", *extra))
    return code, json.loads(capsys.readouterr().out)


def test_every_kind_named_with_its_record_ids(tiny_models, bad_corpus, capsys):
    # training flags the checker does not use are accepted and ignored, as a launcher passes them all
    code, report = run_json(tiny_models, bad_corpus, capsys, "--learning_rate", "1e-3", "--lora_enable", "True")
    assert code == 1 and report["ok"] is False
    got = {kind: info["record_ids"] for kind, info in report["problems"].items()}
    assert got == bad_corpus["expected"]
    assert report["problems"]["image_converted"]["severity"] == "note"
    assert report["problems"]["duplicate_id"]["severity"] == "warning"
    assert report["problems"]["no_supervised_tokens"]["severity"] == "dropped"
    assert "line 4" in report["problems"]["invalid_json"]["messages"][0]
    assert "outside the image folder" in report["problems"]["image_outside_folder"]["messages"][0]


def test_statistics(tiny_models, bad_corpus, capsys):
    _, report = run_json(tiny_models, bad_corpus, capsys)
    s = report["stats"]
    assert s["records"] == 29  # 30 lines, one not JSON
    assert s["num_image_tokens"] == 16  # (64/16)^2 patches of the tiny CLIP, CLS dropped
    assert s["truncated"] == 1 and s["dropped"] == 2 and s["over_max_length"] == 2  # long_ok; toomany + nosupervised
    assert s["modality"] == {"image": 19, "text_only": 1}  # after tokenizing: 8 good, gray, anim, 2 dup, 6 bad-image, long_ok
    assert s["images_per_sample"] == {"0": 1, "1": 20, "5": 1}  # every parsed record
    assert s["image_width"]["min"] == 16 and s["image_width"]["max"] == 47  # anim.gif 16 px .. good7 47 px
    assert s["token_length"]["max"] > 64


def test_clean_data_exits_zero_and_no_decode_skips_pixels(tiny_models, bad_corpus, tmp_path, capsys):
    lines = bad_corpus["data_path"].read_text().splitlines()
    good = [line for line in lines if line.startswith('{"id": "good')]
    clean = dict(bad_corpus, data_path=tmp_path / "clean.json")
    clean["data_path"].write_text("[" + ",".join(good) + "]")
    code, report = run_json(tiny_models, clean, capsys)
    assert code == 0 and report["problems"] == {} and report["stats"]["trainable"] == 8
    # a deleted image is found without decoding; text output names kind and id
    folder = tmp_path / "imgs"
    shutil.copytree(bad_corpus["image_folder"], folder)
    (folder / "good5.png").unlink()
    code = main(check_argv(tiny_models, dict(clean, image_folder=folder), "--no_decode"))
    out = capsys.readouterr().out
    assert code == 1 and "image_missing: 1 record(s), first: good5" in out and "FAILED" in out


def test_missing_data_path_exits_two(tiny_models, bad_corpus, tmp_path, capsys):
    corpus = dict(bad_corpus, data_path=tmp_path / "nope.json")
    assert main(check_argv(tiny_models, corpus)) == 2
    assert "llava data check: error: --data_path" in capsys.readouterr().err


def test_image_placement_flag_reaches_the_checks_tokenization(tiny_models, bad_corpus):
    """``llava data check`` tokenizes as training does: the BOS as its id, a single ``<image>`` moved to the front of
    its turn by default and left where the record has it with ``--image_placement keep``."""
    from transformers import AutoTokenizer

    from llava.data.records import parse_record
    from llava.data_check import _tokenize, build_parser, load_token_setup

    record = parse_record({"id": "r", "image": "a.png", "conversations": [
        {"from": "human", "value": "Which colour is it? <image>"}, {"from": "gpt", "value": "Red."}]}, 0)
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
    for extra, question in (((), "<image>\nWhich colour is it?"), (("--image_placement", "keep"), record.messages[0].content)):
        args, _ = build_parser().parse_known_args(check_argv(tiny_models, bad_corpus, *extra)[2:])
        setup = load_token_setup(args)
        text = f"{system} USER: {question} ASSISTANT: Red.</s>"  # LLaVA's v1, written out
        ids = [tok.bos_token_id] + setup.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [i for t in ids for i in ([t] * setup.num_image_tokens if t == setup.image_token_id else [t])]
        assert _tokenize(record, setup, 4096).input_ids == ids, extra


def test_records_stream_in_batches_and_batch_size_changes_nothing(tiny_models, bad_corpus, tmp_path, capsys,
                                                                  monkeypatch):
    """A JSONL source is read a batch at a time (a bad line past the first batch is not read yet when the first
    batch is handed out); checking in batches of 3 (duplicates, image results and problems across batches) gives the
    report of one batch."""
    from llava import data_check

    path = tmp_path / "stream.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}"}) + "\n" for i in range(8)) + "{not json\n")
    report = data_check.ProblemReport()
    batches = data_check.iter_record_batches(path, report, batch=4)
    assert [name for name, _ in next(batches)] == ["line 1", "line 2", "line 3", "line 4"]
    assert report.counts["invalid_json"] == 0
    assert [len(b) for b in batches] == [4] and report.counts["invalid_json"] == 1
    monkeypatch.setattr(data_check, "CHECK_BATCH", 10**6)
    _, whole = run_json(tiny_models, bad_corpus, capsys)
    monkeypatch.setattr(data_check, "CHECK_BATCH", 3)
    _, batched = run_json(tiny_models, bad_corpus, capsys)
    assert batched == whole and whole["stats"]["records"] == 29
