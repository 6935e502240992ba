"""Video training end to end: video, image, image+video and text records in one run, saved as native
LlavaOnevision (bilinear pooling, one newline per video) or LlavaNextVideo (average pooling, no newline).

    .venv/bin/python -m pytest tests/train/test_video_train.py -q

The saved checkpoint loads with ``LlavaOnevisionForConditionalGeneration`` / ``LlavaNextVideoForConditionalGeneration``
``.from_pretrained`` (no code of ours) and its logits on a batch holding a video equal the trained model's (fp32,
1e-5); a LoRA run merges with the same parity. The processors' video halves need torchvision (absent here): their
saved settings are checked to count, by the processors' own formulas, the video tokens training used.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from llava.constants import IGNORE_INDEX
from llava.data.collator import DataCollatorForSupervisedDataset, DataCollatorWithPacking
from llava.data.tokenize import SampleRejected, tokenize_conversation
from llava.errors import UsageValueError
from llava.train.args import parse_args
from llava.train.train import train
from tests.data.video_clips import write_video_corpus

FRAMES = 4


@pytest.fixture(scope="module")
def video_corpus(tmp_path_factory):
    return write_video_corpus(tmp_path_factory.mktemp("video_corpus"))


def video_argv(tiny_models, corpus, out, *, newline: str = "one_token", extra=()) -> list[str]:
    onevision = newline == "one_token"
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--data_path", str(corpus["train"]), "--image_folder", str(corpus["image_folder"]),
            "--video_folder", str(corpus["video_folder"]), "--version", "vicuna_v1",
            "--image_aspect_ratio", "anyres_max_2" if onevision else "anyres", "--mm_patch_merge_type", "spatial_unpad",
            "--image_grid_pinpoints", "(1x1),...,(2x2)", "--mm_newline_position", newline,
            "--mm_spatial_pool_mode", "bilinear" if onevision else "average", "--mm_spatial_pool_stride", "2",
            "--frames_upbound", str(FRAMES), "--force_sample", "True", "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--max_steps", "3", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_steps", "100", "--report_to", "none", "--model_max_length", "1024", "--use_cpu", "True",
            "--seed", "0", *extra]


def _mixed_batch(trainer):
    """A batch with a video record, a frame-directory video, an image, the image+video record and the text record."""
    ds = trainer.train_dataset
    ids = {ds.record(i).id: i for i in range(len(ds))}
    picked = [ids[k] for k in ("v0", "v1", "i1", "mix", "text")]
    return trainer.data_collator([ds[i] for i in picked]), [ds.record(i) for i in picked]


def _check_native_parity(trainer, out, native_cls, model_type):
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [native_cls.__name__] and config["model_type"] == model_type
    tokenizer = trainer.processing_class.tokenizer
    assert config["video_token_index"] == tokenizer.convert_tokens_to_ids("<video>") != config["image_token_index"]
    batch, records = _mixed_batch(trainer)
    assert batch["pixel_values_videos"].shape[-3:] == (3, 64, 64)
    model = native_cls.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(**batch).logits
        expected = trainer.model.eval()(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    return config, batch, records


@pytest.fixture(scope="module")
def onevision_run(tiny_models, video_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("onevision_video")
    return {"dir": out, "trainer": train(video_argv(tiny_models, video_corpus, out,
                                                    extra=["--group_by_modality_length", "True"]))}


def test_onevision_video_run_saves_native_onevision_with_logit_parity(onevision_run):
    trainer, tmp_path = onevision_run["trainer"], onevision_run["dir"]
    config, batch, records = _check_native_parity(trainer, tmp_path, LlavaOnevisionForConditionalGeneration,
                                                  "llava_onevision")
    assert batch["pixel_values_videos"].shape[:2] == (3, FRAMES)  # v0, v1 (frames directory), mix
    processor = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaOnevisionProcessor" and processor["video_token"] == "<video>"
    assert processor["video_processor"]["size"] == {"height": 64, "width": 64}
    # LlavaOnevisionProcessor.replace_video_token with the saved num_image_tokens: tokens of each video
    side = int(math.sqrt(processor["num_image_tokens"]))
    per_video = FRAMES * math.ceil(side / 2) ** 2 + 1
    video_id = config["video_token_index"]
    counts = [(row == video_id).sum().item() for row in batch["input_ids"]]
    assert counts == [per_video if r.video else 0 for r in records]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_next_video_run_saves_native_llava_next_video_with_logit_parity(tiny_models, video_corpus, tmp_path):
    trainer = train(video_argv(tiny_models, video_corpus, tmp_path, newline="no_token"))
    config, batch, records = _check_native_parity(trainer, tmp_path, LlavaNextVideoForConditionalGeneration,
                                                  "llava_next_video")
    assert (config["spatial_pool_mode"], config["spatial_pool_stride"]) == ("average", 2)
    assert batch["pixel_values_videos"].shape[:2] == (1, 3 * FRAMES)  # no newline: the videos' frames as one
    processor = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaNextVideoProcessor" and processor["video_token"] == "<video>"
    size = processor["video_processor"]["size"]
    assert size == {"height": 64, "width": 64} and not processor["video_processor"]["do_center_crop"]
    # LlavaNextVideoProcessor.replace_video_token with the saved patch size and the video processor's frame size
    per_video = (size["height"] // processor["patch_size"]) * (size["width"] // processor["patch_size"]) // 4 * FRAMES
    counts = [(row == config["video_token_index"]).sum().item() for row in batch["input_ids"]]
    assert counts == [per_video if r.video else 0 for r in records]


@pytest.mark.parametrize(("newline", "native"), [("one_token", LlavaOnevisionForConditionalGeneration),
                                                 ("no_token", LlavaNextVideoForConditionalGeneration)])
def test_video_lora_run_merges_with_logit_parity(tiny_models, video_corpus, tmp_path, newline, native):
    from llava.export.merge import merge_lora

    run_dir = tmp_path / "lora"
    trainer = train(video_argv(tiny_models, video_corpus, run_dir, newline=newline, extra=[
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "2e-3"]))
    batch, _ = _mixed_batch(trainer)
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(**batch).logits  # the adapter model as it trained
        with model.disable_adapter():
            assert (model(**batch).logits - expected).abs().max() > 1e-3  # the adapter matters
    merged_dir = merge_lora(run_dir, tmp_path / "merged")
    assert json.loads((merged_dir / "config.json").read_text())["architectures"] == [native.__name__]
    merged = native.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("extra", "message"), [
    (["--mm_newline_position", "grid"], r"--mm_newline_position grid: .* no native class.* use one_token"),
    (["--mm_newline_position", "frame"], r"--mm_newline_position frame: .* use one_token"),
    (["--mm_spatial_pool_mode", "average"], r"--mm_spatial_pool_mode average with --mm_newline_position one_token: .*"
                                            r"use bilinear"),
    (["--mm_spatial_pool_stride", "4"], r"--mm_spatial_pool_stride 4: .* use 2"),
    (["--image_aspect_ratio", "anyres"], r"--image_aspect_ratio anyres with --mm_newline_position one_token: .*"
                                         r"anyres_max_9"),
    (["--force_sample", "False"], r"--per_device_train_batch_size 4 with --mm_newline_position one_token needs "
                                  r"--force_sample True"),
])
def test_settings_no_native_class_computes_are_refused_at_start(tiny_models, video_corpus, tmp_path, extra, message):
    with pytest.raises(UsageValueError, match=message) as info:
        parse_args(video_argv(tiny_models, video_corpus, tmp_path, extra=extra))
    assert "\n" not in str(info.value)


def test_packed_video_batch_equals_padded_and_videos_follow_their_tokens(onevision_run):
    trainer = onevision_run["trainer"]
    ds = trainer.train_dataset
    ids = {ds.record(i).id: i for i in range(len(ds))}
    samples = [ds[ids[k]] for k in ("v0", "mix", "v2", "i1")]
    n = [len(x["input_ids"]) for x in samples]
    assert n[1] > max(n[0], n[2])
    pad = trainer.processing_class.tokenizer.pad_token_id
    collate = DataCollatorWithPacking(pad, max_length=max(n[1] + n[3], n[0] + n[2]), batch_num_images=True)
    rows = collate.rows_of(n)
    assert rows == [[0, 2], [1, 3]]  # rows reorder the samples (v0, v2 | mix, i1): videos must follow their tokens
    packed = collate(samples)
    order = [i for row in rows for i in row if samples[i].get("pixel_values_videos") is not None]
    expected_videos = torch.cat([samples[i]["pixel_values_videos"] for i in order])
    assert torch.equal(packed["pixel_values_videos"], expected_videos)
    padded = DataCollatorForSupervisedDataset(pad, batch_num_images=True)(samples)
    model = trainer.model.eval()
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        torch.testing.assert_close(model(**packed, use_cache=False).loss, loss_padded, atol=1e-5, rtol=0)
        in_batch_order = torch.cat([x["pixel_values_videos"] for x in samples if x.get("pixel_values_videos") is not None])
        assert not torch.equal(in_batch_order, expected_videos)
        right = model(**packed, use_cache=False).logits
        wrong = model(**{**packed, "pixel_values_videos": in_batch_order}, use_cache=False).logits
        assert (wrong - right).abs().max() > 1e-3  # the order matters to the model: the check can fail


def test_grouped_sampler_keeps_video_a_modality_of_its_own(onevision_run):
    trainer = onevision_run["trainer"]
    ds = trainer.train_dataset
    expected = [2 * bool(ds.record(i).video) + bool(ds.record(i).images) for i in range(len(ds))]
    assert ds.modalities == expected and set(expected) == {0, 1, 2, 3}  # 3: the image + video record
    sampler = trainer._get_train_sampler()
    assert list(sampler.modalities) == expected
    order = sampler.indices()
    batch = trainer.args.per_device_train_batch_size
    n_full = sum(expected.count(m) // batch for m in (0, 1, 2, 3))  # full megabatches hold one modality each
    steps = [order[k * batch:(k + 1) * batch] for k in range(n_full)]
    assert all(len({expected[i] for i in step}) == 1 for step in steps)
    assert sorted(order) == list(range(len(ds)))


def test_truncation_never_cuts_a_video(onevision_run):
    trainer = onevision_run["trainer"]
    ds = trainer.train_dataset
    record = ds.record(0)
    assert record.video is not None
    tokenizer = trainer.processing_class.tokenizer
    image_id, video_id = ds.image_token_id, ds.video_token_id
    long_answer = [type(m)(m.role, m.content + " right" * 200 if m.role == "assistant" else m.content)
                   for m in record.messages]
    per_video = ds.video.video_tokens(FRAMES)
    full = tokenize_conversation(long_answer, ds.template, tokenizer, image_token_id=image_id, num_image_tokens=1,
                                 model_max_length=10_000, video_token_id=video_id, num_video_tokens=per_video)
    first = full.input_ids.index(video_id)
    for limit in (first + per_video + 20, 120):  # cut after the video: the whole video kept
        cut = tokenize_conversation(long_answer, ds.template, tokenizer, image_token_id=image_id, num_image_tokens=1,
                                    model_max_length=limit, video_token_id=video_id, num_video_tokens=per_video)
        assert cut.truncated and cut.input_ids == full.input_ids[:limit] and cut.input_ids.count(video_id) == per_video
        assert any(label != IGNORE_INDEX for label in cut.labels)
    for limit in (first + 1, first + per_video - 1):  # inside the video: refused, never cut
        with pytest.raises(SampleRejected) as info:
            tokenize_conversation(long_answer, ds.template, tokenizer, image_token_id=image_id, num_image_tokens=1,
                                  model_max_length=limit, video_token_id=video_id, num_video_tokens=per_video)
        assert info.value.kind == "video_tokens_exceed_max_length"


def test_predict_video_prompts_as_training_and_answers(onevision_run, video_corpus, capsys):
    from llava.cli import main
    from llava.serve.predict import Predictor

    trainer, out = onevision_run["trainer"], onevision_run["dir"]
    ds = trainer.train_dataset
    i = next(i for i in range(len(ds)) if ds.record(i).id == "v1")  # the frames directory
    record = ds.record(i)
    predictor = Predictor.load(out)
    ids, pixels = predictor.video_prompt(video_corpus["video_folder"], record.video, record.messages[0].content)
    sample = ds[i]
    assert ids == sample["input_ids"][:len(ids)].tolist()  # the training prompt up to the answer
    assert torch.equal(pixels, sample["pixel_values_videos"])
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--video", str(video_corpus["video_folder"] / "clip0.mp4"),
                 "--prompt", "Which way does the dot move?", "--max_new_tokens", "3"]) == 0
    expected = predictor.answer_video(video_corpus["video_folder"], "clip0.mp4", "Which way does the dot move?", 3)
    assert capsys.readouterr().out == expected + "\n"  # the tiny model may well answer with its end token: ""


def test_mixture_entry_trains_its_videos_from_its_own_video_folder(tiny_models, video_corpus, tmp_path):
    """A mixture entry's ``video_folder`` is where its videos load from (index and ``__getitem__``); an entry without
    one uses ``--video_folder``, here a decoy folder whose ``clip0.mp4`` is another clip (a blue dot moving left)."""
    from llava.data.video import decode_video_frames, frames_to_pixel_values, probe_video, sample_frame_indices
    from tests.data.video_clips import moving_dot_frames, write_clip

    decoy = tmp_path / "decoy_videos"
    write_clip(decoy / "clip0.mp4", moving_dot_frames(8, -1, colour=(40, 40, 250)), fps=4)
    other = tmp_path / "decoy.json"
    other.write_text(json.dumps([{"id": "decoy", "video": "clip0.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhich way does the dot move?"}, {"from": "gpt", "value": "left"}]}]))
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(f"datasets:\n  - json_path: {video_corpus['train']}\n"
                       f"    video_folder: {video_corpus['video_folder']}\n  - json_path: {other}\n")
    argv = video_argv(tiny_models, video_corpus, tmp_path / "out")
    for flag, value in (("--data_path", mixture), ("--video_folder", decoy), ("--max_steps", 1)):
        argv[argv.index(flag) + 1] = str(value)
    ds = train(argv).train_dataset  # any video of entry 1 looked up in the decoy folder: video_missing, no run
    assert not ds.problems.counts and len(ds) == len(video_corpus["records"]) + 1
    ids = {ds.record(i).id: i for i in range(len(ds))}
    assert ds.sample_video_folder(ids["v0"]) == str(video_corpus["video_folder"])
    assert ds.sample_video_folder(ids["decoy"]) == str(decoy)

    def pixels(folder):
        info = probe_video(folder, "clip0.mp4")
        indices = sample_frame_indices(info.frames, info.fps, ds.video.sampling)
        frames = decode_video_frames(folder, "clip0.mp4", indices, size=ds.video.frame_size, info=info)
        return frames_to_pixel_values(frames, ds.image_processor)[None]

    own, decoyed = pixels(video_corpus["video_folder"]), pixels(decoy)
    assert not torch.equal(own, decoyed)
    assert torch.equal(ds[ids["v0"]]["pixel_values_videos"], own)
    assert torch.equal(ds[ids["decoy"]]["pixel_values_videos"], decoyed)


def test_a_mixture_entrys_video_folder_alone_turns_video_on(tiny_models, video_corpus, tmp_path):
    """No ``--video_folder``: an entry's own ``video_folder`` turns video on and selects the video class (here
    LlavaNextVideo), and that entry's videos train from its folder; the same flags on image data leave video off."""
    from llava.data.video_flags import video_enabled
    from llava.train.args import parse_args

    images_only = tmp_path / "images.json"
    images_only.write_text(json.dumps([r for r in video_corpus["records"] if not r.get("video")]))
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(f"datasets:\n  - json_path: {video_corpus['train']}\n"
                       f"    video_folder: {video_corpus['video_folder']}\n  - json_path: {images_only}\n")
    argv = video_argv(tiny_models, video_corpus, tmp_path / "out", newline="no_token")
    del argv[argv.index("--video_folder"):argv.index("--video_folder") + 2]
    argv[argv.index("--data_path") + 1] = str(mixture)
    argv[argv.index("--max_steps") + 1] = "1"
    trainer = train(argv)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextVideoForConditionalGeneration"]
    ds = trainer.train_dataset
    v0 = next(i for i in range(len(ds)) if ds.record(i).id == "v0")
    assert ds[v0]["pixel_values_videos"].shape[:2] == (1, FRAMES)
    plain = parse_args([*argv[:argv.index("--data_path") + 1], str(images_only), *argv[argv.index("--data_path") + 2:]])
    assert not video_enabled(plain[1]) and video_enabled(parse_args(argv)[1])  # the model class follows the data
