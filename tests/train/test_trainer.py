"""LLaVATrainer hooks, without a training run: projector LR groups, the modality-grouped sampler, stage-1 save/load.

Expectations come from the model's parameters (which are projector, which are 1-D), the dataset's modality signs,
and the tensors written to disk — not from the trainer's own helpers.

    .venv/bin/pytest tests/train/test_trainer.py
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llava.data.collator import DataCollatorForSupervisedDataset
from llava.data.dataset import LazySupervisedDataset
from llava.data.templates import get_template
from llava.model.builder import apply_freezing, build_llava_model
from llava.train.args import parse_args
from llava.train.trainer import LLaVATrainer


def make_trainer(tiny_models, shapes_data, output_dir, *flags: str, stage1: bool = False) -> LLaVATrainer:
    data = shapes_data["stage1_captions" if stage1 else "stage2_qa"]
    argv = ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--version", "plain" if stage1 else "vicuna_v1", "--data_path", str(data),
            "--image_folder", str(shapes_data["image_folder"]), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--report_to", "none", "--model_max_length", "256",
            "--use_cpu", "True", "--seed", "0", *(["--tune_mm_mlp_adapter", "True"] if stage1 else []), *flags]
    model_args, data_args, training_args = parse_args(argv)
    built = build_llava_model(model_args)
    apply_freezing(built.model, model_args, added_tokens=built.added_tokens)
    dataset = LazySupervisedDataset.from_args(data_args.data_path, model_args, data_args, training_args, built,
                                              get_template(model_args.version))
    return LLaVATrainer(model=built.model, args=training_args, train_dataset=dataset,
                        data_collator=DataCollatorForSupervisedDataset(pad_token_id=built.tokenizer.pad_token_id),
                        processing_class=built.processor, projector_only=model_args.tune_mm_mlp_adapter,
                        run_args={"stage": "test"})


def test_projector_lr_groups_split_by_weight_decay(tiny_models, shapes_data, tmp_path):
    trainer = make_trainer(tiny_models, shapes_data, tmp_path, "--learning_rate", "1e-3", "--mm_projector_lr", "3e-4",
                           "--weight_decay", "0.1")
    optimizer = trainer.create_optimizer()
    model = trainer.model
    expected: dict[tuple[float, float], set[int]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = 3e-4 if "multi_modal_projector" in name else 1e-3
        wd = 0.1 if p.ndim >= 2 else 0.0  # biases and norm weights are 1-D and take no decay
        expected.setdefault((lr, wd), set()).add(id(p))
    got = {}
    for group in optimizer.param_groups:
        key = (group["lr"], group["weight_decay"])
        assert key not in got, f"two groups with lr/weight_decay {key}"
        got[key] = {id(p) for p in group["params"]}
    assert got == expected
    assert set(got) == {(1e-3, 0.1), (1e-3, 0.0), (3e-4, 0.1), (3e-4, 0.0)}


def test_without_projector_lr_the_projector_uses_the_base_lr(tiny_models, shapes_data, tmp_path):
    trainer = make_trainer(tiny_models, shapes_data, tmp_path, "--learning_rate", "1e-3")
    optimizer = trainer.create_optimizer()
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}
    n_trainable = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == n_trainable


def test_modality_grouped_sampler_keeps_each_optimizer_step_single_modality(tiny_models, shapes_data, tmp_path):
    trainer = make_trainer(tiny_models, shapes_data, tmp_path, "--group_by_modality_length", "True",
                           "--gradient_accumulation_steps", "2")
    order = list(trainer._get_train_sampler())
    signs = [length > 0 for length in trainer.train_dataset.modality_lengths]
    assert sorted(order) == list(range(len(signs)))
    step = 4 * 2  # per-device batch x accumulation steps: one optimizer step
    n_image, n_text = sum(signs), len(signs) - sum(signs)
    assert n_text > 0
    full_steps = n_image // step + n_text // step
    for k in range(full_steps):
        chunk = {signs[i] for i in order[k * step : (k + 1) * step]}
        assert len(chunk) == 1, f"optimizer step {k} mixes modalities"
    # same seed, same order; another seed, another order
    assert list(trainer._get_train_sampler()) == order
    other = make_trainer(tiny_models, shapes_data, tmp_path, "--group_by_modality_length", "True",
                         "--gradient_accumulation_steps", "2", "--seed", "1")
    assert list(other._get_train_sampler()) != order


def test_stage1_save_holds_projector_and_new_embeddings_and_loads_back(tiny_models, shapes_data, tmp_path):
    trainer = make_trainer(tiny_models, shapes_data, tmp_path / "out", "--mm_use_im_start_end", "True", stage1=True)
    model = trainer.model
    with torch.no_grad():  # give the projector and embeddings values no fresh model has
        for p in model.model.multi_modal_projector.parameters():
            p.fill_(0.25)
        model.get_input_embeddings().weight[-1].fill_(0.5)
    trainer.save_model(str(tmp_path / "ckpt"))
    saved = load_file(tmp_path / "ckpt" / "mm_projector.safetensors")
    assert set(saved) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias", "embed_tokens.weight"}
    torch.testing.assert_close(saved["embed_tokens.weight"], model.get_input_embeddings().weight.detach())
    assert all((saved[k] == 0.25).all() for k in saved if k.startswith("linear"))
    assert (tmp_path / "ckpt" / "llava_args.json").is_file()
    assert not any(p.name.startswith("model") for p in (tmp_path / "ckpt").iterdir())

    fresh = make_trainer(tiny_models, shapes_data, tmp_path / "out2", "--mm_use_im_start_end", "True", stage1=True)
    fresh._load_from_checkpoint(str(tmp_path / "ckpt"))
    for key, tensor in fresh.model.model.multi_modal_projector.state_dict().items():
        torch.testing.assert_close(tensor, saved[key], rtol=0, atol=0)
    torch.testing.assert_close(fresh.model.get_input_embeddings().weight.detach(), saved["embed_tokens.weight"])


def test_stage1_save_without_new_tokens_has_no_embeddings(tiny_models, shapes_data, tmp_path):
    trainer = make_trainer(tiny_models, shapes_data, tmp_path / "out", stage1=True)
    trainer.save_model(str(tmp_path / "ckpt"))
    assert set(load_file(tmp_path / "ckpt" / "mm_projector.safetensors")) == {
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}


@pytest.mark.parametrize("flag", ["--remove_unused_columns"])
def test_remove_unused_columns_is_refused(tiny_models, shapes_data, tmp_path, flag):
    with pytest.raises(ValueError, match=flag):
        make_trainer(tiny_models, shapes_data, tmp_path, flag, "True")
