"""The batched index (``llava/data/index_batch.py``) equals the per-record path, record for record.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/data/test_index_batch.py

Reference: each record parsed, tokenized by ``tokenize_conversation`` and its images checked by
``record_image_problem``, one at a time (what the index did before it batched; written out here), on a mixed data
file (text-only, single- and multi-image, unicode, truncated, rejected, invalid records and tricky image paths) with
a real SentencePiece tokenizer (Mistral-7B v0.1's, shipped by mistral-common). Compared: kept records, lengths,
modality, every problem and dropped sample with its message, and the dataset's counts under ``--on_bad_sample``.
"""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoTokenizer

from llava.data import index as index_module
from llava.data.anyres import AnyresLayout, read_image_sizes
from llava.data.dataset import DataError, LazySupervisedDataset
from llava.data.images import ImageLoadError
from llava.data.index import IndexSettings, InMemoryRecords, build_index
from llava.data.records import RecordError, parse_record
from llava.data.templates import get_template
from llava.data.tokenize import SampleRejected, tokenize_conversation
from llava.data.validate import ProblemLog, image_problem_kind, load_raw_records, record_image_problem
from llava.model.builder import add_multimodal_tokens

N_IMAGE_TOKENS = 16
LONG = "the quick brown fox jumps over the lazy dog near the riverbank " * 12


def _conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed_index")
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "dir.png").mkdir()
    for name, size in (("a.png", (40, 30)), ("b.png", (20, 60)), ("sub/c.png", (64, 64)), ("d.png", (90, 12)),
                       ("C:a.png", (8, 8))):  # a Linux file name that Windows reads as a drive: refused all the same
        Image.new("RGB", size, (10, 20, 30)).save(folder / name)
    Image.new("RGB", (8, 8)).save(root / "outside.png")
    os.symlink(folder / "a.png", folder / "link.png")  # inside: fine
    os.symlink(root / "outside.png", folder / "out_link.png")  # resolves outside the folder
    os.symlink(folder / "sub", folder / "linkdir")  # a symlinked directory inside the folder
    rows = [
        {"id": "text", "conversations": _conv("What is 2+2?", "4")},
        {"id": "one", "image": "a.png", "conversations": _conv("What is it?\n<image>", "A square.", "Colour?", "Dark.")},
        {"id": "unicode", "image": "b.png", "conversations": _conv("<image>\nQu'est-ce que c'est ? 🚀 日本語", " \n  Ünïcödé ✓ réponse")},
        {"id": "two", "images": ["a.png", "sub/c.png"], "conversations": _conv("<image>\nand <image>: same?", "No.")},
        {"id": "later", "images": ["b.png", "linkdir/c.png"],
         "conversations": _conv("<image>\nLook.", "Seen.", "And now <image>?", "Also seen.")},
        {"id": "reply_first", "images": ["b.png", "d.png"], "conversations": _conv("<image>\nFirst.", "<image> second.")},
        {"id": "in_reply", "images": ["a.png", "d.png"], "conversations": _conv("<image>\nDraw one.", "Here: <image>")},
        {"id": "trunc_reply", "image": "a.png", "conversations": _conv("<image>\nDescribe.", LONG)},
        {"id": "trunc_text", "conversations": _conv("Tell me.", LONG + LONG)},
        {"id": "long_question", "image": "a.png", "conversations": _conv("<image>\n" + LONG, "Yes.")},
        {"id": "many", "images": ["a.png"] * 9, "conversations": _conv("<image>" * 9 + "\nSame?", "Yes.")},
        {"id": "noconv", "image": "a.png"},
        {"id": "badrole", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"id": "mismatch", "image": "a.png", "conversations": _conv("no placeholder", "ok")},
        {"id": "missing", "image": "nope.png", "conversations": _conv("<image>\nx", "y")},
        {"id": "missing_dir", "image": "nodir/a.png", "conversations": _conv("<image>\nx", "y")},
        {"id": "absolute", "image": str(folder / "a.png"), "conversations": _conv("<image>\nx", "y")},
        {"id": "drive", "image": "C:a.png", "conversations": _conv("<image>\nx", "y")},
        {"id": "backslash", "image": "\\a.png", "conversations": _conv("<image>\nx", "y")},
        {"id": "escape", "image": "../outside.png", "conversations": _conv("<image>\nx", "y")},
        {"id": "out_link", "image": "out_link.png", "conversations": _conv("<image>\nx", "y")},
        {"id": "link", "image": "link.png", "conversations": _conv("<image>\nx", "y")},
        {"id": "directory", "image": "dir.png", "conversations": _conv("<image>\nx", "y")},
        {"id": "dotted", "images": ["./a.png", "sub/../b.png", "sub//c.png"],
         "conversations": _conv("<image><image><image>\nThree?", "Three.")},
        {"id": "trailing", "image": "a.png/", "conversations": _conv("<image>\nx", "y")},
        {"conversations": _conv("No id here.", "Fine.")},
        {"id": "system", "conversations": [{"from": "system", "value": "Be brief."}, *_conv("Hi <b>?", "</s> ok")]},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows * 3]
    lines.insert(5, "{not json")
    data = root / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return {"data_path": data, "image_folder": folder}


