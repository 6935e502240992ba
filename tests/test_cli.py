"""The `llava` command as people use it: one-line input errors with exit code 2, fast help, LLaVA flags first.

    .venv/bin/pytest tests/test_cli.py

Each subcommand is fed its usual mistakes in-process (``llava.cli.main``, what the console script calls); two
subprocesses check what needs a fresh interpreter: help without importing torch, and the launcher entry point
``python -m llava.train.train``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llava.cli import main
from llava.errors import UsagePathError

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys, argv: list[str], prefix: str) -> str:
    """Run ``llava ARGV``; assert exit code 2 and exactly one ``llava CMD: error:`` line on stderr, no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if re.match(r"llava[\w -]*: error: ", line)]
    assert len(errors) == 1 and errors[0].startswith(prefix + ": error: "), err
    return errors[0]


@pytest.fixture(scope="module")
def train_paths(tiny_models, shapes_data, tmp_path_factory) -> dict:
    return {"llm": str(tiny_models["llm"]), "tower": str(tiny_models["vision_tower"]),
            "data": str(shapes_data["stage2_qa"]), "images": str(shapes_data["image_folder"]),
            "out": str(tmp_path_factory.mktemp("cli_train_out"))}


def _train_argv(p: dict, *, drop: tuple[str, ...] = (), **flags: str) -> list[str]:
    base = {"--model_name_or_path": p["llm"], "--vision_tower": p["tower"], "--data_path": p["data"],
            "--image_folder": p["images"], "--output_dir": p["out"], "--use_cpu": "True", "--report_to": "none"}
    base.update({f"--{k}": v for k, v in flags.items()})
    return ["train"] + [x for k, v in base.items() if k not in drop for x in (k, v)]


