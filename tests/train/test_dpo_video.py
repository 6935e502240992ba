"""DPO on video pairs: the pair dataset decodes and counts a video as the SFT dataset does, and the project's loss and
gradients on a batch of video pairs equal a plain native forward + the DPO formula written out here (fp32, 1e-6).

    .venv/bin/python -m pytest tests/train/test_dpo_video.py -q

The reference runs each row (context + chosen, context + rejected) alone through the native
``LlavaOnevisionForConditionalGeneration`` / ``LlavaNextVideoForConditionalGeneration`` with its own
``pixel_values_videos`` (and images), full logits, ``log_softmax`` gathered at the answer tokens and summed, then
``-logsigmoid(beta * h)`` + ``gamma *`` the chosen tokens' mean cross-entropy. The project's side is one forward of
the collated pair batch (2n rows, each pair's video and images encoded once). A short ``llava dpo`` run on video
records saves a checkpoint that ``LlavaOnevisionForConditionalGeneration.from_pretrained`` reads back.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_dpo import perturbed
from transformers import LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from llava.data.dataset import LazySupervisedDataset
from llava.data.preference import DataCollatorForPreference, PreferenceDataset
from llava.data.templates import get_template
from llava.model.builder import build_llava_model, set_use_cache
from llava.model.preference_forward import answer_logps, use_preference_forward
from llava.train.args import DataArguments, ModelArguments
from llava.train.dpo_loss import dpo_objective
from llava.train.train import train
from llava.train.train_dpo import dpo_argv
from tests.data.video_clips import write_video_corpus

FRAMES = 4
KINDS = {  # name: (--mm_newline_position, --mm_spatial_pool_mode, --image_aspect_ratio, native class)
    "onevision": ("one_token", "bilinear", "anyres_max_2", LlavaOnevisionForConditionalGeneration),
    "next_video": ("no_token", "average", "anyres", LlavaNextVideoForConditionalGeneration),
}


@pytest.fixture(scope="module")
def video_pairs(tmp_path_factory) -> dict:
    """Pairs over the video corpus: each video's direction chosen and the other rejected (LLaVA-NeXT's prompt form,
    with and without a placeholder), the image+video record as a conversation-form pair, an image pair, a text pair;
    and the chosen conversations as SFT records."""
    root = tmp_path_factory.mktemp("dpo_video")
    corpus = write_video_corpus(root, n_videos=4, n_images=1)
    pairs, sft = [], []
    for r in corpus["records"]:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        other = {"right": "left", "left": "right", "red": "blue", "yes": "no", "hi": "no"}[answer]
        base = {k: r[k] for k in ("id", "image", "video") if k in r}
        if r["id"] == "mix":
            pair = {**base, "conversations": [{"from": "human", "value": question},
                                              {"from": "gpt", "chosen": answer, "rejected": other}]}
        else:  # "v0", "i0": no placeholder in the prompt (LLaVA-NeXT puts it in front)
            bare = question.replace("<image>\n", "").replace("<video>", "").strip()
            prompt = bare if r["id"] in ("v0", "i0") else question
            pair = {**base, "prompt": prompt, "chosen": answer, "rejected": other}
            if r["id"] in ("v0", "i0"):
                question = ("<video>\n" if "video" in r else "<image>\n") + bare
        pairs.append(pair)
        sft.append({**base, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    (root / "pairs.json").write_text(json.dumps(pairs))
    (root / "sft.json").write_text(json.dumps(sft))
    return {**corpus, "pairs": root / "pairs.json", "sft": root / "sft.json", "n": len(pairs)}


def build_video_kind(tiny_models, video_pairs, kind: str):
    newline, pool, ratio, _ = KINDS[kind]
    model_args = ModelArguments(model_name_or_path=str(tiny_models["llm"]), vision_tower=str(tiny_models["vision_tower"]),
                                mm_patch_merge_type="spatial_unpad", mm_newline_position=newline,
                                mm_spatial_pool_mode=pool, mm_spatial_pool_stride=2)
    data_args = DataArguments(data_path=str(video_pairs["pairs"]), image_folder=str(video_pairs["image_folder"]),
                              video_folder=str(video_pairs["video_folder"]), frames_upbound=FRAMES, force_sample=True,
                              image_aspect_ratio=ratio, image_grid_pinpoints="(1x1),...,(2x2)")
    torch.manual_seed(0)
    built = build_llava_model(model_args, data_args=data_args)
    set_use_cache(built.model, False)
    common = dict(template=get_template("vicuna_v1"), image_processor=built.image_processor,
                  image_folder=data_args.image_folder, image_token_id=built.image_token_id,
                  num_image_tokens=built.num_image_tokens, model_max_length=4096, image_aspect_ratio=ratio,
                  anyres=built.layout, show_progress=False, video=built.video, video_folder=data_args.video_folder,
                  video_token_id=built.model.config.video_token_id)
    pairs = PreferenceDataset(data_args.data_path, built.tokenizer, **common)
    sft = LazySupervisedDataset(str(video_pairs["sft"]), built.tokenizer, index_cache_dir=None, **common)
    return built, pairs, sft


def native_row_logps(model, item: dict, side: str) -> tuple[torch.Tensor, int]:
    """Summed log p(answer tokens) of one row through the plain native forward (full logits, its own video)."""
    ids, labels = item[f"{side}_input_ids"][None], item[f"{side}_labels"][None]
    kwargs = {}
    if item.get("pixel_values_videos") is not None:
        kwargs["pixel_values_videos"] = item["pixel_values_videos"]
    if item["pixel_values"] is not None:
        kwargs.update(pixel_values=item["pixel_values"], image_sizes=item["image_sizes"])
        if isinstance(model, LlavaOnevisionForConditionalGeneration):
            kwargs["batch_num_images"] = torch.tensor([len(item["image_sizes"])])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs).logits.float()
    targets = labels[0, 1:]
    mask = targets != -100
    token = logits[0, :-1].log_softmax(-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return token[mask].sum(), int(mask.sum())


@pytest.mark.parametrize("kind", list(KINDS))
def test_video_pairs_loss_and_gradients_equal_native_reference(tiny_models, video_pairs, kind):
    built, dataset, sft = build_video_kind(tiny_models, video_pairs, kind)
    assert isinstance(built.model, KINDS[kind][3])
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == video_pairs["n"] == len(sft)
    video_id = built.model.config.video_token_id
    per_video = built.video.video_tokens(FRAMES)

    # the pair dataset decodes and counts as the SFT dataset: the chosen row is the SFT sample of that conversation
    by_id = {sft.record(i).id: sft[i] for i in range(len(sft))}
    for i, item in enumerate(items):
        record, twin = dataset.record(i), by_id[dataset.record(i).id]
        assert torch.equal(item["chosen_input_ids"], twin["input_ids"]), record.id
        for side in ("chosen", "rejected"):
            assert (item[f"{side}_input_ids"] == video_id).sum() == (per_video if record.video else 0), record.id
        if record.video:
            assert item["pixel_values_videos"].shape == (1, FRAMES, 3, 64, 64)
            assert torch.equal(item["pixel_values_videos"], twin["pixel_values_videos"]), record.id
        else:
            assert "pixel_values_videos" not in item and twin.get("pixel_values_videos") is None
    assert sum(r.video is not None for r in dataset.records) >= 5

    reference = built.model.eval()
    policy = perturbed(reference).train()
    beta, alpha, gamma = 0.5, 0.8, 0.3
    rows = {side: [native_row_logps(policy, x, side) for x in items] for side in ("chosen", "rejected")}
    with torch.no_grad():
        ref_rows = {side: [native_row_logps(reference, x, side)[0] for x in items] for side in ("chosen", "rejected")}
    pc, pr = (torch.stack([s for s, _ in rows[side]]) for side in ("chosen", "rejected"))
    nc = torch.tensor([float(n) for _, n in rows["chosen"]])
    rc, rr = torch.stack(ref_rows["chosen"]), torch.stack(ref_rows["rejected"])
    expected = alpha * (-F.logsigmoid(beta * ((pc - pr) - (rc - rr)))).mean() + gamma * (-pc.sum() / nc.sum())
    params = [p for p in policy.parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)

    batch = DataCollatorForPreference(built.tokenizer.pad_token_id, batch_num_images=kind == "onevision",
                                      join_videos=kind == "next_video")(items)
    n_frames = FRAMES * sum(x.get("pixel_values_videos") is not None for x in items)
    assert batch["pixel_values_videos"].shape[:2] == ((n_frames // FRAMES, FRAMES) if kind == "onevision"
                                                      else (1, n_frames))
    use_preference_forward(policy)
    use_preference_forward(reference)
    tower_rows = []
    handle = policy.model.vision_tower.register_forward_hook(lambda m, a, o: tower_rows.append(a[0].shape[0]))
    policy_sums, counts = answer_logps(policy, batch)
    handle.remove()
    assert tower_rows.count(n_frames) == 1 and sum(tower_rows) < 2 * n_frames  # each pair's video encoded once
    with torch.no_grad():
        ref_sums, _ = answer_logps(reference, batch)
    loss, _ = dpo_objective(policy_sums, counts, ref_sums, beta=beta, dpo_alpha=alpha, gamma=gamma,
                            loss_type="sigmoid")
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    torch.testing.assert_close(policy_sums, torch.cat([pc, pr]).detach(), atol=1e-5, rtol=1e-6)
    # the loss (~2.5) in float32 ulps (2.4e-7 each): measured 1 ulp, held to 3.5e-6 (atol 1e-6 alone left 4x margin)
    torch.testing.assert_close(loss, expected.detach(), atol=1e-6, rtol=1e-6)
    assert expected.item() > 0.1 and abs(expected.item() - alpha * 0.6931) > 1e-3  # policy != reference
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    checked = 0
    for name, a, b in zip(names, grads, expected_grads):
        assert (a is None) == (b is None) or (a is not None and not a.any()) or (b is not None and not b.any()), name
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
            checked += "vision_tower" in name and bool(b.any())
    assert checked  # the tower's gradients (the videos' frames flow through it) are among those compared


def test_llava_dpo_on_video_pairs_saves_native_onevision(tiny_models, video_pairs, tmp_path):
    out, data = tmp_path / "dpo", tmp_path / "video_pairs.jsonl"  # every step trains on video pairs
    data.write_text("".join(json.dumps(r) + "\n" for r in json.loads(video_pairs["pairs"].read_text()) if "video" in r))
    trainer = train(dpo_argv([
        "--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
        "--version", "vicuna_v1", "--data_path", str(data),
        "--image_folder", str(video_pairs["image_folder"]), "--video_folder", str(video_pairs["video_folder"]),
        "--frames_upbound", str(FRAMES), "--force_sample", "True", "--mm_newline_position", "one_token",
        "--mm_spatial_pool_mode", "bilinear", "--image_aspect_ratio", "anyres_max_2",
        "--image_grid_pinpoints", "(1x1),...,(2x2)", "--mm_patch_merge_type", "spatial_unpad",
        "--beta", "0.1", "--dpo_alpha", "1.0", "--gamma", "0", "--group_by_modality_length", "True",
        "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--seed", "0",
        "--model_max_length", "1024", "--output_dir", str(out)]))
    logged = [e for e in trainer.state.log_history if "rewards/margins" in e]
    assert len(logged) == 2 and all(abs(e["loss"]) < 10 for e in logged)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    native = LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
    ds = trainer.train_dataset
    assert len(ds) == 5 and all(r.video for r in ds.records)
    batch = trainer.data_collator([ds[i] for i in range(2)])
    videos = batch["pixel_values_videos"]  # the n pairs' videos; the stock forward takes one per row (2n rows)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "pixel_values_videos": torch.cat([videos, videos])}
    assert (batch["input_ids"] == config["video_token_index"]).any()
    use_preference_forward(trainer.model, False)  # the stock forward of the trained model
    with torch.no_grad():
        expected = trainer.model.eval()(**inputs).logits
        got = native(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_bad_video_pairs_are_named_and_the_pair_index_caches_video(tiny_models, video_pairs, tmp_path, capsys):
    """A missing video and a path leaving --video_folder are named by record (dataset, ``--on_bad_sample skip``, and
    ``llava data check``); the cached pair index gives the same pairs, lengths and modalities on a restart."""
    from llava.cli import main
    from llava.data.validate import DataError

    pairs = json.loads(video_pairs["pairs"].read_text())
    bad = [{"id": "gone", "video": "nope.mp4", "prompt": "Which way?", "chosen": "left", "rejected": "right"},
           {"id": "escape", "video": "../pairs.json", "prompt": "Which way?", "chosen": "left", "rejected": "right"}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs + bad))
    built, _, _ = build_video_kind(tiny_models, video_pairs, "onevision")
    kwargs = dict(template=get_template("vicuna_v1"), image_processor=built.image_processor,
                  image_folder=str(video_pairs["image_folder"]), image_token_id=built.image_token_id,
                  num_image_tokens=built.num_image_tokens, model_max_length=4096, image_aspect_ratio="anyres_max_2",
                  anyres=built.layout, show_progress=False, video=built.video,
                  video_folder=str(video_pairs["video_folder"]), video_token_id=built.model.config.video_token_id)
    with pytest.raises(DataError, match="video_missing"):
        PreferenceDataset(path, built.tokenizer, **kwargs)
    first = PreferenceDataset(path, built.tokenizer, on_bad_sample="skip", index_cache_dir=tmp_path / "c", **kwargs)
    assert first.bad_samples_report()["invalid_records"]["counts"] == {"video_missing": 1, "video_outside_folder": 1}
    again = PreferenceDataset(path, built.tokenizer, on_bad_sample="skip", index_cache_dir=tmp_path / "c", **kwargs)
    assert (first.index_from_cache, again.index_from_cache) == (False, True)
    assert again.modalities == first.modalities and sorted(set(first.modalities)) == [0, 1, 2, 3]
    assert again.lengths == first.lengths == [len(x["chosen_input_ids"]) + len(x["rejected_input_ids"])
                                              for x in (first[i] for i in range(len(first)))]
    no_video = {k: v for k, v in kwargs.items() if k not in ("video", "video_folder", "video_token_id")}
    text_and_images = PreferenceDataset(path, built.tokenizer, on_bad_sample="skip", **no_video)
    assert text_and_images.bad_samples_report()["invalid_records"]["counts"] == {"video_not_enabled": 7}

    code = main(["data", "check", "--data_path", str(path), "--image_folder", str(video_pairs["image_folder"]),
                 "--video_folder", str(video_pairs["video_folder"]), "--frames_upbound", str(FRAMES),
                 "--force_sample", "True", "--model_name_or_path", str(tiny_models["llm"]),
                 "--vision_tower", str(tiny_models["vision_tower"]), "--version", "vicuna_v1",
                 "--image_aspect_ratio", "anyres_max_2", "--image_grid_pinpoints", "(1x1),...,(2x2)",
                 "--mm_patch_merge_type", "spatial_unpad", "--mm_newline_position", "one_token",
                 "--mm_spatial_pool_mode", "bilinear", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert {kind: info["record_ids"] for kind, info in report["problems"].items()} == {
        "video_missing": ["gone"], "video_outside_folder": ["escape"]}
