"""Training curves: ``curves.png`` at the end and beside each checkpoint, one point per logged step (read back from the
figure's lines and compared with ``trainer_state.json``); ``llava plot`` overlays runs; training without matplotlib
writes no picture, says so once, and trains the same.

    .venv/bin/pytest tests/train/test_curves.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from llava.cli import main as cli_main
from llava.curves import matplotlib_available

needs_matplotlib = pytest.mark.skipif(not matplotlib_available(), reason="the plot extra (pip install 'llava[plot]') "
                                      "draws the curves")

STEPS = 4


def curves_argv(tiny_models, shapes_data, out) -> list[str]:
    """Groups at their own rates (projector 2e-3, LM 1e-3, the vision tower 5e-4 with layer decay 0.5: one group
    per tower layer), eval every 2 steps, saves every 2."""
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(shapes_data["stage2_qa"]),
            "--eval_data_path", str(shapes_data["heldout_qa"]), "--eval_strategy", "steps", "--eval_steps", "2",
            "--per_device_eval_batch_size", "16", "--image_folder", str(shapes_data["image_folder"]),
            "--output_dir", str(out), "--per_device_train_batch_size", "8", "--max_steps", str(STEPS),
            "--learning_rate", "1e-3", "--mm_projector_lr", "2e-3", "--lr_scheduler_type", "linear",
            "--mm_tunable_parts", "mm_vision_tower,mm_mlp_adapter,mm_language_model", "--mm_vision_tower_lr", "5e-4",
            "--mm_vision_tower_lr_decay", "0.5",
            "--logging_steps", "1", "--save_steps", "2", "--report_to", "none", "--model_max_length", "256",
            "--use_cpu", "True", "--seed", "0", "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module")
def run(tiny_models, shapes_data, tmp_path_factory):
    from llava.train.train import train

    out = tmp_path_factory.mktemp("curves_run")
    train(curves_argv(tiny_models, shapes_data, out))
    return out


def expected_lines(history: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """The points each panel should draw, read straight from the log history."""
    def points(key):
        rows = [e for e in history if key in e]
        return [e["step"] for e in rows], [e[key] for e in rows]

    lr_keys = sorted({k for e in history for k in e if k.startswith("learning_rate/")})
    return {"loss": {"train loss": points("loss"), "eval loss": points("eval_loss")},
            "learning rate": {k.split("/", 1)[1]: points(k) for k in lr_keys},
            "grad norm": {"grad norm": points("grad_norm")}}


@needs_matplotlib
@pytest.mark.parametrize("where", ["", "checkpoint-2", "checkpoint-4"])
def test_curves_beside_the_run_and_each_checkpoint(run, where):
    folder = run / where if where else run
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    drawn = json.loads((folder / "curves.json").read_text())
    expected = expected_lines(history)
    last = int(where.split("-")[1]) if where else STEPS
    assert expected["loss"]["train loss"][0] == list(range(1, last + 1))  # one point per logged step
    assert expected["loss"]["eval loss"][0] == list(range(2, last + 1, 2))
    assert set(expected["learning rate"]) == {"projector", "language model", "vision tower"}
    for panel, lines in expected.items():
        assert set(drawn[panel]) == set(lines), panel
        for name, (steps, values) in lines.items():
            assert drawn[panel][name]["steps"] == steps and drawn[panel][name]["values"] == pytest.approx(values)
    projector, lm, tower = (drawn["learning rate"][k]["values"] for k in ("projector", "language model", "vision tower"))
    assert projector == pytest.approx([2 * v for v in lm])  # the same linear schedule at twice the rate
    assert tower == pytest.approx([v / 2 for v in lm])  # the tower's top layer (its highest rate): 5e-4
    with Image.open(folder / "curves.png") as image:
        image.load()
        assert image.size == (1300, 380)


@needs_matplotlib
def test_llava_plot_overlays_runs(run, tmp_path, capsys):
    from llava.curves import plot_runs, read_log_history

    out = tmp_path / "two.png"
    assert cli_main(["plot", str(run), str(run / "checkpoint-2"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as image:
        image.load()
    drawn = plot_runs({"a": read_log_history(run), "b": read_log_history(run / "checkpoint-2")}, tmp_path / "x.png")
    assert drawn["loss"]["a: train loss"]["steps"] == [1, 2, 3, 4] and drawn["loss"]["b: train loss"]["steps"] == [1, 2]
    assert cli_main(["plot", str(tmp_path), "--out", str(tmp_path / "y.png")]) == 2  # not a training run
    assert "trainer_state.json" in capsys.readouterr().err


def test_plot_reads_a_megatron_run_and_the_latest_checkpoint(tmp_path):
    """``llava plot`` takes the log history of a ``--backend megatron`` run (``megatron_state.json``), and of a run
    whose final ``trainer_state.json`` is missing (its latest checkpoint's)."""
    from llava.curves import read_log_history

    history = [{"step": 1, "loss": 2.0, "learning_rate": 1e-3, "grad_norm": 1.5}, {"step": 2, "eval_loss": 1.9}]
    megatron = tmp_path / "megatron_run"
    megatron.mkdir()
    (megatron / "megatron_state.json").write_text(json.dumps({"log_history": history, "memory": []}))
    assert read_log_history(megatron) == history
    hf = tmp_path / "hf_run"
    for step, n in ((2, 1), (10, 2)):  # checkpoint-10 is the latest, though "checkpoint-2" sorts after it as text
        (hf / f"checkpoint-{step}").mkdir(parents=True)
        (hf / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": history[:n]}))
    assert read_log_history(hf) == history


BLOCKED = """
import sys
sys.modules["matplotlib"] = None  # as if the plot extra were not installed
from llava.train.train import train
train(sys.argv[1:])
"""


def test_training_without_matplotlib_says_so_once(tiny_models, shapes_data, tmp_path):
    out = tmp_path / "run"
    argv = curves_argv(tiny_models, shapes_data, out)
    argv[argv.index("--max_steps") + 1] = "2"
    argv[argv.index("--save_steps") + 1] = "1"  # two checkpoints and the final save: three saves, one notice
    done = subprocess.run([sys.executable, "-c", BLOCKED, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("matplotlib is not installed") == 1
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2" / "model.safetensors").is_file()
    assert not list(out.rglob("curves.*"))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2]


PLOT_BLOCKED = """
import sys
sys.modules["matplotlib"] = None  # as if the plot extra were not installed
from llava.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_llava_plot_without_matplotlib_says_what_to_install(tmp_path):
    """``llava plot`` on a run (a Megatron run's history here) without matplotlib: exit 2, one line naming the extra."""
    run = tmp_path / "megatron_run"
    run.mkdir()
    (run / "megatron_state.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 2.0}]}))
    done = subprocess.run([sys.executable, "-c", PLOT_BLOCKED, "plot", str(run), "--out", str(tmp_path / "c.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "llava plot needs matplotlib: pip install 'llava[plot]'" in done.stderr
    assert not (tmp_path / "c.png").exists()
