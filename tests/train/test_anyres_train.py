"""anyres end to end: stage 1 (projector + image_newline) then stage 2, saved as native LlavaNext / LlavaOnevision.

    .venv/bin/pytest tests/train/test_anyres_train.py

The saved checkpoint is loaded with ``LlavaNextForConditionalGeneration.from_pretrained`` + ``AutoProcessor`` (no code
of ours); its logits on the processor's inputs equal the trainer's model on the dataset's sample. OneVision runs
stage 2 directly and is loaded with ``LlavaOnevisionForConditionalGeneration.from_pretrained`` (its processor class
needs torchvision, absent here: its saved files are checked, and transformers' own image processor built from them
gives the training pixels). QLoRA (``--bits 4``) runs of both merge into native
checkpoints whose logits equal the 4-bit adapter model's; a OneVision LoRA run merges with logit parity too.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from llava.data.templates import get_template
from llava.train.train import train

STEPS = 4


def anyres_argv(tiny_models, anyres_data, out, *, stage: int, ratio: str = "anyres", extra=()) -> list[str]:
    argv = ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--data_path", str(anyres_data["train"]), "--image_folder", str(anyres_data["image_folder"]),
            "--image_aspect_ratio", ratio, "--mm_patch_merge_type", "spatial_unpad",
            "--image_grid_pinpoints", "(1x1),...,(3x3)", "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--max_steps", str(STEPS), "--learning_rate", "1e-3",
            "--logging_steps", "1", "--save_steps", "2", "--report_to", "none", "--model_max_length", "1024",
            "--use_cpu", "True", "--seed", "0"]
    if stage == 1:
        argv += ["--version", "plain", "--tune_mm_mlp_adapter", "True"]
    else:
        argv += ["--version", "vicuna_v1"]
    return argv + list(extra)


@pytest.fixture(scope="module")
def next_stage1(tiny_models, anyres_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("anyres_stage1")
    return {"dir": out, "trainer": train(anyres_argv(tiny_models, anyres_data, out, stage=1))}


@pytest.fixture(scope="module")
def next_stage2(tiny_models, anyres_data, next_stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("anyres_stage2")
    projector = next_stage1["dir"] / "mm_projector.safetensors"
    argv = anyres_argv(tiny_models, anyres_data, out, stage=2, extra=["--pretrain_mm_mlp_adapter", str(projector)])
    return {"dir": out, "projector": projector, "trainer": train(argv)}


def test_stage1_saves_trained_projector_and_image_newline(tiny_models, anyres_data, next_stage1):
    saved = load_file(next_stage1["dir"] / "mm_projector.safetensors")
    assert set(saved) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias", "image_newline"}
    live = next_stage1["trainer"].model.model
    torch.testing.assert_close(saved["image_newline"], live.image_newline.detach(), rtol=0, atol=0)
    # the initial newline (same seed, same build) was moved by training
    from llava.model.builder import build_llava_model
    from llava.train.args import parse_args

    model_args, data_args, _ = parse_args(anyres_argv(tiny_models, anyres_data, "unused", stage=1))
    transformers.set_seed(0)
    init = build_llava_model(model_args, data_args=data_args).model.model.image_newline.detach()
    assert not torch.allclose(init, saved["image_newline"])
    assert load_file(next_stage1["dir"] / "checkpoint-2" / "mm_projector.safetensors").keys() == saved.keys()


def test_stage1_resume_repeats_uninterrupted_losses_and_newline(tiny_models, anyres_data, next_stage1, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(next_stage1["dir"] / "checkpoint-2", out / "checkpoint-2")
    trainer = train(anyres_argv(tiny_models, anyres_data, out, stage=1) + ["--resume_from_checkpoint",
                                                                           str(out / "checkpoint-2")])
    losses = lambda t: {e["step"]: e["loss"] for e in t.state.log_history if "loss" in e}  # noqa: E731
    expected, got = losses(next_stage1["trainer"]), losses(trainer)
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    final, reference = load_file(out / "mm_projector.safetensors"), load_file(next_stage1["dir"] / "mm_projector.safetensors")
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6)


def test_stage2_reads_projector_and_newline_from_stage1(tiny_models, anyres_data, next_stage1):
    from llava.model.builder import build_llava_model
    from llava.train.args import parse_args

    projector = next_stage1["dir"] / "mm_projector.safetensors"
    model_args, data_args, _ = parse_args(anyres_argv(tiny_models, anyres_data, "unused", stage=2,
                                                      extra=["--pretrain_mm_mlp_adapter", str(projector)]))
    torch.manual_seed(123)  # another init, overwritten by the file
    model = build_llava_model(model_args, data_args=data_args).model
    saved = load_file(projector)
    torch.testing.assert_close(model.model.image_newline.detach(), saved["image_newline"], rtol=0, atol=0)
    torch.testing.assert_close(model.model.multi_modal_projector.linear_1.weight.detach(), saved["linear_1.weight"],
                               rtol=0, atol=0)


def test_stage2_checkpoint_is_native_llava_next_with_logit_parity(anyres_data, next_stage2):
    out, trainer = next_stage2["dir"], next_stage2["trainer"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"] and "auto_map" not in config
    assert config["image_grid_pinpoints"][0] == [64, 64] and len(config["image_grid_pinpoints"]) == 9
    model = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "LlavaNextProcessor"
    live = trainer.model.eval()
    dataset = trainer.train_dataset
    template = get_template("vicuna_v1")
    for i in (0, 1, 2):  # 12x300, 300x12, 700x500
        record = dataset.record(i)
        text = "".join(s.text for s in template.render_with_tokenizer(record.messages, processor.tokenizer))
        image = Image.open(anyres_data["image_folder"] / record.images[0]).convert("RGB")
        inputs = processor(images=[image], text=text, add_special_tokens=False, return_tensors="pt")
        batch = trainer.data_collator([dataset[i]])
        assert inputs["input_ids"].tolist() == batch["input_ids"].tolist()
        with torch.no_grad():
            got = model(**inputs).logits
            expected = live(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == STEPS and all(loss == loss for loss in losses)


def test_onevision_stage2_checkpoint_loads_natively_with_logit_parity(tiny_models, anyres_data, tmp_path):
    trainer = train(anyres_argv(tiny_models, anyres_data, tmp_path, stage=2, ratio="anyres_max_2",
                                extra=["--save_steps", "100"]))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert config["vision_aspect_ratio"] == "anyres_max_2"
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "LlavaOnevisionProcessor"
    assert processor_config["num_image_tokens"] == 17 and processor_config["vision_feature_select_strategy"] == "default"
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path).eval()
    dataset = trainer.train_dataset
    two = next(i for i in range(len(dataset)) if len(dataset.record(i).images) == 2)
    batch = trainer.data_collator([dataset[i] for i in (0, 1, 2, two)])
    assert batch["batch_num_images"].tolist() == [1, 1, 1, 2]
    with torch.no_grad():
        got = model(**batch).logits
        expected = trainer.model.eval()(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # transformers' own OneVision image processor, built from the saved processor_config.json (AutoProcessor where
    # torchvision imports; here the PIL class from the same file), gives the pixels training used
    from llava.model.anyres_model import load_processor

    processor = load_processor(tmp_path)
    assert type(processor.image_processor).__name__.startswith("LlavaOnevisionImageProcessor")
    single = trainer.data_collator([dataset[2]])  # 700x500
    image = Image.open(anyres_data["image_folder"] / dataset.record(2).images[0]).convert("RGB")
    native = processor.image_processor(images=[image], return_tensors="pt")
    assert native["image_sizes"].tolist() == single["image_sizes"].tolist() == [[700, 500]]
    torch.testing.assert_close(native["pixel_values"], single["pixel_values"], rtol=0, atol=0)
    # the video half AutoProcessor builds (it raises OSError without this entry): transformers' own class reads it
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    video = LlavaOnevisionVideoProcessor.from_pretrained(tmp_path)
    image_processor = processor.image_processor
    side = config["vision_config"]["image_size"]  # frames go to the tower's square input
    assert video.size == {"height": side, "width": side}
    assert list(video.image_mean) == list(image_processor.image_mean)
    assert list(video.image_std) == list(image_processor.image_std)
    assert int(video.resample) == int(image_processor.resample)


def test_lora_run_merges_into_native_llava_next_with_logit_parity(tiny_models, anyres_data, next_stage1, tmp_path):
    from llava.export.merge import merge_lora

    projector = next_stage1["dir"] / "mm_projector.safetensors"
    run_dir = tmp_path / "lora"
    trainer = train(anyres_argv(tiny_models, anyres_data, run_dir, stage=2, extra=[
        "--pretrain_mm_mlp_adapter", str(projector), "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--learning_rate", "2e-3", "--save_steps", "100"]))
    non_lora = load_file(run_dir / "non_lora_trainables.safetensors")
    assert "model.image_newline" in non_lora
    assert not torch.equal(non_lora["model.image_newline"], load_file(projector)["image_newline"])  # it trained
    merged_dir = merge_lora(run_dir, tmp_path / "merged")
    assert json.loads((merged_dir / "config.json").read_text())["architectures"] == ["LlavaNextForConditionalGeneration"]
    merged = LlavaNextForConditionalGeneration.from_pretrained(merged_dir).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    record = trainer.train_dataset.record(2)  # 700x500
    text = "".join(s.text for s in get_template("vicuna_v1").render_with_tokenizer(record.messages, processor.tokenizer))
    image = Image.open(anyres_data["image_folder"] / record.images[0]).convert("RGB")
    inputs = processor(images=[image], text=text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        expected = trainer.model.eval()(**inputs).logits  # the adapter model as it trained
        got = merged(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_predict_and_eval_load_anyres_checkpoint(anyres_data, next_stage2):
    from llava.data.records import Message
    from llava.serve.predict import Predictor

    predictor = Predictor.load(next_stage2["dir"])
    assert predictor.layout is not None and predictor.layout.model_type == "llava_next"
    wide = Image.open(anyres_data["image_folder"] / "wide.png").convert("RGB")
    big = Image.open(anyres_data["image_folder"] / "big.png").convert("RGB")
    conversations = [[Message("user", "<image>\nWhat colour is the box?")]] * 2
    batched = predictor.generate(conversations, [[wide], [big]], max_new_tokens=4)  # different token counts, padded
    single = [predictor.generate([c], [ims], max_new_tokens=4)[0] for c, ims in zip(conversations, [[wide], [big]])]
    assert batched == single and all(isinstance(a, str) for a in batched)


@pytest.mark.parametrize("ratio,native", [("anyres", LlavaNextForConditionalGeneration),
                                          ("anyres_max_2", LlavaOnevisionForConditionalGeneration)])
def test_qlora_run_merges_to_the_dequantized_adapter_model(tiny_models, anyres_data, next_stage1, tmp_path, ratio,
                                                            native):
    """QLoRA (4-bit LM + adapters) at high resolution, then ``llava merge``: the merged checkpoint loads natively and
    its logits equal the 4-bit adapter model's as it trained (dequantized base + adapter), on a batch with both
    extreme aspect ratios, a large image and a two-image sample."""
    bnb = pytest.importorskip("bitsandbytes")
    from llava.export.merge import merge_lora
    from llava.run_dir import RunKind, run_kind

    run_dir = tmp_path / "qlora"
    trainer = train(anyres_argv(tiny_models, anyres_data, run_dir, stage=2, ratio=ratio, extra=[
        "--pretrain_mm_mlp_adapter", str(next_stage1["dir"] / "mm_projector.safetensors"), "--lora_enable", "True",
        "--bits", "4", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "2e-3", "--max_steps", "2",
        "--save_steps", "100"]))
    assert run_kind(run_dir) is RunKind.QLORA
    assert "model.image_newline" in load_file(run_dir / "non_lora_trainables.safetensors")
    dataset = trainer.train_dataset
    two = next(i for i in range(len(dataset)) if len(dataset.record(i).images) == 2)
    batch = trainer.data_collator([dataset[i] for i in (0, 1, 2, two)])  # 12x300, 300x12, 700x500, two images
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")
              if k in batch}
    model = trainer.model.eval()  # LoRA dropout (0.05 by default) off
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * model.config.text_config.num_hidden_layers
    for module in quantized:  # bitsandbytes' own layers only: the float32 dequantize path training took (see
        module.training = True  # tests/export/test_merge.py); peft's wrappers (and their dropout) stay in eval
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():
            assert (model(**inputs).logits - expected).abs().max() > 1e-3  # the adapter matters
    merged_dir = merge_lora(run_dir, tmp_path / "merged")
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == [native.__name__] and "quantization_config" not in config
    assert run_kind(merged_dir) is RunKind.MERGED
    processor_class = native.__name__.replace("ForConditionalGeneration", "Processor")  # saved without torchvision too
    assert json.loads((merged_dir / "processor_config.json").read_text())["processor_class"] == processor_class
    merged = native.from_pretrained(merged_dir).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_onevision_lora_run_merges_into_native_onevision_with_logit_parity(tiny_models, anyres_data, next_stage1,
                                                                           tmp_path):
    """``llava merge`` of a OneVision LoRA run (in memory, as every anyres run), its processor files read without
    torchvision."""
    from llava.export.merge import merge_lora

    run_dir = tmp_path / "lora"
    trainer = train(anyres_argv(tiny_models, anyres_data, run_dir, stage=2, ratio="anyres_max_2", extra=[
        "--pretrain_mm_mlp_adapter", str(next_stage1["dir"] / "mm_projector.safetensors"), "--lora_enable", "True",
        "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "2e-3", "--max_steps", "2", "--save_steps", "100"]))
    merged_dir = merge_lora(run_dir, tmp_path / "merged")
    assert json.loads((merged_dir / "processor_config.json").read_text())["processor_class"] == "LlavaOnevisionProcessor"
    dataset = trainer.train_dataset
    two = next(i for i in range(len(dataset)) if len(dataset.record(i).images) == 2)
    batch = trainer.data_collator([dataset[i] for i in (0, 2, two)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")}
    with torch.no_grad():
        expected = trainer.model.eval()(**inputs).logits
        got = LlavaOnevisionForConditionalGeneration.from_pretrained(merged_dir).eval()(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)



@pytest.mark.slow
def test_eval_report_page_of_a_merged_onevision_lora_run(tiny_models, anyres_data, next_stage1, tmp_path, capsys):
    """``llava eval --report`` on LlavaOnevision, a merged LoRA run (#26)."""
    from llava.export.merge import merge_lora
    from tests.report.page_checks import eval_report_via_cli, screenshot

    run_dir = tmp_path / "lora"
    train(anyres_argv(tiny_models, anyres_data, run_dir, stage=2, ratio="anyres_max_2", extra=[
        "--pretrain_mm_mlp_adapter", str(next_stage1["dir"] / "mm_projector.safetensors"), "--lora_enable", "True",
        "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "2e-3", "--max_steps", "1", "--save_steps", "100"]))
    merged_dir = merge_lora(run_dir, tmp_path / "merged")
    assert json.loads((merged_dir / "config.json").read_text())["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    eval_report_via_cli(merged_dir, anyres_data["train"], anyres_data["image_folder"], tmp_path / "report", capsys)
    screenshot(tmp_path / "report" / "index.html", tmp_path / "eval_onevision_merged.png")


def test_eval_report_page_of_a_llava_next_checkpoint(anyres_data, next_stage2, tmp_path, capsys):
    """``llava eval --report`` on LlavaNext: images of every size, a two-image and a text-only record (#26)."""
    from tests.report.page_checks import eval_report_via_cli, screenshot

    page = eval_report_via_cli(next_stage2["dir"], anyres_data["train"], anyres_data["image_folder"],
                               tmp_path / "report", capsys)
    assert sorted(len(row["images"]) for row in page.rows)[:2] == [0, 1] and max(len(r["images"]) for r in page.rows) == 2
    screenshot(tmp_path / "report" / "index.html", tmp_path / "eval_llava_next.png")