@pytest.fixture(scope="module")
def sp_tokenizer(sentencepiece_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir)
    add_multimodal_tokens(tok, True)
    return tok


@pytest.fixture(scope="module")
def byte_level_tokenizer(tiny_models):
    """The tiny models' byte-level BPE tokenizer (GPT-2 style pre-tokenizer; its special tokens include ``</s>``,
    ``<|eot_id|>``, ``<|im_end|>``)."""
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    add_multimodal_tokens(tok, False)
    return tok


def per_record_index(raws, tok, template, s: IndexSettings):
    """The index one record at a time: the checks ``LazySupervisedDataset`` applies, through the public functions."""
    keep, lengths, has_image, problems, dropped = [], [], [], [], []
    for i, raw in enumerate(raws):
        try:
            record = parse_record(raw, i)
        except RecordError as err:
            problems.append((err.kind, str(err), err.record_id))
            continue
        try:
            n = s.num_image_tokens
            if s.anyres is not None and record.images:
                n = s.anyres.record_image_tokens(read_image_sizes(s.image_folder, record.images))
            sample = tokenize_conversation(record.messages, template, tok, image_token_id=s.image_token_id,
                                           num_image_tokens=n, model_max_length=s.model_max_length,
                                           mm_use_im_start_end=s.mm_use_im_start_end)
        except SampleRejected as err:
            rid = str(raw["id"]) if raw.get("id") is not None else f"#{i}"
            dropped.append((err.kind, f"record {rid!r}: {err}", rid))
            continue
        except ImageLoadError as err:
            problems.append((image_problem_kind(err), f"record {record.id!r}: {err}", record.id))
            continue
        problem = record_image_problem(record, s.image_folder)
        if problem is not None:
            problems.append((*problem, record.id))
            continue
        keep.append(i)
        lengths.append(len(sample.input_ids))
        has_image.append(bool(record.images))
    return keep, lengths, has_image, problems, dropped


def _settings(tok, folder, max_length, start_end=False, anyres=None):
    return IndexSettings(image_folder=str(folder), image_token_id=tok.convert_tokens_to_ids("<image>"),
                         num_image_tokens=N_IMAGE_TOKENS, model_max_length=max_length, mm_use_im_start_end=start_end,
                         anyres=anyres)


def _as_tuple(index):
    return (index.keep.tolist(), index.lengths.tolist(), index.has_image.tolist(), index.problems, index.dropped)


def _raws(mixed):
    return load_raw_records(mixed["data_path"], ProblemLog())


@pytest.mark.parametrize(("template", "start_end"), [("vicuna_v1", False), ("llama_2", False), ("mistral", True),
                                                     ("plain", False), ("chatml", False)])
def test_batched_index_equals_per_record_path(mixed, sp_tokenizer, template, start_end):
    raws = _raws(mixed)
    tpl = get_template(template)
    outcomes = set()
    for max_length in (40, 64, 90, 128, 4096):
        s = _settings(sp_tokenizer, mixed["image_folder"], max_length, start_end)
        expected = per_record_index(raws, sp_tokenizer, tpl, s)
        got = build_index(InMemoryRecords(raws, []), sp_tokenizer, tpl, s, workers=1, show_progress=False)
        assert _as_tuple(got) == expected, (template, max_length)
        outcomes |= {k for k, *_ in expected[3] + expected[4]}
    # the data reaches every outcome the index decides (images, records, both rejections; plain drops the questions)
    assert {"image_missing", "image_absolute_path", "image_outside_folder", "missing_conversations", "bad_role",
            "image_token_mismatch", "image_tokens_exceed_max_length"} <= outcomes
    assert "no_supervised_tokens" in outcomes or template == "plain"


def test_truncation_edges_in_one_token_steps_and_pooled_chunks(mixed, sp_tokenizer, monkeypatch):
    """Every max length from 20 to 200 (each first-supervised and last-image position becomes an edge; tokenizer
    calls of 5 texts), and the pool of worker processes over small chunks give the same index as the per-record
    path."""
    from llava.data import index_batch

    monkeypatch.setattr(index_batch, "TOKENIZE_BATCH", 5)
    raws = _raws(mixed)
    tpl = get_template("vicuna_v1")
    for max_length in range(20, 200):
        s = _settings(sp_tokenizer, mixed["image_folder"], max_length)
        got = build_index(InMemoryRecords(raws[:27], []), sp_tokenizer, tpl, s, workers=1, show_progress=False)
        assert _as_tuple(got) == per_record_index(raws[:27], sp_tokenizer, tpl, s), max_length
    monkeypatch.setattr(index_module, "CHUNK", 7)
    s = _settings(sp_tokenizer, mixed["image_folder"], 72)
    pooled = build_index(InMemoryRecords(raws, []), sp_tokenizer, tpl, s, workers=2, show_progress=False)
    assert _as_tuple(pooled) == per_record_index(raws, sp_tokenizer, tpl, s)


