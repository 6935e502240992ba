"""Dataset mixtures (LLaVA-NeXT's YAML, ``llava/data/sources.py``): sampling, seeds, folders, per-source index.

    .venv/bin/python -m pytest -q tests/data/test_sources.py

References are written out here: LLaVA-NeXT's slices (``[:N]``, ``[-N:]``, percentages rounded up, computed in
integers), and for ``random:N`` the documented draw (the first N of ``numpy.random.default_rng([seed, key])``'s
permutation, key = the first 8 bytes of SHA-256 of the json_path as written, little-endian).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from llava.data import index as index_module
from llava.data.dataset import DataError, LazySupervisedDataset
from llava.data.sources import select_rows, source_specs
from llava.data.templates import get_template
from llava.errors import UsageError
from llava.model.builder import add_multimodal_tokens

N = 37
REPO = Path(__file__).resolve().parents[2]


def _conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _records(prefix: str, n: int = N) -> list[dict]:
    return [{"id": f"{prefix}{i}", "conversations": _conv(f"What is {i} plus one?", f"{i + 1}")} for i in range(n)]


@pytest.fixture(scope="module")
def parts(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    add_multimodal_tokens(tok, False)
    return tok, AutoImageProcessor.from_pretrained(tiny_models["vision_tower"])


def _dataset(parts, data_path, folder=None, *, cache=None, seed=0, on_bad_sample="error"):
    tok, processor = parts
    return LazySupervisedDataset(data_path, tok, template=get_template("vicuna_v1"), image_processor=processor,
                                 image_folder=folder, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                 num_image_tokens=16, model_max_length=128, on_bad_sample=on_bad_sample,
                                 show_progress=False, index_cache_dir=cache, index_workers=1, seed=seed)


def _mixture(path: Path, entries: list[dict]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"datasets": entries}))
    return path


def _ids(ds) -> list[str]:
    return [ds.record(i).id for i in range(len(ds))]


def _key(written: str) -> int:
    return int.from_bytes(hashlib.sha256(written.encode()).digest()[:8], "little")


def _expected(strategy: str, ids: list[str], seed: int, written: str) -> list[str]:
    """LLaVA-NeXT's selection, written out: N% is ceil(N * len / 100) in integers; slices cap at the length."""
    if strategy == "all":
        return ids
    how, amount = strategy.split(":")
    n = -(-int(amount[:-1]) * len(ids) // 100) if amount.endswith("%") else int(amount)
    if how == "first":
        return ids[:n]
    if how == "end":
        return ids[len(ids) - min(n, len(ids)):]
    order = np.random.default_rng([seed, _key(written)]).permutation(len(ids))
    return [ids[k] for k in order[:n]]


STRATEGIES = ["all", "first:5", "first:100", "end:7", "end:100", "random:9", "random:100", "first:10%", "end:20%",
              "random:30%", "first:1%", "end:99%"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_takes_what_llava_next_takes(parts, tmp_path, strategy):
    data = tmp_path / "a.json"
    data.write_text(json.dumps(_records("a")))
    mix = _mixture(tmp_path / "mix.yaml", [{"json_path": "a.json", "sampling_strategy": strategy}])
    ds = _dataset(parts, mix, seed=7)
    assert _ids(ds) == _expected(strategy, [f"a{i}" for i in range(N)], 7, "a.json")


@pytest.mark.parametrize("cache", [False, True])
def test_a_file_listed_twice_shares_its_index_and_gives_both_entries(parts, tmp_path, cache):
    """Both entries read one index (opened once); each gets its own rows and lengths, whichever entry comes first
    (the index arrays are released after their last entry only), in the narrow per-sample integer types."""
    data = tmp_path / "a.json"
    data.write_text(json.dumps(_records("a")))
    alone = _dataset(parts, data)
    by_id = dict(zip(_ids(alone), alone.lengths))
    for first, second in (("all", "end:5"), ("end:5", "all")):
        mix = _mixture(tmp_path / "mix.yaml", [{"json_path": "a.json", "sampling_strategy": first},
                                               {"json_path": "a.json", "sampling_strategy": second}])
        ds = _dataset(parts, mix, cache=tmp_path / "cache" if cache else None)
        ids = [f"a{i}" for i in range(N)]
        assert _ids(ds) == _expected(first, ids, 0, "a.json") + _expected(second, ids, 0, "a.json")
        assert list(ds.lengths) == [by_id[i] for i in _ids(ds)]
        assert (ds._source.dtype, ds._keep.dtype) == (np.int8, np.int32)


def test_end_zero_takes_nothing_and_percentages_round_up(tmp_path):
    data = tmp_path / "a.json"
    data.write_text("[]")
    mix = _mixture(tmp_path / "m.yaml", [{"json_path": "a.json", "sampling_strategy": s}
                                         for s in ("end:0", "first:1%", "random:50%", "end:3%")])
    specs = source_specs(mix)
    assert [len(select_rows(s, 201, 0)) for s in specs] == [0, 3, 101, 7]  # 2.01 -> 3, 100.5 -> 101, 6.03 -> 7
    assert select_rows(specs[3], 201, 0).tolist() == list(range(194, 201))


def test_random_is_the_same_on_every_rank_and_restart_and_changes_with_the_seed(parts, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_records("a")))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in _records("b", 50)))
    mix = _mixture(tmp_path / "mix.yaml", [{"json_path": "a.json", "sampling_strategy": "random:10"},
                                           {"json_path": "b.jsonl", "sampling_strategy": "random:40%", "repeat": 1.5}])
    cache = tmp_path / "cache"
    first = _ids(_dataset(parts, mix, cache=cache, seed=3))
    restart = _dataset(parts, mix, cache=cache, seed=3)
    assert restart.index_from_cache and _ids(restart) == first
    # two ranks: fresh interpreters with different hash seeds (nothing may depend on Python's str hash)
    script = textwrap.dedent(f"""
        import json, sys
        from transformers import AutoImageProcessor, AutoTokenizer
        from llava.data.dataset import LazySupervisedDataset
        from llava.data.templates import get_template
        from llava.model.builder import add_multimodal_tokens
        tok = AutoTokenizer.from_pretrained({str(parts[0].name_or_path)!r})
        add_multimodal_tokens(tok, False)
        ds = LazySupervisedDataset({str(mix)!r}, tok, template=get_template("vicuna_v1"), image_processor=None,
                                   image_folder=None, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                   num_image_tokens=16, model_max_length=128, show_progress=False,
                                   index_cache_dir=None, index_workers=1, seed=3)
        print(json.dumps([ds.record(i).id for i in range(len(ds))]))
    """)
    for rank, hash_seed in (("0", "1"), ("1", "2")):
        env = {"RANK": rank, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
               "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == first, rank
    other = _ids(_dataset(parts, mix, cache=cache, seed=4))
    assert other != first and sorted(set(other)) != sorted(set(first))
    # the expected draw, written out: source b takes ceil(40% of 50) = 20 rows, then 1.5 x: all 20 + 10 more
    b = [f"b{i}" for i in range(50)]
    taken = _expected("random:40%", b, 3, "b.jsonl")
    extra = np.random.default_rng([3, _key("b.jsonl"), 1]).permutation(20)[:10]
    assert first == _expected("random:10", [f"a{i}" for i in range(N)], 3, "a.json") + taken + [taken[k]
                                                                                                  for k in extra]


def test_per_source_image_folder_and_the_start_up_table(parts, tmp_path, caplog):
    colours = {"red": (250, 0, 0), "blue": (0, 0, 250)}
    for name, colour in colours.items():
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64), colour).save(tmp_path / name / "x.png")
    rec = [{"id": "img", "image": "x.png", "conversations": _conv("<image>\nWhich colour?", "this one")}]
    (tmp_path / "img.json").write_text(json.dumps(rec))
    (tmp_path / "text.json").write_text(json.dumps(_records("t", 4)))
    mix = _mixture(tmp_path / "mix.yaml", [
        {"json_path": "img.json", "sampling_strategy": "all"},  # --image_folder (red)
        {"json_path": "img.json", "sampling_strategy": "all", "image_folder": "blue"},
        {"json_path": "text.json", "sampling_strategy": "first:50%"}])
    with caplog.at_level("INFO", logger="llava.data.dataset"):
        ds = _dataset(parts, mix, tmp_path / "red")
    assert _ids(ds) == ["img", "img", "t0", "t1"]
    processor = parts[1]
    for i, name in ((0, "red"), (1, "blue")):
        pixels = ds[i]["pixel_values"]
        ref = processor(images=[Image.new("RGB", (64, 64), colours[name])], return_tensors="pt")["pixel_values"]
        assert np.allclose(pixels.numpy(), ref.numpy(), atol=1e-6), name
    lines = [line.split() for line in caplog.text.splitlines()]
    rows = {tuple(line[:3]): line[3:] for line in lines if line[:1] == ["entry"]}
    tokens = [int(ds.lengths[i]) for i in range(4)]
    assert rows[("entry", "1", "(img.json)")] == ["all", "1", "1", "1", "1", "0", "0", f"{tokens[0]:,}"]
    assert rows[("entry", "3", "(text.json)")] == ["first:50%", "4", "2", "2", "0", "0", "2",
                                                   f"{tokens[2] + tokens[3]:,}"]