@pytest.mark.parametrize("case, expected", [
    ("no_vision_tower", "is a language model, so --vision_tower is required: give a CLIP or SigLIP directory"),
    ("data_missing", "--data_path nope.json: no such file or directory"),
    ("model_missing", "--model_name_or_path nope: no such directory"),
    ("image_folder_missing", "--image_folder nope: no such directory"),
    ("bad_int", "argument --lora_r/--lora-r: invalid int value: 'abc'"),
    ("bad_combination", "--bits 4 trains quantized weights only through adapters: add --lora_enable True"),
    ("unknown_flag", "unknown flag(s) --lora_rnk 8; did you mean"),
    ("missing_required", "the following arguments are required: --model_name_or_path"),
    ("config_missing", "config file run.yaml: no such file"),
    ("unknown_template", "--version 'nope' is not a known template"),
    ("projector_missing", "--pretrain_mm_mlp_adapter nope.safetensors: no such file"),
    ("invalid_json_data", "invalid JSON"),
    ("model_is_a_tower", "is a vision tower (clip_vision_model): give the LLM or Llava checkpoint directory"),
    ("model_is_a_stage1_run", "has no config.json, so it is no model directory"),
    ("model_without_tokenizer", "has no tokenizer (tokenizer.json"),
    ("tower_is_an_llm", "model_type 'llama' is not one of ['clip', 'clip_vision_model', 'siglip'"),
    ("projector_not_a_projector", "is not a projector file (UnpicklingError): give a stage-1 run's"),
    ("megatron_world_size", "1 process(es) launched, not a multiple of --tensor_model_parallel_size 2"),
    ("megatron_lora", "--backend megatron does not support: --lora_enable True"),
    ("resume_not_a_checkpoint", "is no checkpoint (no trainer_state.json or megatron_checkpoint.json); give a "
                                "checkpoint-N directory of the run"),
    ("output_dir_is_a_file", "is a file; give a directory (created if missing)"),
    ("data_dir_not_saved", "is a directory that `datasets` did not save (no state.json or dataset_dict.json)"),
    ("dpo_flag_in_sft", "--beta 0.5 apply to preference tuning: add --training_stage dpo (or run `llava dpo`)"),
    ("dpo_loss_type", "--loss_type must be sigmoid or ipo, got hinge"),
    ("dpo_packing", "--packing is not available with --training_stage dpo"),
    ("mixture_bad_strategy", "mix.yaml, entry 1 (d.json): sampling_strategy 'some:5' is not one of all, first:N"),
    ("eval_mixture_missing_source", "--eval_data_path "),
])
def test_train_mistakes(train_paths, tmp_path, capsys, case, expected):
    if case.startswith("megatron"):
        pytest.importorskip("megatron.core")  # the backend's module imports it (the megatron extra)
    p = train_paths
    argv = {
        "no_vision_tower": lambda: _train_argv(p, drop=("--vision_tower",)),
        "data_missing": lambda: _train_argv(p, data_path="nope.json"),
        "model_missing": lambda: _train_argv(p, model_name_or_path="nope"),
        "image_folder_missing": lambda: _train_argv(p, image_folder="nope"),
        "bad_int": lambda: _train_argv(p, lora_r="abc"),
        "bad_combination": lambda: _train_argv(p, bits="4"),
        "unknown_flag": lambda: _train_argv(p, lora_rnk="8"),
        "missing_required": lambda: _train_argv(p, drop=("--model_name_or_path",)),
        "config_missing": lambda: ["train", "run.yaml"],
        "unknown_template": lambda: _train_argv(p, version="nope"),
        "projector_missing": lambda: _train_argv(p, pretrain_mm_mlp_adapter="nope.safetensors"),
        "invalid_json_data": lambda: _train_argv(p, data_path=str(_write(tmp_path / "d.json", "[{"))),
        "model_is_a_tower": lambda: _train_argv(p, model_name_or_path=p["tower"]),
        "model_is_a_stage1_run": lambda: _train_argv(p, model_name_or_path=str(_stage1_like(tmp_path / "s1"))),
        "model_without_tokenizer": lambda: _train_argv(p, model_name_or_path=str(_config_only(tmp_path / "m", "llama"))),
        "tower_is_an_llm": lambda: _train_argv(p, vision_tower=p["llm"]),
        "projector_not_a_projector": lambda: _train_argv(p, pretrain_mm_mlp_adapter=p["data"]),
        "megatron_world_size": lambda: _train_argv(p, backend="megatron", tensor_model_parallel_size="2"),
        "megatron_lora": lambda: _train_argv(p, backend="megatron", lora_enable="True"),
        "resume_not_a_checkpoint": lambda: _train_argv(p, resume_from_checkpoint=p["images"]),
        "output_dir_is_a_file": lambda: _train_argv(p, output_dir=p["data"]),
        "data_dir_not_saved": lambda: _train_argv(p, data_path=p["images"]),
        "dpo_flag_in_sft": lambda: _train_argv(p, beta="0.5"),
        "dpo_loss_type": lambda: _train_argv(p, training_stage="dpo", loss_type="hinge"),
        "dpo_packing": lambda: _train_argv(p, training_stage="dpo", packing="True"),
        "mixture_bad_strategy": lambda: _train_argv(p, data_path=str(_write(tmp_path / "mix.yaml", (
            "datasets:\n  - json_path: d.json\n    sampling_strategy: some:5\n")))),
        "eval_mixture_missing_source": lambda: _train_argv(p, eval_data_path=str(_write(
            tmp_path / "eval.yaml", "datasets:\n  - json_path: gone.json\n"))),
    }[case]()
    if case == "eval_mixture_missing_source":
        expected = f"--eval_data_path {tmp_path / 'eval.yaml'}, entry 1 (gone.json): json_path gone.json does not exist"
    assert expected in one_error_line(capsys, argv, "llava train")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _config_only(path: Path, model_type: str) -> Path:
    """A directory whose config.json says ``model_type`` and nothing else (no weights, no tokenizer)."""
    path.mkdir(exist_ok=True)
    _write(path / "config.json", json.dumps({"model_type": model_type}))
    return path


def _stage1_like(path: Path, kind: str = "stage1", files: tuple[str, ...] = ("mm_projector.safetensors",)) -> Path:
    """The files of a run directory of ``kind`` (what each mistake below is told apart by; no weights in them)."""
    path.mkdir(exist_ok=True)
    _write(path / "llava_args.json", json.dumps({"run_kind": kind, "model_args": {}, "training_args": {}}))
    for name in files:
        _write(path / name, "")
    return path


def test_merge_mistakes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    merge = ["merge", "--out", str(tmp_path / "merged"), "--adapter"]
    line = one_error_line(capsys, merge + ["nope"], "llava merge")
    assert "--adapter nope: no such directory; give the --output_dir of a `llava train --lora_enable True` run" in line
    assert "has no llava_args.json" in one_error_line(capsys, merge + [str(run)], "llava merge")
    (run / "llava_args.json").write_text(json.dumps({"model_args": {}, "training_args": {}}))
    line = one_error_line(capsys, merge + [str(run)], "llava merge")
    assert "has no adapter_config.json: give the --output_dir of a `llava train --lora_enable True` run" in line
    assert "invalid choice: 'float8'" in one_error_line(capsys, merge + [str(run), "--dtype", "float8"], "llava merge")
    line = one_error_line(capsys, merge + [str(run), "--max_shard_size", "lots"], "llava merge")
    assert "argument --max_shard_size: expected a size such as 2GB, 500MB or 1GiB, got 'lots'" in line