def test_anyres_counts_from_headers_equal_per_record_path(mixed, sp_tokenizer):
    layout = AnyresLayout(((32, 64), (64, 32), (64, 64)), 32, 8, 16)  # 16 tokens a view; 2-5 views by image size
    raws = _raws(mixed)
    for max_length in (64, 150, 4096):
        s = _settings(sp_tokenizer, mixed["image_folder"], max_length, anyres=layout)
        got = build_index(InMemoryRecords(raws, []), sp_tokenizer, get_template("vicuna_v1"), s, workers=1,
                          show_progress=False)
        assert _as_tuple(got) == per_record_index(raws, sp_tokenizer, get_template("vicuna_v1"), s), max_length


def test_dataset_bad_sample_counts_match_the_per_record_path(mixed, sp_tokenizer, tmp_path):
    tpl = get_template("vicuna_v1")
    s = _settings(sp_tokenizer, mixed["image_folder"], 90)
    _, _, _, problems, dropped = per_record_index(_raws(mixed), sp_tokenizer, tpl, s)
    expected_problems = {"invalid_json": 1}
    for kind, *_ in problems:
        expected_problems[kind] = expected_problems.get(kind, 0) + 1
    expected_dropped = {}
    for kind, *_ in dropped:
        expected_dropped[kind] = expected_dropped.get(kind, 0) + 1
    kwargs = dict(template=tpl, image_processor=None, image_folder=mixed["image_folder"],
                  image_token_id=s.image_token_id, num_image_tokens=N_IMAGE_TOKENS, model_max_length=90,
                  show_progress=False, index_workers=2)
    for cache in (None, tmp_path / "cache"):
        ds = LazySupervisedDataset(mixed["data_path"], sp_tokenizer, on_bad_sample="skip", index_cache_dir=cache,
                                   **kwargs)
        assert dict(ds.problems.counts) == expected_problems and dict(ds.dropped.counts) == expected_dropped
        with pytest.raises(DataError, match="image_outside_folder"):
            LazySupervisedDataset(mixed["data_path"], sp_tokenizer, on_bad_sample="error", index_cache_dir=cache,
                                  **kwargs)


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_2", "mistral", "llama3", "chatml", "plain"])
@pytest.mark.parametrize("which", ["sentencepiece", "byte_level"])
def test_ids_only_path_equals_per_record_path(mixed, sp_tokenizer, byte_level_tokenizer, template, which,
                                              monkeypatch):
    """Samples that end in a supervised special token and fit are measured from their ids alone (no offsets); the
    rest go through the offsets path. Both tokenizers, every template, lengths from "everything truncates" to
    "nothing does": the index equals the per-record path, and the ids-only path does decide most records where the
    template ends replies with a special token of the tokenizer."""
    from llava.data import index_batch

    tok = sp_tokenizer if which == "sentencepiece" else byte_level_tokenizer
    offsets_texts = []
    encode = index_batch._encode_batch
    monkeypatch.setattr(index_batch, "_encode_batch", lambda t, texts: offsets_texts.extend(texts) or encode(t, texts))
    raws = _raws(mixed)
    tpl = get_template(template)
    for max_length in (40, 90, 4096):
        offsets_texts.clear()
        s = _settings(tok, mixed["image_folder"], max_length)
        got = build_index(InMemoryRecords(raws, []), tok, tpl, s, workers=1, show_progress=False)
        assert _as_tuple(got) == per_record_index(raws, tok, tpl, s), (template, max_length)
    ends_special = {"vicuna_v1", "llama_2", "mistral"} | ({"llama3"} if which == "byte_level" else set())
    if template in ends_special:  # at 4096 nothing truncates: only records without a reply end go the offsets way
        assert len(offsets_texts) < len(got.keep) / 2, len(offsets_texts)
    else:  # chatml ends in an unsupervised "\n", plain in the caption's "\n": every record needs offsets
        assert len(offsets_texts) >= len(got.keep)


def test_image_dirs_are_each_image_paths_directory(mixed, sp_tokenizer, tmp_path):
    """``image_dirs`` (whose mtimes the cached index checks) is ``dirname(join(folder, path))`` of every image path of
    the records that parse, computed here per path; the mixed file's paths include absolute, ``..``, ``./``, ``//``,
    a trailing ``/`` and a backslash, and a folder given with a trailing ``/``."""
    from llava.data.index_batch import index_records

    raws = _raws(mixed) + [{"id": "abs_root", "image": "/a.png", "conversations": _conv("<image>\nx", "y")},
                           {"id": "deep", "image": "x//y/./z/", "conversations": _conv("<image>\nx", "y")}]
    for folder in (str(mixed["image_folder"]), str(mixed["image_folder"]) + "/"):
        s = _settings(sp_tokenizer, folder, 4096)
        expected = set()
        for i, raw in enumerate(raws):
            try:
                record = parse_record(raw, i)
            except RecordError:
                continue
            expected |= {os.path.dirname(os.path.join(folder, rel)) for rel in record.images if isinstance(rel, str)}
        got = index_records(raws, 0, sp_tokenizer, get_template("vicuna_v1"), s)["image_dirs"]
        assert got == expected
        assert len(expected) >= 6  # the folder, sub, nodir, the absolute paths' directories, x//y/./z

