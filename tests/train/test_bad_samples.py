"""Bad input never kills a run or loses work: skip/error on the bad corpus, images failing mid-run, kill -9 mid-save.

    .venv/bin/pytest tests/train/test_bad_samples.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor

from llava.data.dataset import DataError, LazySupervisedDataset
from llava.train.train import train


def argv(tiny_models, data_path, image_folder, out, *extra, steps=4, max_len=64) -> list[str]:
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(data_path), "--image_folder", str(image_folder),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", str(steps),
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "1000", "--report_to", "none",
            "--model_max_length", str(max_len), "--use_cpu", "True", "--seed", "0", *extra]


def test_skip_trains_and_reports_counts(tiny_models, bad_corpus, tmp_path):
    out = tmp_path / "skip"
    trainer = train(argv(tiny_models, bad_corpus["data_path"], bad_corpus["image_folder"], out, "--on_bad_sample",
                         "skip", steps=5))  # 5 x 4 = 20 draws > the 17 kept samples: every sample is read
    assert trainer.state.global_step == 5
    report = json.loads((out / "bad_samples.json").read_text())
    assert report["invalid_records"]["counts"] == {
        "invalid_json": 1, "missing_conversations": 1, "bad_type": 1, "bad_role": 1, "bad_role_order": 1,
        "no_assistant_turn": 1, "empty_text": 1, "image_token_mismatch": 1, "image_missing": 1,
        "image_absolute_path": 1, "image_outside_folder": 1}
    assert report["cannot_train"]["counts"] == {"image_tokens_exceed_max_length": 1, "no_supervised_tokens": 1}
    assert report["failed_during_training"]["counts"] == {"image_unreadable": 1, "image_truncated": 1,
                                                          "image_too_large": 1}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 5 and all(0 < loss < 100 for loss in losses)  # never a silent zero loss


def test_error_stops_before_step_one_with_the_report(tiny_models, bad_corpus, tmp_path):
    out = tmp_path / "error"
    with pytest.raises(DataError) as info:
        train(argv(tiny_models, bad_corpus["data_path"], bad_corpus["image_folder"], out))
    message = str(info.value)
    for kind in ("invalid_json", "image_missing", "image_outside_folder", "bad_role_order", "no_assistant_turn"):
        assert f"{kind}: 1 record(s)" in message
    assert "'missing'" in message and "line 4" in message
    assert not (out / "trainer_state.json").exists() and not list(out.glob("checkpoint-*"))


def test_image_deleted_mid_run_is_replaced_by_next_sample_and_counted(tiny_models, shapes_data, tmp_path):
    from llava.data_check import build_parser, load_token_setup

    folder = tmp_path / "images"
    shutil.copytree(shapes_data["image_folder"], folder)
    records = json.loads(Path(shapes_data["stage2_qa"]).read_text())[:6]
    records = [r for r in records if "image" in r][:4]
    data_path = tmp_path / "d.json"
    data_path.write_text(json.dumps(records))
    args, _ = build_parser().parse_known_args(["--data_path", str(data_path), "--model_name_or_path",
                                               str(tiny_models["llm"]), "--vision_tower",
                                               str(tiny_models["vision_tower"]), "--model_max_length", "256"])
    setup = load_token_setup(args)
    ds = LazySupervisedDataset(data_path, setup.tokenizer, template=setup.template,
                               image_processor=AutoImageProcessor.from_pretrained(tiny_models["vision_tower"]),
                               image_folder=folder, image_token_id=setup.image_token_id,
                               num_image_tokens=setup.num_image_tokens, model_max_length=256, show_progress=False)
    expected_next = ds[2]
    (folder / records[1]["image"]).unlink()
    got = ds[1]
    assert torch.equal(got["input_ids"], expected_next["input_ids"])
    assert torch.equal(got["pixel_values"], expected_next["pixel_values"])
    assert ds.runtime_failures.counts == {"image_missing": 1}
    assert torch.equal(ds[1]["input_ids"], expected_next["input_ids"])  # remembered: not counted twice
    assert ds.runtime_failures.counts == {"image_missing": 1}


def logged_losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"'loss': '?([0-9.]+)", text)]


def test_sigkill_mid_save_resumes_from_last_complete_checkpoint(tiny_models, shapes_data, tmp_path):
    out = tmp_path / "run"
    flags = argv(tiny_models, shapes_data["stage2_qa"], shapes_data["image_folder"], out, steps=6, max_len=256)
    flags[flags.index("--save_steps") + 1] = "2"
    here = Path(__file__).resolve().parent  # pause_in_save.py: train with a pause mid-save of checkpoint-4
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parents[1]), str(here)]), PYTHONUNBUFFERED="1")
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pause_in_save", "--pause_in_save", "4:120", *flags], stdout=f,
                                stderr=subprocess.STDOUT, env=env)
    marker = out / "checkpoint-4.tmp" / "checkpoint-4" / "PAUSED"
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_losses = logged_losses(log.read_text())
    assert len(killed_losses) == 4  # steps 1..4 logged before the save of checkpoint-4
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and not (out / "checkpoint-4").exists()

    complete = out / "checkpoint-2" / "trainer_state.json"
    before = (complete.stat().st_ino, complete.stat().st_mtime_ns)
    resumed = train([*flags, "--resume_from_checkpoint", "True"])
    history = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert resumed.state.global_step == 6 and sorted(history) == [1, 2, 3, 4, 5, 6]
    # continued from checkpoint-2 (a run from scratch would have rewritten it at step 2)
    assert (complete.stat().st_ino, complete.stat().st_mtime_ns) == before
    assert history[3] == pytest.approx(killed_losses[2], rel=1e-3) and history[4] == pytest.approx(killed_losses[3],
                                                                                                    rel=1e-3)
    assert (out / "checkpoint-4" / "trainer_state.json").is_file() and not (out / "checkpoint-4.tmp").exists()