def test_only_the_rows_taken_are_validated_and_problems_name_the_entry(parts, tmp_path):
    records = _records("a", 6) + [{"id": "broken", "conversations": _conv("no answer", "")}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    ok = _dataset(parts, _mixture(tmp_path / "ok.yaml", [{"json_path": "a.json", "sampling_strategy": "first:6"}]))
    assert len(ok) == 6 and not ok.problems.counts
    with pytest.raises(DataError, match=r"entry 1 \(a.json\): record 'broken'"):
        _dataset(parts, _mixture(tmp_path / "all.yaml", [{"json_path": "a.json", "sampling_strategy": "end:2"}]))


def test_a_video_entry_without_video_on_is_reported_naming_it(parts, tmp_path):
    """Video records parse in a mixture (no refusal); without --video_folder (video off) each is a problem that
    names its entry, and ``--on_bad_sample skip`` trains the rest."""
    (tmp_path / "a.json").write_text(json.dumps(_records("a", 3)))
    video = [{"id": "v1", "video": "clip.mp4", "conversations": _conv("<image>\nWhat happens?", "A dog runs.")}]
    (tmp_path / "video.json").write_text(json.dumps(video))
    mix = _mixture(tmp_path / "mix.yaml", [{"json_path": "a.json"}, {"json_path": "video.json"}])
    with pytest.raises(DataError) as info:
        _dataset(parts, mix)
    assert "video_not_enabled: 1 record(s)" in str(info.value)
    assert "entry 2 (video.json): record 'v1' has a video but --video_folder is not set" in str(info.value)
    ds = _dataset(parts, mix, on_bad_sample="skip")
    assert _ids(ds) == ["a0", "a1", "a2"] and dict(ds.problems.counts) == {"video_not_enabled": 1}


def test_video_from_a_mixture_is_read_once_per_version_of_the_yaml(tmp_path):
    """An entry's own video_folder turns video on; start-up asks at several places, and the YAML is read once per
    version: asked again, the cached answer; after an edit, the edited file's."""
    from types import SimpleNamespace

    from llava.data.video_flags import _yaml_gives_video_folder, video_enabled

    mix = _mixture(tmp_path / "mix.yaml", [{"json_path": "a.json"}])
    args = SimpleNamespace(data_path=str(mix), eval_data_path=None, video_folder=None)
    before = _yaml_gives_video_folder.cache_info()
    assert not video_enabled(args) and not video_enabled(args)
    after = _yaml_gives_video_folder.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    _mixture(mix, [{"json_path": "a.json"}, {"json_path": "v.json", "video_folder": "videos"}])
    assert video_enabled(args)
    assert not video_enabled(SimpleNamespace(data_path=str(tmp_path / "gone.yaml"), video_folder=None))


def test_editing_one_source_reindexes_only_it_and_a_restart_reads_no_data_bytes(parts, tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in _records(name, 20)) + "\n")
    mix = _mixture(tmp_path / "mix.yaml", [{"json_path": "a.jsonl"}, {"json_path": "b.jsonl", "sampling_strategy":
                                                                     "first:5"}])
    cache = tmp_path / "cache"
    assert _dataset(parts, mix, cache=cache).sources_from_cache == [False, False]
    hashed = []
    real = index_module.file_digest
    monkeypatch.setattr(index_module, "file_digest", lambda p: hashed.append(Path(p).name) or real(p))
    again = _dataset(parts, mix, cache=cache)
    assert again.sources_from_cache == [True, True] and hashed == []  # metadata only
    with (tmp_path / "b.jsonl").open("a") as f:
        f.write(json.dumps({"id": "new", "conversations": _conv("hi", "there")}) + "\n")
    edited = _dataset(parts, mix, cache=cache)
    assert edited.sources_from_cache == [True, False] and hashed == ["b.jsonl"]
    assert _ids(edited) == _ids(again)  # first:5 of b is unchanged by an appended record


