"""The shared dataset index (``llava/data/index.py``): cached, keyed, never stale, Arrow-backed records.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/data/test_index.py

References: lengths from ``tokenize_conversation`` run on each record here, problem kinds from the ``bad_corpus``
fixture's hand-written expectations, and the dataset built without any cache (records in memory, computed in-process).
"""

from __future__ import annotations

import json
import pickle

import pytest
from transformers import AutoImageProcessor, AutoTokenizer

from llava.data import index as index_module
from llava.data.dataset import DataError, LazySupervisedDataset
from llava.data.index import ArrowRecords
from llava.data.records import parse_record
from llava.data.templates import get_template
from llava.data.tokenize import SampleRejected, tokenize_conversation
from llava.model.builder import add_multimodal_tokens

N_IMAGE_TOKENS = 16


@pytest.fixture(scope="module")
def parts(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    add_multimodal_tokens(tok, False)
    return tok, AutoImageProcessor.from_pretrained(tiny_models["vision_tower"])


def _dataset(parts, data_path, folder, cache=None, workers=1, max_length=64, on_bad_sample="skip", tok=None):
    tokenizer, processor = parts
    tokenizer = tok or tokenizer
    return LazySupervisedDataset(data_path, tokenizer, template=get_template("vicuna_v1"), image_processor=processor,
                                 image_folder=folder, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                 num_image_tokens=N_IMAGE_TOKENS, model_max_length=max_length,
                                 on_bad_sample=on_bad_sample, show_progress=False, index_cache_dir=cache,
                                 index_workers=workers)


def _summary(ds):
    return (ds._keep.tolist(), ds.lengths, ds.modality_lengths, dict(ds.problems.counts), dict(ds.dropped.counts),
            ds.problems.examples, ds.dropped.examples)


def test_parallel_cached_index_equals_per_record_tokenization_and_the_uncached_dataset(parts, bad_corpus, tmp_path):
    tok, _ = parts
    cache = tmp_path / "cache"
    cached = _dataset(parts, bad_corpus["data_path"], bad_corpus["image_folder"], cache=cache, workers=2)
    assert isinstance(cached.raw, ArrowRecords) and not cached.index_from_cache
    plain = _dataset(parts, bad_corpus["data_path"], bad_corpus["image_folder"])
    assert _summary(cached) == _summary(plain)
    # problem kinds as the fixture lists them (only the kinds training checks: pixels are not decoded)
    expected = bad_corpus["expected"]
    for kind in ("invalid_json", "missing_conversations", "bad_type", "bad_role", "no_assistant_turn", "image_missing",
                 "image_absolute_path", "image_outside_folder", "image_tokens_exceed_max_length", "no_supervised_tokens"):
        counts = {**cached.problems.counts, **cached.dropped.counts}
        assert counts.get(kind) == len(expected[kind]), kind
    # every kept sample's length is what tokenizing its record gives
    lines = [json.loads(x) for x in bad_corpus["data_path"].read_text().splitlines() if x.startswith("{\"")]
    for i, j in enumerate(cached._keep.tolist()):
        record = parse_record(cached.raw[j], j)
        assert cached.raw[j] == lines[j]
        sample = tokenize_conversation(record.messages, get_template("vicuna_v1"), tok, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                       num_image_tokens=N_IMAGE_TOKENS, model_max_length=64)
        assert cached.lengths[i] == len(sample.input_ids)
        assert (cached.modality_lengths[i] > 0) == bool(record.images)
    assert len(pickle.dumps(cached.raw)) < 2000  # DataLoader workers map the Arrow file, records are not copied
    assert pickle.loads(pickle.dumps(cached.raw))[3] == cached.raw[3]
    with pytest.raises(DataError, match="cannot be trained on"):  # --on_bad_sample error still stops, from the cache
        _dataset(parts, bad_corpus["data_path"], bad_corpus["image_folder"], cache=cache, on_bad_sample="error")


def test_restart_reads_the_cache_and_any_changed_input_rebuilds(parts, shapes_data, tmp_path, monkeypatch):
    data = tmp_path / "qa.json"
    records = json.loads(open(shapes_data["stage2_qa"]).read())[:20]
    data.write_text(json.dumps(records))
    folder, cache = shapes_data["image_folder"], tmp_path / "cache"
    first = _dataset(parts, data, folder, cache=cache, max_length=256)
    calls = []
    real_build = index_module.build_index
    monkeypatch.setattr(index_module, "build_index", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    again = _dataset(parts, data, folder, cache=cache, max_length=256)
    assert again.index_from_cache and not calls and _summary(again) == _summary(first)

    shorter = _dataset(parts, data, folder, cache=cache, max_length=40)  # another max length: another index
    assert not shorter.index_from_cache and len(calls) == 1
    assert sum(shorter.dropped.counts.values()) + len(shorter) == 20 and max(shorter.lengths) <= 40
    tok2 = AutoTokenizer.from_pretrained(parts[0].name_or_path)
    add_multimodal_tokens(tok2, True)  # a tokenizer with <im_start>/<im_end> added is another tokenizer
    assert not _dataset(parts, data, folder, cache=cache, max_length=256, tok=tok2).index_from_cache
    data.write_text(json.dumps(records + records[:1]))  # changed content: never the old index
    grown = _dataset(parts, data, folder, cache=cache, max_length=256)
    assert not grown.index_from_cache and len(grown) == len(first) + 1
    files = sorted(cache.glob("index-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    files[-1].write_bytes(files[0].read_bytes())  # the grown data's index now holds another key: not used
    n = len(calls)
    assert len(_dataset(parts, data, folder, cache=cache, max_length=256)) == len(grown) and len(calls) == n + 1


def test_image_removed_after_indexing_is_found_again(parts, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / name)
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": n, "image": f"{n}.png", "conversations": conv}) + "\n" for n in "ab"))
    cache = tmp_path / "cache"
    assert len(_dataset(parts, data, folder, cache=cache)) == 2
    (folder / "b.png").unlink()
    ds = _dataset(parts, data, folder, cache=cache)
    assert not ds.index_from_cache and len(ds) == 1 and ds.problems.counts == {"image_missing": 1}
    with pytest.raises(DataError, match="image_missing"):
        _dataset(parts, data, folder, cache=cache, on_bad_sample="error")


def test_saved_dataset_and_json_list_go_through_the_index(parts, shapes_data, tmp_path):
    import datasets

    records = json.loads(open(shapes_data["stage2_qa"]).read())[:8]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(saved))
    as_json = tmp_path / "list.json"
    as_json.write_text(json.dumps(records))
    a = _dataset(parts, saved, shapes_data["image_folder"], cache=tmp_path / "c", max_length=256)
    b = _dataset(parts, as_json, shapes_data["image_folder"], cache=tmp_path / "c", max_length=256)
    assert a.lengths == b.lengths and len(a) == 8
    assert _dataset(parts, saved, shapes_data["image_folder"], cache=tmp_path / "c", max_length=256).index_from_cache
    for i in range(len(a)):
        assert a[i]["input_ids"].tolist() == b[i]["input_ids"].tolist()
    with pytest.raises(SampleRejected):  # sanity of the reference used above: a too-short limit rejects
        record = parse_record(records[0], 0)
        tok = parts[0]
        tokenize_conversation(record.messages, get_template("vicuna_v1"), tok,
                              image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=N_IMAGE_TOKENS,
                              model_max_length=4)
