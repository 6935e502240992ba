"""Preference records (DPO): both forms parse, bad pairs are named, the dataset and ``llava data check`` act on them.

    .venv/bin/pytest tests/data/test_preference.py
"""

from __future__ import annotations

import json

import pytest
import torch

from llava.cli import main
from llava.data.preference import DataCollatorForPreference, PreferenceDataset, parse_preference_record
from llava.data.records import Message, RecordError
from llava.data.templates import get_template
from llava.data.validate import DataError


def test_llava_next_form_puts_the_image_first():
    record = parse_preference_record({"id": "1", "image": "a.png", "prompt": "What is it?", "chosen": "A circle.",
                                      "rejected": "A square."})
    assert record.context == [Message("user", "<image>\nWhat is it?")]
    assert (record.images, record.chosen, record.rejected) == (["a.png"], "A circle.", "A square.")
    kept = parse_preference_record({"id": "2", "image": "a.png", "prompt": "Here <image> what?", "chosen": "x",
                                    "rejected": "y"})
    assert kept.context == [Message("user", "Here <image> what?")]  # placed by the template later, as for SFT


def test_video_pairs_mark_their_video_as_sft_records_do():
    record = parse_preference_record({"id": "v", "video": "a.mp4", "prompt": "Which way?", "chosen": "left",
                                      "rejected": "right"})
    assert (record.video, record.images) == ("a.mp4", [])
    assert record.context == [Message("user", "<video>\nWhich way?")]  # LLaVA-NeXT's placeholder in front
    assert record.as_record("rejected").video == "a.mp4"
    written = parse_preference_record({"id": "w", "video": "a.mp4", "prompt": "<image>\nWhich way?", "chosen": "l",
                                       "rejected": "r"})  # LLaVA-NeXT writes a video's placeholder as <image>
    assert written.context == [Message("user", "<video>\nWhich way?")]
    both = parse_preference_record({"id": "b", "image": "a.png", "video": "a.mp4", "prompt": "Same?", "chosen": "yes",
                                    "rejected": "no"})
    assert both.context == [Message("user", "<image>\n<video>\nSame?")] and both.images == ["a.png"]


def test_collator_carries_each_pairs_video_once():
    v1, v2 = torch.randn(1, 4, 3, 2, 2), torch.randn(1, 4, 3, 2, 2)
    pairs = [{"chosen_input_ids": torch.tensor([1, 5]), "chosen_labels": torch.tensor([-100, 5]),
              "rejected_input_ids": torch.tensor([1, 6]), "rejected_labels": torch.tensor([-100, 6]),
              "pixel_values": None, "pixel_values_videos": v, "index": i} for i, v in enumerate((v1, v2))]
    pairs.append({**pairs[0], "pixel_values_videos": None, "index": 2})  # a text pair between them adds nothing
    pairs[1], pairs[2] = pairs[2], pairs[1]
    assert torch.equal(DataCollatorForPreference(0)(pairs)["pixel_values_videos"], torch.cat([v1, v2]))
    joined = DataCollatorForPreference(0, join_videos=True)(pairs)["pixel_values_videos"]  # LlavaNextVideo
    assert torch.equal(joined, torch.cat([v1, v2], dim=1))