@pytest.mark.parametrize("entry, message", [
    ({"json_path": "a.json", "sampling_strategy": "middle:5"}, r"entry 2 \(a.json\): sampling_strategy 'middle:5'"),
    ({"json_path": "a.json", "sampling_strategy": "first:-1"}, r"entry 2 \(a.json\): sampling_strategy"),
    ({"json_path": "a.json", "weight": 2}, r"entry 2 \(a.json\): unknown key\(s\) weight"),
    ({"json_path": "missing.json"}, r"entry 2 \(missing.json\): json_path missing.json does not exist"),
    ({"json_path": "a.json", "repeat": 0}, r"entry 2 \(a.json\): repeat must be a number > 0"),
    ({"json_path": "a.json", "image_folder": "nowhere"}, r"entry 2 \(a.json\): image_folder nowhere does not exist"),
])
def test_mixture_mistakes_are_one_line_errors_naming_the_entry(tmp_path, entry, message):
    (tmp_path / "a.json").write_text("[]")
    mix = _mixture(tmp_path / "mix.yaml", [{"json_path": "a.json"}, entry])
    with pytest.raises(UsageError, match=message) as info:
        source_specs(mix, flag="--eval_data_path")
    assert str(info.value).startswith(f"--eval_data_path {mix}, entry 2") and "\n" not in str(info.value)