def test_predict_and_eval_mistakes(tmp_path, capsys):
    ckpt = _config_only(tmp_path / "ckpt", "llava")  # a Llava config, no weights: the mistakes below come first
    line = one_error_line(capsys, ["predict", "--model", "nope", "--prompt", "hi"], "llava predict")
    assert "--model nope: no such directory" in line and "llava train" in line
    line = one_error_line(capsys, ["predict", "--model", str(ckpt), "--image", "missing.png", "--prompt", "hi"],
                          "llava predict")
    assert "--image missing.png: no such file" in line
    line = one_error_line(capsys, ["predict", "--model", str(ckpt), "--prompt", "hi"], "llava predict")
    assert "has no llava_args.json; pass --version" in line
    line = one_error_line(capsys, ["predict", "--model", str(ckpt), "--prompt", "hi", "--max_new_tokens", "0"],
                          "llava predict")
    assert "argument --max_new_tokens: must be > 0, got 0" in line
    line = one_error_line(capsys, ["eval", "--model", str(ckpt), "--data", "nope.json"], "llava eval")
    assert "--data nope.json: no such file or directory" in line
    data = _write(tmp_path / "held.json", "[]")
    line = one_error_line(capsys, ["eval", "--model", str(ckpt), "--data", str(data), "--image_folder", "nope"],
                          "llava eval")
    assert "--image_folder nope: no such directory" in line
    assert "--batch_size" in one_error_line(capsys, ["eval", "--model", str(ckpt), "--data", str(data),
                                                     "--batch_size", "x"], "llava eval")


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_predict_and_eval_refuse_what_is_not_a_llava_checkpoint(tmp_path, capsys, command):
    """Directories people pass as --model by mistake: each gets a one-line error saying what to do instead."""
    extra = ["--prompt", "hi"] if command == "predict" else ["--data", str(_write(tmp_path / "held.json", "[]"))]
    cases = {
        _stage1_like(tmp_path / "stage1"): "is a stage-1 run (the projector only): train stage 2 from it",
        _stage1_like(tmp_path / "lora", "lora", ("adapter_config.json", "adapter_model.safetensors")):
            "is a lora run (an adapter): merge it first, `llava merge --adapter",
        _stage1_like(tmp_path / "cut", "full", ()): "a full run directory, but ['config.json'] are missing",
        tmp_path: "has no config.json; give a checkpoint directory written by `llava train` or `llava merge`",
        _config_only(tmp_path / "llm", "llama"): "is a 'llama' model, not a Llava checkpoint (llava, llava_next, "
                                                  "llava_onevision, llava_next_video)",
    }
    for model, expected in cases.items():
        line = one_error_line(capsys, [command, "--model", str(model), *extra, "--version", "plain"], f"llava {command}")
        assert expected in line, line