def test_conversation_form_keeps_the_context():
    record = parse_preference_record({"id": "c", "images": ["a.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "chosen": "Red.", "rejected": "Blue."}]})
    assert [m.role for m in record.context] == ["user", "assistant", "user"]
    assert record.conversation(record.rejected)[-1] == Message("assistant", "Blue.")


@pytest.mark.parametrize("raw, kind, field", [
    ({"id": "s", "prompt": "q", "chosen": "same", "rejected": " same "}, "preference_identical", "rejected"),
    ({"id": "e", "prompt": "q", "chosen": "  ", "rejected": "b"}, "preference_empty", "chosen"),
    ({"id": "m", "prompt": "q", "chosen": "a"}, "preference_missing", "rejected"),
    ({"id": "p", "chosen": "a", "rejected": "b"}, "preference_missing", "prompt"),
    ({"id": "t", "prompt": "q", "chosen": "a", "rejected": 3}, "bad_type", "rejected"),
    ({"id": "c", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "chosen": "a", "rejected": "a"}]},
     "preference_identical", "conversations[1].rejected"),
    ({"id": "i", "images": ["a.png", "b.png"], "prompt": "one <image> only", "chosen": "a", "rejected": "b"},
     "image_token_mismatch", "conversations"),
    ({"id": "v", "video": ["v.mp4"], "prompt": "q", "chosen": "a", "rejected": "b"}, "bad_type", "video"),
    ({"id": "w", "video": "v.mp4", "prompt": "<video> then <video>", "chosen": "a", "rejected": "b"},
     "video_token_mismatch", "conversations"),
])
def test_bad_pairs_are_named(raw, kind, field):
    with pytest.raises(RecordError) as err:
        parse_preference_record(raw)
    assert (err.value.kind, err.value.record_id, err.value.field) == (kind, raw["id"], field)


def test_collator_puts_chosen_rows_first_and_images_once():
    x1, x2 = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    batch = DataCollatorForPreference(pad_token_id=0)([
        {"chosen_input_ids": torch.tensor([1, 5, 9]), "chosen_labels": torch.tensor([-100, 5, 9]),
         "rejected_input_ids": torch.tensor([1, 5, 7, 7]), "rejected_labels": torch.tensor([-100, 5, 7, 7]),
         "pixel_values": x1, "index": 3},
        {"chosen_input_ids": torch.tensor([1, 6]), "chosen_labels": torch.tensor([-100, 6]),
         "rejected_input_ids": torch.tensor([1, 8]), "rejected_labels": torch.tensor([-100, 8]),
         "pixel_values": x2, "index": 0}])
    assert batch["input_ids"].tolist() == [[1, 5, 9, 0], [1, 6, 0, 0], [1, 5, 7, 7], [1, 8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 9, -100], [-100, 6, -100, -100], [-100, 5, 7, 7],
                                        [-100, 8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert torch.equal(batch["pixel_values"], torch.cat([x1, x2])) and batch["pair_index"].tolist() == [3, 0]


@pytest.fixture(scope="module")
def bad_pairs(shapes_data, tmp_path_factory):
    good = [{"id": f"g{i}", "image": r["image"], "prompt": "What colour?", "chosen": "red", "rejected": "blue"}
            for i, r in enumerate(json.loads(shapes_data["stage2_qa"].read_text())[:3])]
    bad = [{"id": "same", "prompt": "q", "chosen": "red", "rejected": "red"},
           {"id": "empty", "prompt": "q", "chosen": "", "rejected": "red"},
           {"id": "noimage", "image": "nope.png", "prompt": "q", "chosen": "a", "rejected": "b"}]
    path = tmp_path_factory.mktemp("bad_pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    return path


def test_dataset_stops_or_skips_bad_pairs(tiny_models, shapes_data, bad_pairs):
    from llava.model.builder import build_llava_model
    from llava.model.model_args import ModelArguments

    built = build_llava_model(ModelArguments(model_name_or_path=str(tiny_models["llm"]),
                                             vision_tower=str(tiny_models["vision_tower"])))
    kwargs = dict(template=get_template("vicuna_v1"), image_processor=built.image_processor,
                  image_folder=shapes_data["image_folder"], image_token_id=built.image_token_id,
                  num_image_tokens=built.num_image_tokens, model_max_length=256, show_progress=False)
    with pytest.raises(DataError) as err:
        PreferenceDataset(bad_pairs, built.tokenizer, **kwargs)
    assert "3 preference record(s)" in str(err.value) and "--on_bad_sample skip" in str(err.value)
    for kind in ("preference_identical", "preference_empty", "image_missing"):
        assert kind in str(err.value)
    dataset = PreferenceDataset(bad_pairs, built.tokenizer, on_bad_sample="skip", **kwargs)
    assert [r.id for r in dataset.records] == ["g0", "g1", "g2"]
    item = dataset[0]
    chosen, rejected = item["chosen_input_ids"].tolist(), item["rejected_input_ids"].tolist()
    # one tokenization per row: the prompt's tokens shared and unsupervised, the answer's supervised
    answer_start = next(i for i, lab in enumerate(item["chosen_labels"].tolist()) if lab != -100)
    assert chosen[:answer_start] == rejected[:answer_start]
    assert item["chosen_labels"][answer_start:].tolist() == chosen[answer_start:]
    assert built.tokenizer.decode(chosen[answer_start:], skip_special_tokens=True).strip() == "red"
    assert dataset.bad_samples_report()["invalid_records"]["counts"] == {
        "preference_identical": 1, "preference_empty": 1, "image_missing": 1}


def test_data_check_names_bad_pairs(tiny_models, shapes_data, bad_pairs, capsys):
    code = main(["data", "check", "--data_path", str(bad_pairs), "--image_folder", str(shapes_data["image_folder"]),
                 "--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
                 "--version", "vicuna_v1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    got = {kind: info["record_ids"] for kind, info in report["problems"].items()}
    assert got == {"preference_identical": ["same"], "preference_empty": ["empty"], "image_missing": ["noimage"]}


def test_data_check_tokenizes_both_answers(tiny_models, shapes_data, tmp_path, capsys):
    """An over-long rejected answer is counted (truncated) and each pair gives two rows' lengths; the chosen alone
    fits in --model_max_length."""
    image = json.loads(shapes_data["stage2_qa"].read_text())[0]["image"]
    long = " ".join(["the shapes are red"] * 40)
    pairs = [{"id": "short", "image": image, "prompt": "What colour?", "chosen": "red", "rejected": "blue"},
             {"id": "long_rejected", "image": image, "prompt": "What colour?", "chosen": "red", "rejected": long},
             {"id": "long_chosen", "image": image, "prompt": "What colour?", "chosen": long, "rejected": "red"}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    code = main(["data", "check", "--data_path", str(path), "--image_folder", str(shapes_data["image_folder"]),
                 "--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
                 "--version", "vicuna_v1", "--model_max_length", "96", "--json"])
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert code == 0
    assert stats["truncated"] == 2 and stats["over_max_length"] == 2 and stats["trainable"] == 3
    assert stats["token_length"]["max"] > 96 and stats["token_length"]["min"] < 96


def test_cached_pair_index_equals_the_uncached_one_and_a_restart_tokenizes_nothing(
        tiny_models, shapes_data, tmp_path, monkeypatch):
    """The index (kept pairs, both rows' lengths, problems) read back from the cache equals the one computed without
    a cache; the second start calls no tokenization; a changed data file is indexed again."""
    import llava.data.preference as preference
    from llava.model.builder import build_llava_model
    from llava.model.model_args import ModelArguments

    built = build_llava_model(ModelArguments(model_name_or_path=str(tiny_models["llm"]),
                                             vision_tower=str(tiny_models["vision_tower"])))
    images = [r["image"] for r in json.loads(shapes_data["stage2_qa"].read_text()) if r.get("image")][:4]
    lines = [json.dumps({"id": f"g{i}", "image": im, "prompt": "What colour?", "chosen": "red " * (i + 1),
                         "rejected": "blue"}) for i, im in enumerate(images)]
    lines += ['{"id": "broken", ', json.dumps({"id": "same", "prompt": "q", "chosen": "a", "rejected": "a"}),
              json.dumps({"id": "long", "image": images[0], "prompt": "x " * 300, "chosen": "a", "rejected": "b"})]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    kwargs = dict(template=get_template("vicuna_v1"), image_processor=built.image_processor,
                  image_folder=shapes_data["image_folder"], image_token_id=built.image_token_id,
                  num_image_tokens=built.num_image_tokens, model_max_length=128, show_progress=False,
                  on_bad_sample="skip")
    plain = PreferenceDataset(path, built.tokenizer, **kwargs)
    calls = []
    real = preference.tokenize_conversation
    monkeypatch.setattr(preference, "tokenize_conversation", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = PreferenceDataset(path, built.tokenizer, index_cache_dir=tmp_path / "cache", **kwargs)
    tokenized = len(calls)
    second = PreferenceDataset(path, built.tokenizer, index_cache_dir=tmp_path / "cache", **kwargs)
    assert tokenized >= 2 * len(plain) and len(calls) == tokenized  # the restart tokenized nothing
    assert (first.index_from_cache, second.index_from_cache, plain.index_from_cache) == (False, True, False)
    rows = [plain[i] for i in range(len(plain))]
    assert plain.chosen_lengths.tolist() == [len(r["chosen_input_ids"]) for r in rows]
    assert plain.rejected_lengths.tolist() == [len(r["rejected_input_ids"]) for r in rows]
    assert plain.lengths == [len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows]
    assert [r.id for r in plain.records] == ["g0", "g1", "g2", "g3"]
    assert plain.bad_samples_report()["invalid_records"]["counts"] == {"invalid_json": 1, "preference_identical": 1}
    assert plain.bad_samples_report()["cannot_train"]["counts"] == {"no_supervised_tokens": 1}
    for cached in (first, second):
        assert cached.chosen_lengths.tolist() == plain.chosen_lengths.tolist()
        assert cached.rejected_lengths.tolist() == plain.rejected_lengths.tolist()
        assert cached.modality_lengths == plain.modality_lengths
        assert [r.id for r in cached.records] == [r.id for r in plain.records]
        assert cached.bad_samples_report() == plain.bad_samples_report()
        for i, row in enumerate(rows):
            got = cached[i]
            assert all(torch.equal(got[k], row[k]) for k in row if isinstance(row[k], torch.Tensor))
    path.write_text("\n".join(lines[:2]) + "\n")
    changed = PreferenceDataset(path, built.tokenizer, index_cache_dir=tmp_path / "cache", **kwargs)
    assert not changed.index_from_cache and [r.id for r in changed.records] == ["g0", "g1"]
