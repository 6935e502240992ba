"""End to end: stage 1 then stage 2 on the tiny shapes data, outputs, resume, YAML configs, optimizer groups, wandb.

The uninterrupted stage-1 and stage-2 runs are module fixtures (6 steps, checkpoints every 3); the other tests
compare against them, against files loaded with plain ``transformers``/``safetensors``, or against known values.

    .venv/bin/pytest tests/train/test_train_e2e.py
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava.run_dir import RunKind, run_kind
from llava.train.train import train

STEPS, SAVE_STEPS, LR = 6, 3, 1e-3


def common_flags(shapes_data, output_dir, *, max_steps: int = STEPS) -> list[str]:
    return ["--image_folder", str(shapes_data["image_folder"]), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "8", "--max_steps", str(max_steps), "--learning_rate", str(LR),
            "--logging_steps", "1", "--save_steps", str(SAVE_STEPS), "--report_to", "none",
            "--model_max_length", "256", "--use_cpu", "True", "--seed", "0"]


def stage1_argv(tiny_models, shapes_data, output_dir, **kw) -> list[str]:
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "plain", "--data_path", str(shapes_data["stage1_captions"]),
            "--tune_mm_mlp_adapter", "True", *common_flags(shapes_data, output_dir, **kw)]


def stage2_argv(tiny_models, shapes_data, output_dir, projector, **kw) -> list[str]:
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(shapes_data["stage2_qa"]),
            "--pretrain_mm_mlp_adapter", str(projector), *common_flags(shapes_data, output_dir, **kw)]


def step_losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


@pytest.fixture(scope="module")
def stage1(tiny_models, shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    return {"dir": out, "trainer": train(stage1_argv(tiny_models, shapes_data, out))}


@pytest.fixture(scope="module")
def stage2(tiny_models, shapes_data, stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    projector = stage1["dir"] / "mm_projector.safetensors"
    return {"dir": out, "projector": projector,
            "trainer": train(stage2_argv(tiny_models, shapes_data, out, projector))}


# --- outputs


def test_stage1_writes_trained_projector_and_resumable_checkpoints(stage1):
    out, trainer = stage1["dir"], stage1["trainer"]
    assert trainer.state.global_step == STEPS
    saved = load_file(out / "mm_projector.safetensors")
    assert set(saved) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    live = trainer.model.model.multi_modal_projector.state_dict()
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, live[key], rtol=0, atol=0)
    # training moved the projector: the step-3 checkpoint differs from the final one
    at3 = load_file(out / "checkpoint-3" / "mm_projector.safetensors")
    assert all(not torch.equal(at3[k], saved[k]) for k in saved)
    for step in (3, 6):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {"mm_projector.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json", "llava_args.json"} <= files
        assert not any(name.startswith("model") for name in files)  # the frozen LLM is not copied
    losses = step_losses(trainer)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]


def test_stage1_projector_differs_from_init_and_is_stage2_init(tiny_models, stage1):
    from llava.model.builder import build_llava_model
    from llava.train.args import ModelArguments

    saved = load_file(stage1["dir"] / "mm_projector.safetensors")
    base = {"model_name_or_path": str(tiny_models["llm"]), "vision_tower": str(tiny_models["vision_tower"])}
    torch.manual_seed(0)
    fresh = build_llava_model(ModelArguments(**base)).model.model.multi_modal_projector.state_dict()
    assert all(not torch.allclose(saved[k], fresh[k]) for k in saved)
    torch.manual_seed(1)  # a different init, overwritten by the file
    loaded = build_llava_model(ModelArguments(**base, pretrain_mm_mlp_adapter=str(stage1["dir"] / "mm_projector.safetensors")))
    got = loaded.model.model.multi_modal_projector.state_dict()
    for key in saved:
        torch.testing.assert_close(got[key], saved[key], rtol=0, atol=0)


def test_stage2_output_loads_with_transformers_alone_and_matches_trainer(stage2):
    out, trainer = stage2["dir"], stage2["trainer"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and "auto_map" not in config
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert "pixel_values" in batch and (batch["input_ids"] == model.config.image_token_id).any()
    live = trainer.model.eval()
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        expected = live(**inputs).logits
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the processor's image preprocessing is the one training used
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    px = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert px.shape == (1, 3, 64, 64)


def test_stage2_starts_from_the_stage1_projector(tiny_models, shapes_data, stage2, tmp_path):
    """A 0-learning-rate stage-2 step leaves the projector exactly as the stage-1 file."""
    argv = stage2_argv(tiny_models, shapes_data, tmp_path, stage2["projector"], max_steps=1)
    argv[argv.index("--learning_rate") + 1] = "0"
    trainer = train(argv)
    saved = load_file(stage2["projector"])
    live = trainer.model.model.multi_modal_projector.state_dict()
    for key in saved:
        torch.testing.assert_close(live[key], saved[key], rtol=0, atol=0)


def test_run_args_file_holds_resolved_arguments(stage1, stage2, tiny_models, shapes_data):
    args = json.loads((stage2["dir"] / "llava_args.json").read_text())
    assert args["model_args"]["version"] == "vicuna_v1"
    assert args["model_args"]["model_name_or_path"] == str(tiny_models["llm"])
    assert args["model_args"]["pretrain_mm_mlp_adapter"] == str(stage2["projector"])
    assert args["model_args"]["mm_vision_select_layer"] == -2  # a default, resolved
    assert args["data_args"]["data_path"] == str(shapes_data["stage2_qa"])
    assert args["data_args"]["image_aspect_ratio"] == "square"
    assert args["training_args"]["learning_rate"] == LR and args["training_args"]["max_steps"] == STEPS
    assert args["num_image_tokens"] == (64 // 16) ** 2
    assert args["projector_only"] is False
    s1 = json.loads((stage1["dir"] / "llava_args.json").read_text())
    assert s1["model_args"]["tune_mm_mlp_adapter"] is True and s1["projector_only"] is True
    assert s1["model_args"]["version"] == "plain"
    # the run directory's kind, read back through llava/run_dir.py from what training wrote
    assert run_kind(stage1["dir"]) is RunKind.STAGE1 and run_kind(stage1["dir"] / "checkpoint-3") is RunKind.STAGE1
    assert run_kind(stage2["dir"]) is RunKind.FULL and args["run_kind"] == "full"


def test_continue_from_stage2_checkpoint(stage2, shapes_data, tmp_path):
    """--model_name_or_path a Llava directory (no --vision_tower): with lr 0 the weights come back unchanged."""
    argv = ["--model_name_or_path", str(stage2["dir"]), "--version", "vicuna_v1",
            "--data_path", str(shapes_data["stage2_qa"]), *common_flags(shapes_data, tmp_path, max_steps=1)]
    argv[argv.index("--learning_rate") + 1] = "0"
    trainer = train(argv)
    assert trainer.state.global_step == 1
    expected = load_file(stage2["dir"] / "model.safetensors")
    got = load_file(tmp_path / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


# --- resume


def _interrupted_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "checkpoint-3", dst / "checkpoint-3")
    return dst


@pytest.mark.parametrize("how", ["path", "true"])
def test_stage1_resume_matches_uninterrupted(tiny_models, shapes_data, stage1, tmp_path, how):
    out = _interrupted_copy(stage1["dir"], tmp_path / "run")
    resume = str(out / "checkpoint-3") if how == "path" else "True"
    trainer = train(stage1_argv(tiny_models, shapes_data, out) + ["--resume_from_checkpoint", resume])
    expected, got = step_losses(stage1["trainer"]), step_losses(trainer)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(SAVE_STEPS + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    final, reference = load_file(out / "mm_projector.safetensors"), load_file(stage1["dir"] / "mm_projector.safetensors")
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6)


def test_stage2_resume_matches_uninterrupted(tiny_models, shapes_data, stage2, tmp_path):
    out = _interrupted_copy(stage2["dir"], tmp_path / "run")
    argv = stage2_argv(tiny_models, shapes_data, out, stage2["projector"])
    trainer = train(argv + ["--resume_from_checkpoint", str(out / "checkpoint-3")])
    expected, got = step_losses(stage2["trainer"]), step_losses(trainer)
    for step in range(SAVE_STEPS + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


# --- configuration


def test_yaml_config_trains_like_flags(tiny_models, shapes_data, stage1, tmp_path):
    import yaml

    flags = stage1_argv(tiny_models, shapes_data, tmp_path / "ignored", max_steps=2)
    keys = dict(zip(flags[0::2], flags[1::2]))
    config = {k[2:]: v for k, v in keys.items() if k != "--output_dir"}
    config["tune_mm_mlp_adapter"] = True  # a YAML boolean, not a string
    config["max_steps"] = 2
    config["learning_rate"] = LR
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    trainer = train([str(path), "--output_dir", str(out)])
    assert trainer.state.global_step == 2
    assert (out / "mm_projector.safetensors").is_file()
    # same seed, same data, same lr at steps 1-2 as the 6-step flag run (linear decay starts at LR)
    expected, got = step_losses(stage1["trainer"]), step_losses(trainer)
    assert got[1] == pytest.approx(expected[1], abs=1e-6)
    assert got[2] == pytest.approx(expected[2], abs=1e-6)
    args = json.loads((out / "llava_args.json").read_text())
    assert args["model_args"]["tune_mm_mlp_adapter"] is True and args["training_args"]["max_steps"] == 2


def test_mm_projector_lr_param_group(tiny_models, shapes_data, stage2, tmp_path):
    argv = stage2_argv(tiny_models, shapes_data, tmp_path, stage2["projector"], max_steps=1)
    trainer = train(argv + ["--mm_projector_lr", "2e-4"])
    model = trainer.model
    projector = {id(p) for p in model.model.multi_modal_projector.parameters()}
    others = {id(p) for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" not in n}
    by_lr: dict[float, set[int]] = {}
    for group in trainer.optimizer.param_groups:
        by_lr.setdefault(group["initial_lr"], set()).update(id(p) for p in group["params"])
    assert by_lr == {2e-4: projector, LR: others}


def test_group_by_modality_length_trains_single_modality_batches(tiny_models, shapes_data, stage2, tmp_path):
    argv = stage2_argv(tiny_models, shapes_data, tmp_path, stage2["projector"], max_steps=2)
    trainer = train(argv + ["--group_by_modality_length", "True"])
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in step_losses(trainer).values())
    image_id = trainer.model.config.image_token_id
    kinds = []
    for batch in trainer.get_train_dataloader():
        has_image = (batch["input_ids"] == image_id).any(dim=1)
        kinds.append("mixed" if 0 < has_image.sum() < len(has_image) else "single")
    text_only = sum(1 for n in trainer.train_dataset.modality_lengths if n < 0)
    assert text_only > 0
    # only the tail (the incomplete megabatches of each modality) may mix
    assert kinds.count("mixed") <= 1 and "mixed" not in kinds[:-1]


# --- wandb


def _wandb_records(path: Path):
    """Records of a wandb ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):
            return  # a record still being written
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _read_wandb_run(path: Path) -> tuple[list[dict], dict]:
    from wandb.proto import wandb_internal_pb2

    history, summary = [], {}
    for raw in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update})
    return history, summary


def train_with_wandb_offline(argv: list[str], wandb_dir: Path, monkeypatch):
    """``train(argv)`` reporting to wandb offline into ``wandb_dir``; the run finished when it returns."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = list(argv)
    argv[argv.index("--report_to") + 1] = "wandb"
    wandb.teardown()  # wandb keeps the first WANDB_DIR of a process: an earlier test's would hold this run
    try:
        return train(argv)
    finally:
        wandb.finish()


def test_report_to_wandb_offline_logs_the_loss(tiny_models, shapes_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    trainer = train_with_wandb_offline(stage1_argv(tiny_models, shapes_data, tmp_path / "out", max_steps=2), tmp_path,
                                       monkeypatch)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged = step_losses(trainer)
    # wandb-core writes the offline log asynchronously, after finish() returns: wait until the steps are in it
    deadline = time.monotonic() + 60
    while True:
        history, summary = _read_wandb_run(runs[0])
        wandb_losses = {h["train/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
        if (len(wandb_losses) == len(logged) and "train_loss" in summary) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert wandb_losses == pytest.approx(logged, abs=1e-6)
    assert summary["train/loss"] == pytest.approx(logged[max(logged)], abs=1e-6)