def test_playground_mixture_example_reads_json_and_embedded_sources(parts, shapes_data, tmp_path):
    """playground/mixture.yaml over the shapes data (its Parquet source written by playground/make_demo_parquet.py):
    per-entry counts as LLaVA-NeXT takes them, the embedded source's samples equal to the same records from files."""
    sys.path.insert(0, str(REPO / "playground"))
    from make_demo_parquet import write_embedded_parquet

    shapes = Path(shapes_data["image_folder"])
    data = tmp_path / "data" / "shapes"  # the layout playground/mixture.yaml expects, the images left in the fixture
    data.mkdir(parents=True)
    for name in ("stage2_qa", "stage1_captions"):
        (data / f"{name}.json").symlink_to(shapes_data[name])
    write_embedded_parquet(shapes_data["stage2_qa"], shapes, data / "stage2_qa_embedded.parquet")
    mix = tmp_path / "mixture.yaml"
    mix.write_text((REPO / "playground" / "mixture.yaml").read_text())
    ds = _dataset(parts, mix, shapes, seed=0)
    qa = [str(r["id"]) for r in json.loads(Path(shapes_data["stage2_qa"]).read_text())]
    captions = [str(r["id"]) for r in json.loads(Path(shapes_data["stage1_captions"]).read_text())]
    tail = _expected("end:10%", qa, 0, "")
    expected = _expected("random:50%", qa, 0, "data/shapes/stage2_qa.json") + captions[:200] + tail * 2
    assert _ids(ds) == expected
    files = _dataset(parts, shapes_data["stage2_qa"], shapes)
    k = len(ds) - len(tail)  # the second copy of the embedded tail; its records from the JSON + image folder:
    for i, rid in enumerate(tail):
        j = qa.index(rid)
        a, b = ds[k + i], files[j]
        assert ds.lengths[k + i] == files.lengths[j]
        assert (a["pixel_values"] is None) == (b["pixel_values"] is None)
        if a["pixel_values"] is not None:
            assert np.array_equal(a["pixel_values"].numpy(), b["pixel_values"].numpy())


