"""Embedded images: a LLaVA-OneVision-Data-shaped Parquet dataset (and a `datasets` Image dir) trains like JSON + files.

    .venv/bin/python -m pytest -q tests/data/test_parquet.py

The Parquet files are written here with pyarrow as LLaVA-OneVision-Data's are (``id``, ``image`` as a
``{bytes, path}`` struct, ``conversations`` as a list of ``{from, value}``), PNG and JPEG bytes, text-only, single-
and multi-image rows (a second file with an ``images`` list), one row whose bytes are no image and one whose PNG is
cut short. The reference is the same records given as JSON + an image folder holding the same bytes as files.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from llava.data.anyres import AnyresLayout, build_anyres_image_processor
from llava.data.dataset import LazySupervisedDataset
from llava.data.records import EmbeddedImage
from llava.data.templates import get_template
from llava.model.builder import add_multimodal_tokens


def _image_bytes(seed: int, size: tuple[int, int], fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def ov_data(tmp_path_factory) -> dict:
    """``{"parquet": dir, "json": file, "folder": images of the JSON twin, "arrow": save_to_disk dir}``."""
    root = tmp_path_factory.mktemp("ov")
    png = _image_bytes(1, (64, 48), "PNG")
    single = {  # id -> image bytes (None: text-only)
        "r0": png, "r1": _image_bytes(2, (40, 64), "JPEG"), "r2": None, "r3": _image_bytes(3, (64, 64), "PNG"),
        "r4": b"this is not an image", "r5": _image_bytes(5, (80, 40), "JPEG"), "r6": png[: len(png) // 2],
        "r7": _image_bytes(7, (33, 65), "PNG")}
    multi = {"m0": [_image_bytes(10, (64, 64), "PNG"), _image_bytes(11, (48, 64), "JPEG")],
             "m1": [_image_bytes(12, (50, 50), "JPEG"), _image_bytes(13, (64, 32), "PNG")],
             "m2": [_image_bytes(14, (70, 64), "PNG")]}
    images = root / "images"
    images.mkdir()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    conv_type = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    rows, twin = [], []
    for k, (rid, data) in enumerate(single.items()):
        conv = _conv("<image>\nWhat is in the picture?" if data else "Count to three.", f"answer {k} " * (k + 1))
        rows.append({"id": rid, "image": None if data is None else {"bytes": data, "path": f"{rid}.img"},
                     "conversations": conv, "data_source": "ov"})
        if rid == "r4":  # its bytes are no image: the index drops it (its header is read); files are only stat-ed
            continue
        twin.append({"id": rid, "conversations": conv})
        if data is not None:
            (images / f"{rid}.img").write_bytes(data)
            twin[-1]["image"] = f"{rid}.img"
    (root / "ov").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("image", struct),
                                                                ("conversations", conv_type),
                                                                ("data_source", pa.string())])),
                   root / "ov" / "part-00000.parquet", row_group_size=3)
    rows = []
    for k, (rid, datas) in enumerate(multi.items()):
        conv = _conv(" ".join(["<image>"] * len(datas)) + "\nCompare them.", f"they differ {k}")
        rows.append({"id": rid, "images": [{"bytes": d, "path": None} for d in datas], "conversations": conv})
        names = [f"{rid}_{j}.img" for j in range(len(datas))]
        for name, d in zip(names, datas):
            (images / name).write_bytes(d)
        twin.append({"id": rid, "images": names, "conversations": conv})
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("images", pa.list_(struct)),
                                                                ("conversations", conv_type)])),
                   root / "ov" / "part-00001.parquet")
    (root / "twin.json").write_text(json.dumps(twin))
    import datasets

    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": [{"from": datasets.Value("string"),
                                                     "value": datasets.Value("string")}]})
    good = [r for r in twin if "image" in r and r["id"] != "r6"]
    arrow = datasets.Dataset.from_dict({"id": [r["id"] for r in good],
                                        "image": [{"bytes": single[r["id"]], "path": None} for r in good],
                                        "conversations": [r["conversations"] for r in good]}, features=features)
    arrow.save_to_disk(str(root / "arrow"))
    return {"parquet": root / "ov", "json": root / "twin.json", "folder": images, "arrow": root / "arrow",
            "good": [r["id"] for r in good]}


@pytest.fixture(scope="module")
def parts(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    add_multimodal_tokens(tok, False)
    return tok, AutoImageProcessor.from_pretrained(tiny_models["vision_tower"])


def _dataset(parts, data_path, folder=None, *, cache=None, anyres=None, processor=None, workers=1):
    tok, tower_processor = parts
    return LazySupervisedDataset(data_path, tok, template=get_template("vicuna_v1"),
                                 image_processor=processor or tower_processor, image_folder=folder,
                                 image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=16,
                                 model_max_length=512, on_bad_sample="skip", show_progress=False,
                                 index_cache_dir=cache, index_workers=workers, anyres=anyres)


def _same_samples(a, b) -> None:
    assert len(a) == len(b) and a.lengths == b.lengths and a.modality_lengths == b.modality_lengths
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert set(x) == set(y), i
        for key in x:
            if x[key] is None:
                assert y[key] is None
            else:
                np.testing.assert_array_equal(x[key].numpy(), y[key].numpy(), err_msg=f"sample {i} {key}")


@pytest.mark.parametrize("cache", [False, True])
def test_parquet_samples_equal_json_and_files_and_name_the_bad_row(parts, ov_data, tmp_path, cache):
    cache_dir = tmp_path / "cache" if cache else None
    embedded = _dataset(parts, ov_data["parquet"], cache=cache_dir, workers=2 if cache else 1)
    files = _dataset(parts, ov_data["json"], ov_data["folder"])
    assert [embedded.record(i).id for i in range(len(embedded))] == [files.record(i).id for i in range(len(files))]
    assert isinstance(embedded.record(0).images[0], EmbeddedImage)
    assert dict(embedded.problems.counts) == {"image_unreadable": 1} and not files.problems.counts
    assert embedded.problems.ids["image_unreadable"] == ["r4"]
    assert "part-00000.parquet#row=4/image[0]" in embedded.problems.examples["image_unreadable"][0]
    _same_samples(embedded, files)  # r6 (cut short) fails in both and is replaced by the next sample
    failed = embedded.runtime_failures.examples["image_truncated"][0]
    assert "part-00000.parquet#row=6/image[0]" in failed and "(record 'r6')" in failed
    if cache:
        assert not list(cache_dir.glob("records-*"))  # nothing written but the index
        assert len(list(cache_dir.glob("index-*.npz"))) == 1
        assert _dataset(parts, ov_data["parquet"], cache=cache_dir).index_from_cache


def test_datasets_image_feature_dir_equals_json_and_files(parts, ov_data, tmp_path):
    embedded = _dataset(parts, ov_data["arrow"], cache=tmp_path / "cache")
    files = _dataset(parts, ov_data["json"], ov_data["folder"])
    keep = [i for i in range(len(files)) if files.record(i).id in ov_data["good"]]
    assert [embedded.record(i).id for i in range(len(embedded))] == ov_data["good"]
    for i, j in enumerate(keep):
        np.testing.assert_array_equal(embedded[i]["pixel_values"].numpy(), files[j]["pixel_values"].numpy())
        assert embedded.lengths[i] == files.lengths[j]


def test_anyres_counts_from_embedded_headers_equal_the_files(parts, ov_data, tiny_models):
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig.from_pretrained(tiny_models["vision_tower"])
    side = config.image_size
    layout = AnyresLayout.from_vision_config(config, "default", [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
                                             max_num_patches=None)
    processor = build_anyres_image_processor(layout, parts[1])
    embedded = _dataset(parts, ov_data["parquet"], anyres=layout, processor=processor)
    files = _dataset(parts, ov_data["json"], ov_data["folder"], anyres=layout, processor=processor)
    assert len(set(embedded.lengths)) > 3  # image sizes differ, so do the anyres counts
    _same_samples(embedded, files)


def test_data_check_flags_the_corrupt_rows_by_id_and_file(parts, ov_data, tiny_models, capsys):
    from llava.data_check import check_main

    code = check_main(["--data_path", str(ov_data["parquet"]), "--model_name_or_path", str(tiny_models["llm"]),
                       "--vision_tower", str(tiny_models["vision_tower"]), "--model_max_length", "512", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["stats"]["records"] == 11
    problems = report["problems"]
    assert problems["image_unreadable"]["record_ids"] == ["r4"]
    assert problems["image_truncated"]["record_ids"] == ["r6"]
    assert "part-00000.parquet#row=6/image[0]" in problems["image_truncated"]["messages"][0]
    assert set(problems) == {"image_unreadable", "image_truncated"}


def _argv(tiny_models, data_path, out, *extra, folder=None) -> list[str]:
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(data_path), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--max_steps", "4", "--learning_rate", "1e-3", "--logging_steps",
            "1", "--save_steps", "2", "--report_to", "none", "--model_max_length", "512", "--use_cpu", "True",
            "--seed", "0", "--on_bad_sample", "skip", *(["--image_folder", str(folder)] if folder else []), *extra]


def _losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def test_parquet_trains_resumes_and_matches_json_losses(tiny_models, ov_data, tmp_path):
    from llava.train.train import train

    reference = _losses(train(_argv(tiny_models, ov_data["json"], tmp_path / "json", folder=ov_data["folder"])))
    out = tmp_path / "parquet"
    embedded = _losses(train(_argv(tiny_models, ov_data["parquet"], out, "--dataloader_num_workers", "2")))
    assert sorted(reference) == [1, 2, 3, 4]
    for step in reference:
        assert embedded[step] == pytest.approx(reference[step], abs=1e-6), step
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = _losses(train(_argv(tiny_models, ov_data["parquet"], resumed_dir, "--resume_from_checkpoint",
                                  str(resumed_dir / "checkpoint-2"))))
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    report = json.loads((out / "bad_samples.json").read_text())
    assert report["invalid_records"]["counts"] == {"image_unreadable": 1}
    assert Path(out / "config.json").is_file()


def test_datasetdict_dir_reads_train_or_the_split_named_by_its_folder(parts, ov_data, tiny_models, tmp_path, capsys):
    """A ``DatasetDict.save_to_disk`` directory gives its ``train`` split, ``DIR/validation`` that split (samples
    equal to the JSON + files twin's); with no ``train`` split a one-line error names dataset_dict.json and the splits."""
    import datasets

    from llava.cli import main as cli_main
    from llava.data.records import ORIGIN_KEY
    from llava.data.stores import open_table_store
    from llava.errors import UsageValueError

    saved = datasets.load_from_disk(str(ov_data["arrow"]))
    n = len(saved)
    datasets.DatasetDict({"validation": saved.select(range(n - 2, n)), "train": saved.select(range(n - 2))}
                         ).save_to_disk(str(tmp_path / "dict"))
    files = _dataset(parts, ov_data["json"], ov_data["folder"])
    twin = {files.record(j).id: j for j in range(len(files))}
    for path, ids in ((tmp_path / "dict", ov_data["good"][:-2]), (tmp_path / "dict" / "validation", ov_data["good"][-2:])):
        embedded = _dataset(parts, path, cache=tmp_path / "cache")
        assert [embedded.record(i).id for i in range(len(embedded))] == ids
        for i, rid in enumerate(ids):
            np.testing.assert_array_equal(embedded[i]["pixel_values"].numpy(), files[twin[rid]]["pixel_values"].numpy())
    assert open_table_store(tmp_path / "dict")[1][ORIGIN_KEY] == "dict/train#row=1"
    assert open_table_store(tmp_path / "dict" / "validation")[0][ORIGIN_KEY] == "dict/validation#row=0"

    datasets.DatasetDict({"validation": saved, "test": saved}).save_to_disk(str(tmp_path / "no_train"))
    listing = tmp_path / "no_train" / "dataset_dict.json"
    with pytest.raises(UsageValueError, match="no 'train' split") as err:
        _dataset(parts, tmp_path / "no_train")
    assert str(listing) in str(err.value) and "validation, test" in str(err.value)
    assert cli_main(["data", "check", "--data_path", str(tmp_path / "no_train"), "--model_name_or_path",
                     str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
                     "--model_max_length", "512"]) == 2
    assert str(listing) in capsys.readouterr().err


def test_parquet_packed_losses_equal_padded(tiny_models, ov_data, tmp_path):
    """``--packing`` with ``--group_by_modality_length`` on the Parquet source (multi-image rows, a corrupt row
    skipped, a truncated one replaced): each step's loss equals the padded run's, to the 1e-5 of
    tests/train/test_packing.py (SGD, so that the steps do not amplify the rows' rounding)."""
    from llava.data.collator import DataCollatorWithPacking
    from llava.train.train import train

    def run(out, *extra):
        argv = _argv(tiny_models, ov_data["parquet"], out, "--group_by_modality_length", "True", "--optim", "sgd",
                     "--lr_scheduler_type", "constant", "--max_grad_norm", "0", *extra)
        argv[argv.index("--max_steps") + 1] = "3"
        argv[argv.index("--learning_rate") + 1] = "0.1"
        argv[argv.index("--save_steps"):argv.index("--save_steps") + 2] = ["--save_strategy", "no"]
        return train(argv)

    padded = run(tmp_path / "padded")
    packed = run(tmp_path / "packed", "--packing", "True")
    assert isinstance(packed.data_collator, DataCollatorWithPacking)
    assert not isinstance(padded.data_collator, DataCollatorWithPacking)
    a, b = _losses(padded), _losses(packed)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert len(set(a.values())) == 3  # the steps differ (batches of one modality each, and it trained)
    print(f"padded {a} packed {b} max abs diff {max(abs(a[s] - b[s]) for s in a):.2e}")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5, rel=0), step