def test_import_llava_mistakes(tmp_path, capsys):
    line = one_error_line(capsys, ["import-llava", "--src", "nope", "--out", str(tmp_path / "o")], "llava import-llava")
    assert "--src nope: no such directory; give the directory of an original LLaVA checkpoint" in line
    src = tmp_path / "src"
    src.mkdir()
    line = one_error_line(capsys, ["import-llava", "--src", str(src), "--out", str(tmp_path / "o")],
                          "llava import-llava")
    assert "no config.json in it" in line
    (src / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu"}))
    line = one_error_line(capsys, ["import-llava", "--src", str(src), "--out", str(tmp_path / "o")],
                          "llava import-llava")
    assert "names no mm_vision_tower; pass --vision_tower" in line
    line = one_error_line(capsys, ["import-llava", "--src", str(src), "--out", str(tmp_path / "o"), "--max_shard_size",
                                   "5 gigs"], "llava import-llava")
    assert "expected a size such as 2GB" in line


def test_convert_data_check_demo_and_top_level_mistakes(tiny_models, shapes_data, tmp_path, capsys):
    line = one_error_line(capsys, ["convert", "hf2mcore", "nope", str(tmp_path / "o")], "llava convert hf2mcore")
    assert "nope: no config.json" in line
    assert "invalid int value: 'x'" in one_error_line(capsys, ["convert", "hf2mcore", "--tp", "x", "a", "b"],
                                                      "llava convert hf2mcore")
    check = ["data", "check", "--data_path"]
    line = one_error_line(capsys, check + ["nope.json", "--model_name_or_path", "x"], "llava data check")
    assert "--data_path nope.json: no such file or directory" in line
    data = str(shapes_data["stage2_qa"])
    line = one_error_line(capsys, check + [data, "--model_name_or_path", "nope"], "llava data check")
    assert "--model_name_or_path nope: no such directory" in line
    line = one_error_line(capsys, check + [data, "--model_name_or_path", str(tiny_models["llm"])], "llava data check")
    assert "--vision_tower is required" in line
    tower, llm = str(tiny_models["vision_tower"]), str(tiny_models["llm"])
    line = one_error_line(capsys, check + [data, "--model_name_or_path", tower, "--vision_tower", tower],
                          "llava data check")
    assert f"--model_name_or_path {tower} is a vision tower (clip_vision_model)" in line
    line = one_error_line(capsys, check + [data, "--model_name_or_path", llm, "--vision_tower", llm], "llava data check")
    assert f"--vision_tower {llm}: model_type 'llama' is not one of" in line
    line = one_error_line(capsys, check + [data, "--model_name_or_path", str(tmp_path)], "llava data check")
    assert "has no config.json, so it is no model directory" in line
    line = one_error_line(capsys, check + [str(tmp_path), "--model_name_or_path", llm, "--vision_tower", tower],
                          "llava data check")
    assert "is a directory that `datasets` did not save" in line
    assert "unknown data command foo" in one_error_line(capsys, ["data", "foo"], "llava data")
    assert "required: command" in one_error_line(capsys, ["convert"], "llava convert")
    line = one_error_line(capsys, ["convert", "mcore2hf", str(tmp_path), str(tmp_path / "o")], "llava convert mcore2hf")
    assert "no mca_config.json" in line
    line = one_error_line(capsys, ["convert", "mcore2mcore", "--tp", "2", str(tmp_path), str(tmp_path / "o")],
                          "llava convert mcore2mcore")
    assert "no mca_config.json" in line
    assert "invalid int value: 'abc'" in one_error_line(capsys, ["demo", "--batch_size", "abc"], "llava demo")
    assert "--batch_size 0: must be > 0" in one_error_line(capsys, ["demo", "--batch_size", "0"], "llava demo")
    assert "expected True or False, got 'maybe'" in one_error_line(capsys, ["demo", "--lora", "maybe"], "llava demo")
    assert "expected True or False, got 'maybe'" in one_error_line(capsys, ["demo", "--anyres", "maybe"], "llava demo")
    line = one_error_line(capsys, ["demo", "--epochs", "x"], "llava demo")
    assert "unrecognized arguments: --epochs x (`llava demo --help` lists the flags)" in line
    a_file = _write(tmp_path / "f", "")
    assert "is a file" in one_error_line(capsys, ["demo", "--workdir", str(a_file)], "llava demo")
    line = one_error_line(capsys, ["demo", "--anyres", "True", "--workdir", str(a_file / "sub")], "llava demo")
    assert f"--workdir {a_file / 'sub'}: cannot create it (Not a directory); give a writable directory" in line
    assert "invalid choice: 'trian'" in one_error_line(capsys, ["trian"], "llava")
    assert "required: COMMAND" in one_error_line(capsys, [], "llava")


def test_debug_shows_the_traceback_and_real_faults_keep_theirs(tmp_path, monkeypatch, capsys):
    merge = ["merge", "--adapter", "nope", "--out", str(tmp_path / "o")]
    with pytest.raises(UsagePathError, match="--adapter nope"):
        main(["--debug", *merge])
    monkeypatch.setenv("LLAVA_DEBUG", "1")
    with pytest.raises(UsagePathError, match="--adapter nope"):
        main(merge)
    monkeypatch.delenv("LLAVA_DEBUG")

    import llava.serve.predict

    def fault(*args, **kwargs):
        raise RuntimeError("a fault in the program, not in the input")

    monkeypatch.setattr(llava.serve.predict.Predictor, "load", fault)
    _config_only(tmp_path / "ckpt", "llava")
    with pytest.raises(RuntimeError, match="a fault in the program"):
        main(["predict", "--model", str(tmp_path / "ckpt"), "--prompt", "hi"])


def project_flags() -> set[str]:
    """LLaVA's flags: every field of the model/data dataclasses, and those our TrainingArguments declares itself."""
    from llava.train.args import DataArguments, ModelArguments, TrainingArguments

    names = {f.name for cls in (ModelArguments, DataArguments) for f in dataclasses.fields(cls)}
    return {f"--{n}" for n in names | set(TrainingArguments.__dict__["__annotations__"])}


def test_train_help_first_screen_is_the_llava_flags(monkeypatch):
    from llava.train.flag_help import train_help

    monkeypatch.setenv("COLUMNS", "100")
    lines = train_help().splitlines()
    inherited = next(i for i, line in enumerate(lines) if line.startswith("transformers.TrainingArguments"))
    flags = [(i, m.group(1)) for i, line in enumerate(lines) if (m := re.match(r"  (--\w+)", line))]
    first_screen = {flag for i, flag in flags if i < 50}
    assert first_screen <= project_flags(), first_screen - project_flags()
    assert {"--model_name_or_path", "--vision_tower", "--version", "--data_path", "--image_folder",
            "--tune_mm_mlp_adapter"} <= first_screen
    assert all(i < inherited for i, flag in flags if flag in project_flags())
    after = {flag for i, flag in flags if i > inherited}
    assert {"--output_dir", "--learning_rate", "--deepspeed", "--num_train_epochs", "--bf16"} <= after
    titles = [line for line in lines[:inherited] if re.match(r"^\w.*:$", line)]
    assert titles[:11] == ["options:", "model:", "data:", "stage and freezing:", "preference tuning (DPO):",
                           "LoRA / QLoRA:", "high resolution:", "video:", "packing, speed, memory and start-up:",
                           "Megatron:",
                           "accepted from LLaVA scripts (fixed values):"], titles


def test_stored_flag_table_matches_the_parser():
    """train_flags.json (what fast help renders) is the live parser's table; else regenerate it."""
    import inspect

    from llava.train.args import build_parser
    from llava.train.flag_help import SOURCES, SPEC_FILE, cache_key, flag_spec

    declaring = {Path(inspect.getsourcefile(cls)).resolve().relative_to(ROOT / "llava").as_posix()
                 for dtype in build_parser().dataclass_types for cls in dtype.__mro__
                 if cls.__module__.startswith("llava.")}
    assert declaring <= set(SOURCES), f"add {declaring - set(SOURCES)} to SOURCES in llava/train/flag_help.py"
    stored = json.loads(SPEC_FILE.read_text())
    regenerate = "stale: run `python -m llava.train.flag_help --write` and commit llava/train/train_flags.json"
    assert stored["key"] == cache_key(), regenerate
    assert stored["flags"] == flag_spec(build_parser()), regenerate


HELP_PROBE = textwrap.dedent("""
    import contextlib, io, json, sys, time
    from llava.cli import main
    start, outputs = time.perf_counter(), {}
    for argv in (["--help"], ["train", "--help"], ["demo", "-h"], ["predict", "--help"], ["eval", "--help"],
                 ["merge", "--help"], ["import-llava", "--help"], ["data", "check", "--help"],
                 ["convert", "hf2mcore", "--help"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(argv)
            except SystemExit:
                pass
        outputs[" ".join(argv)] = out.getvalue()
    heavy = sorted(m for m in ("torch", "transformers", "deepspeed", "peft", "accelerate") if m in sys.modules)
    print(json.dumps({"heavy": heavy, "seconds": time.perf_counter() - start, "outputs": outputs}))
""")


def test_help_imports_no_torch():
    """Every --help answers without torch/transformers/deepspeed/peft: the check is the import, not a timer."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["heavy"] == [], result["heavy"]
    outputs = result["outputs"]
    assert "transformers.TrainingArguments (inherited" in outputs["train --help"]
    assert "--lora_enable" in outputs["train --help"] and "--gradient_checkpointing" in outputs["train --help"]
    for argv, text in outputs.items():
        assert "usage:" in text, argv


def test_launcher_entry_point_reports_one_line(train_paths):
    """``python -m llava.train.train`` (what DeepSpeed/torchrun launch) reports input errors as `llava train` does."""
    p = train_paths
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "llava.train.train", *_train_argv(p, bits="4")[1:]],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "llava train: error: --bits 4 trains quantized weights only through adapters: add --lora_enable True")