def test_data_check_reports_each_entry_on_the_rows_it_takes(tiny_models, tmp_path, capsys):
    from llava.data_check import check_main

    records = _records("a", 6) + [{"id": "broken", "conversations": _conv("no answer", "")}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in _records("b", 10)))
    mix = _mixture(tmp_path / "mix.yaml", [{"json_path": "a.json", "sampling_strategy": "first:6"},
                                           {"json_path": "b.jsonl", "sampling_strategy": "random:30%"},
                                           {"json_path": "a.json", "sampling_strategy": "end:50%"}])
    flags = ["--data_path", str(mix), "--model_name_or_path", str(tiny_models["llm"]), "--vision_tower",
             str(tiny_models["vision_tower"]), "--seed", "5", "--json"]
    assert check_main(flags) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(s["entry"], s["json_path"], s["sampling"], s["ok"], s["stats"]["records"]) for s in report["sources"]] == [
        (1, "a.json", "first:6", True, 6), (2, "b.jsonl", "random:30%", True, 3), (3, "a.json", "end:50%", False, 4)]
    assert report["sources"][2]["problems"]["empty_text"]["record_ids"] == ["broken"] and not report["ok"]
    assert check_main(flags[:-1]) == 1
    text = capsys.readouterr().out
    assert "== entry 3 (a.json), sampling end:50%\n[error] empty_text: 1 record(s), first: broken" in text
    assert text.count("OK: nothing would stop training") == 2


def test_sources_converted_side_by_side_equal_one_by_one(tmp_path):
    """``convert_sources`` (two children at a time) writes the Arrow files and bad lines ``open_records`` writes for
    each source alone; a source that cannot be read is raised after the others are done."""
    paths = []
    for k in range(3):
        lines = [json.dumps(r) for r in _records(f"s{k}", 30 + k)]
        lines.insert(5 + k, "{not json")
        (tmp_path / f"s{k}.jsonl").write_text("\n".join(lines) + "\n")
        paths.append(tmp_path / f"s{k}.jsonl")
    (tmp_path / "list.json").write_text(json.dumps(_records("j", 12)))
    paths.append(tmp_path / "list.json")
    digests = [index_module.file_digest(p) for p in paths]
    side = tmp_path / "side"
    index_module.convert_sources(list(zip(paths, digests)), side, workers=2)
    arrows = sorted(p.name for p in side.glob("records-*"))
    assert len(arrows) == 2 * len(paths)  # an .arrow and its .json per source, before anything opened them
    alone = tmp_path / "alone"
    for path, digest in zip(paths, digests):
        got, ref = index_module.open_records(path, side, digest), index_module.open_records(path, alone, digest)
        assert list(got) == list(ref) and got.bad_lines == ref.bad_lines
        assert Path(got.path).read_bytes() == Path(ref.path).read_bytes()
    assert [len(index_module.open_records(p, side, d).bad_lines) for p, d in zip(paths, digests)] == [1, 1, 1, 0]
    (tmp_path / "broken.json").write_text("[{")
    broken = [(tmp_path / "broken.json", "b" * 64), (paths[0], "c" * 64)]
    with pytest.raises(DataError, match="broken.json"):
        index_module.convert_sources(broken, tmp_path / "third", workers=1)
    assert (tmp_path / "third" / f"records-{'c' * 64}.arrow").is_file()  # the source after it was converted
