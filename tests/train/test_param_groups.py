"""--mm_tunable_parts, --mm_vision_tower_lr, --mm_vision_tower_lr_decay: `pytest tests/train/test_param_groups.py`.

Expected learning rates are computed here from the parameter names and the tower config's layer count (layer k of
L: lr * decay^(L - k); embeddings k = 0; post-layernorm k = L) and compared with the optimizer's groups: the plain
optimizer, and DeepSpeed's when the DeepSpeed config has its own "optimizer" block.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llava.model.builder import apply_freezing, build_llava_model
from llava.train.args import parse_args

REPO = Path(__file__).resolve().parents[2]
LR, TOWER_LR, DECAY, PROJ_LR, WD = 1e-3, 2e-4, 0.5, 5e-4, 0.1
TUNE_ALL = "mm_vision_tower,mm_mlp_adapter,mm_language_model"


def argv(tiny_models, shapes_data, out, *extra) -> list[str]:
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(shapes_data["stage2_qa"]),
            "--image_folder", str(shapes_data["image_folder"]), "--output_dir", str(out), "--report_to", "none",
            "--model_max_length", "256", "--per_device_train_batch_size", "2", "--seed", "0", *extra]


def expected_lr(name: str, num_layers: int) -> float:
    if "vision_tower" in name:
        match = re.search(r"encoder\.layers\.(\d+)\.", name)
        k = int(match.group(1)) + 1 if match else (num_layers if "post_layernorm" in name else 0)
        return TOWER_LR * DECAY ** (num_layers - k)
    return PROJ_LR if ("multi_modal_projector" in name or "image_newline" in name) else LR


GROUP_FLAGS = ["--mm_tunable_parts", TUNE_ALL, "--learning_rate", str(LR), "--mm_vision_tower_lr", str(TOWER_LR),
               "--mm_vision_tower_lr_decay", str(DECAY), "--mm_projector_lr", str(PROJ_LR), "--weight_decay", str(WD)]


def test_tunable_parts_map_to_the_freezing_policy(tiny_models, shapes_data):
    model_args, _, _ = parse_args(argv(tiny_models, shapes_data, "unused", "--mm_tunable_parts", TUNE_ALL))
    built = build_llava_model(model_args)
    counts = apply_freezing(built.model, model_args)
    tower = sum(p.numel() for p in built.model.model.vision_tower.parameters())
    assert counts["vision_tower"] == tower and counts["projector"] > 0 and counts["language_model"] > 0
    stage1, _, _ = parse_args(argv(tiny_models, shapes_data, "unused", "--mm_tunable_parts", "mm_mlp_adapter"))
    assert stage1.tune_mm_mlp_adapter  # LLaVA-NeXT's stage-1 scripts: projector-only checkpoints
    counts = apply_freezing(built.model, stage1)
    assert counts["vision_tower"] == counts["language_model"] == 0 and counts["projector"] > 0
    tower_only, _, _ = parse_args(argv(tiny_models, shapes_data, "unused", "--mm_tunable_parts", "mm_vision_tower"))
    counts = apply_freezing(built.model, tower_only)
    assert counts["vision_tower"] == tower and counts["projector"] == counts["language_model"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--mm_tunable_parts", "mm_vision_resampler"], "--mm_tunable_parts 'mm_vision_resampler'"),
    (["--mm_tunable_parts", "mm_language_model", "--tune_mm_mlp_adapter", "True"], "contradicts --tune_mm_mlp_adapter"),
    (["--mm_vision_tower_lr", "2e-6"], "--mm_vision_tower_lr 2e-06 and"[:24]),
    (["--mm_tunable_parts", TUNE_ALL, "--mm_vision_tower_lr_decay", "1.5"], "--mm_vision_tower_lr_decay must be in"),
])
def test_bad_tower_training_flags_fail_at_startup(tiny_models, shapes_data, extra, message):
    with pytest.raises(ValueError) as err:
        parse_args(argv(tiny_models, shapes_data, "unused", *extra))
    assert message in str(err.value)


def test_optimizer_groups_carry_tower_lr_with_layer_decay(tiny_models, shapes_data, tmp_path):
    from llava.train.train import build_trainer

    model_args, data_args, training_args = parse_args(argv(tiny_models, shapes_data, tmp_path, "--use_cpu", "True",
                                                           *GROUP_FLAGS))
    trainer, built = build_trainer(model_args, data_args, training_args)
    optimizer = trainer.create_optimizer()
    layers = built.model.config.vision_config.num_hidden_layers
    got = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            got[id(p)] = (group["lr"], group["weight_decay"])
    named = [(n, p) for n, p in built.model.named_parameters() if p.requires_grad]
    decay = set(trainer.get_decay_parameter_names(built.model))  # transformers' own rule (no bias / norm weights)
    assert len(got) == len(named)
    for name, p in named:
        lr, wd = got[id(p)]
        assert lr == pytest.approx(expected_lr(name, layers), rel=1e-12), name
        assert wd == (WD if name in decay else 0.0), name
    tower_lrs = {round(got[id(p)][0], 12) for n, p in named if "vision_tower" in n}
    assert len(tower_lrs) == layers + 1  # embeddings at decay^L, layer k at decay^(L-k), post-layernorm at lr


@pytest.mark.distributed
@pytest.mark.slow
def test_groups_survive_a_deepspeed_optimizer_block(tiny_models, shapes_data, tmp_path):
    config = json.loads((REPO / "zero_configs" / "zero2.json").read_text())
    config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "torch_adam": True,
                                                       "eps": "auto"}}
    config_path = tmp_path / "zero2_with_optimizer.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "run"
    flags = argv(tiny_models, shapes_data, out, *GROUP_FLAGS, "--deepspeed", str(config_path), "--max_steps", "1",
                 "--lr_scheduler_type", "constant", "--save_strategy", "no")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(_free_port()),
           str(REPO / "tests" / "train" / "param_groups_probe.py"), *flags]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    result = json.loads((out / "param_groups.json").read_text())
    layers = json.loads((tiny_models["vision_tower"] / "config.json").read_text())["num_hidden_layers"]
    seen = set()
    for group in result["groups"]:
        for name in group["names"]:
            assert group["lr"] == pytest.approx(expected_lr(name, layers), rel=1e-9), name
            seen.add(name)
    assert any("vision_tower" in n for n in seen) and any("multi_modal_projector" in n for n in seen)
    assert len({round(g["lr"], 12) for g in result["groups"]}) == layers + 3  # tower levels + projector + base lr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
