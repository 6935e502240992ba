"""DPO: the project's loss and gradients equal an independent computation, for Llava, LlavaNext and LlavaOnevision.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/train/test_dpo.py

The reference is written out here: each row (context + chosen, context + rejected) through the plain native model
(full logits, one row at a time, its own images), ``log_softmax`` gathered at the answer tokens and summed, then the
DPO / IPO formulas of TRL and LLaVA-NeXT (sigmoid: ``-logsigmoid(beta * h)``; ipo: ``(h - 1/(2 beta))^2`` on per-token
means; ``+ gamma *`` mean cross-entropy of the chosen tokens). The project's side is one forward of the collated pair
batch (chosen and rejected rows together, each pair's images once, the LM head on answer positions only). Loss and
every gradient agree to 1e-6 (fp32), on batches mixing image sizes (anyres), a text-only pair and a multi-turn one.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from llava.data.preference import DataCollatorForPreference, PreferenceDataset
from llava.data.templates import get_template
from llava.model.builder import build_llava_model, set_use_cache
from llava.model.preference_forward import LinearTokenLogProbs, answer_logps, use_preference_forward
from llava.train.args import DataArguments, ModelArguments
from llava.train.dpo_loss import dpo_objective

COLOURS = ("red", "green", "blue")
KINDS = {  # name: (--image_aspect_ratio, --image_grid_pinpoints, native class)
    "llava": ("pad", None, "LlavaForConditionalGeneration"),
    "llava_next": ("anyres", "(1x1),...,(3x3)", "LlavaNextForConditionalGeneration"),
    "llava_onevision": ("anyres_max_2", "(1x1),...,(3x3)", "LlavaOnevisionForConditionalGeneration"),
}


@pytest.fixture(scope="session")
def preference_data(anyres_data, tmp_path_factory) -> dict:
    """Pairs over the anyres images (several sizes): the right colour chosen, another rejected; a text-only pair;
    a multi-turn conversation-form pair. ``{"train": path, "image_folder": dir}``."""
    raw = json.loads(anyres_data["train"].read_text())
    records = []
    for r in raw:
        if r.get("image") not in ("wide.png", "tall.png", "big.png", "img2.png", "img3.png", "img4.png"):
            continue
        right = r["conversations"][1]["value"]
        wrong = COLOURS[(COLOURS.index(right) + 1) % 3]
        records.append({"id": f"p{r['id']}", "image": r["image"], "prompt": "What colour is the box?",
                        "chosen": right, "rejected": wrong})
    records.append({"id": "text", "prompt": "Say hi.", "chosen": "hi", "rejected": "no"})
    records.append({"id": "multi", "image": "img1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the box?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "chosen": "yes red", "rejected": "no blue"}]})
    path = tmp_path_factory.mktemp("preference") / "pairs.json"
    path.write_text(json.dumps(records))
    return {"train": path, "image_folder": anyres_data["image_folder"], "n": len(records)}


def build_kind(tiny_models, preference_data, kind: str):
    ratio, pinpoints, _ = KINDS[kind]
    model_args = ModelArguments(model_name_or_path=str(tiny_models["llm"]), vision_tower=str(tiny_models["vision_tower"]),
                                mm_patch_merge_type="spatial_unpad" if ratio != "pad" else "flat")
    data_args = DataArguments(data_path=str(preference_data["train"]), image_folder=str(preference_data["image_folder"]),
                              image_aspect_ratio=ratio, image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    built = build_llava_model(model_args, data_args=data_args)
    set_use_cache(built.model, False)
    dataset = PreferenceDataset(data_args.data_path, built.tokenizer, template=get_template("vicuna_v1"),
                                image_processor=built.image_processor, image_folder=data_args.image_folder,
                                image_token_id=built.image_token_id, num_image_tokens=built.num_image_tokens,
                                model_max_length=4096, image_aspect_ratio=ratio, anyres=built.layout,
                                show_progress=False)
    return built, dataset


def native_row_logps(model, item: dict, side: str, image_id: int) -> tuple[torch.Tensor, int]:
    """Summed log p(answer tokens) of one row through the plain native forward (full logits), and its count."""
    ids, labels = item[f"{side}_input_ids"][None], item[f"{side}_labels"][None]
    kwargs = {}
    if item["pixel_values"] is not None:
        kwargs["pixel_values"] = item["pixel_values"]
        if "image_sizes" in item:
            kwargs["image_sizes"] = item["image_sizes"]
        if type(model).__name__.startswith("LlavaOnevision"):
            kwargs["batch_num_images"] = torch.tensor([len(item["image_sizes"])])
    assert (ids == image_id).any() == ("pixel_values" in kwargs)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs).logits.float()
    targets = labels[0, 1:]
    mask = targets != -100
    token = logits[0, :-1].log_softmax(-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return token[mask].sum(), int(mask.sum())


def reference_objective(pc, pr, rc, rr, nc, nr, *, beta, alpha, gamma, loss_type):
    """DPO / IPO + SFT written out (TRL's and LLaVA-NeXT's formulas) on per-pair tensors."""
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))
    else:
        losses = ((pc / nc - pr / nr) - (rc / nc - rr / nr) - 1 / (2 * beta)) ** 2
    return alpha * losses.mean() + gamma * (-pc.sum() / nc.sum())


def perturbed(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """A policy that differs from the reference (the starting model) in every trainable weight."""
    policy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return policy


@pytest.mark.parametrize("kind,loss_type", [("llava", "sigmoid"), ("llava_next", "sigmoid"),
                                            ("llava_onevision", "sigmoid"), ("llava_next", "ipo")])
def test_loss_and_gradients_equal_native_reference(tiny_models, preference_data, kind, loss_type):
    built, dataset = build_kind(tiny_models, preference_data, kind)
    assert type(built.model).__name__ == KINDS[kind][2]
    reference = built.model.eval()
    policy = perturbed(reference).train()
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == preference_data["n"]
    if kind != "llava":  # anyres: the batch mixes image sizes
        assert len({tuple(x["image_sizes"][0].tolist()) for x in items if x["pixel_values"] is not None}) >= 6
    beta, alpha, gamma = 0.5, 0.8, 0.3
    image_id = built.image_token_id

    # the independent computation: one native forward per row, full logits
    rows = {side: [native_row_logps(policy, x, side, image_id) for x in items] for side in ("chosen", "rejected")}
    with torch.no_grad():
        ref_rows = {side: [native_row_logps(reference, x, side, image_id)[0] for x in items]
                    for side in ("chosen", "rejected")}
    pc, pr = (torch.stack([s for s, _ in rows[side]]) for side in ("chosen", "rejected"))
    nc, nr = (torch.tensor([float(n) for _, n in rows[side]]) for side in ("chosen", "rejected"))
    rc, rr = torch.stack(ref_rows["chosen"]), torch.stack(ref_rows["rejected"])
    expected = reference_objective(pc, pr, rc, rr, nc, nr, beta=beta, alpha=alpha, gamma=gamma, loss_type=loss_type)
    params = [p for p in policy.parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)

    # the project's: one forward of the collated batch (2n rows, n pairs' images) per model
    batch = DataCollatorForPreference(built.tokenizer.pad_token_id,
                                      batch_num_images=kind == "llava_onevision")(items)
    n_images = sum(len(x["pixel_values"]) for x in items if x["pixel_values"] is not None)
    assert batch["pixel_values"].shape[0] == n_images and batch["input_ids"].shape[0] == 2 * len(items)
    use_preference_forward(policy)
    use_preference_forward(reference)
    policy_sums, counts = answer_logps(policy, batch)
    with torch.no_grad():
        ref_sums, _ = answer_logps(reference, batch)
    loss, metrics = dpo_objective(policy_sums, counts, ref_sums, beta=beta, dpo_alpha=alpha, gamma=gamma,
                                  loss_type=loss_type)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    torch.testing.assert_close(policy_sums, torch.cat([pc, pr]).detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(counts.float(), torch.cat([nc, nr]))
    torch.testing.assert_close(loss, expected.detach(), atol=1e-6, rtol=0)
    assert expected.item() > 0.1 and abs(expected.item() - alpha * 0.6931) > 1e-3  # policy != reference
    for p_name, a, b in zip([n for n, p in policy.named_parameters() if p.requires_grad], grads, expected_grads):
        assert (a is None) == (b is None) or (a is not None and not a.any()) or (b is not None and not b.any()), p_name
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=p_name: f"{n}: {m}")
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    torch.testing.assert_close(metrics["rewards/margins"], (chosen_rewards - rejected_rewards).mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["rewards/accuracies"], (chosen_rewards > rejected_rewards).float().mean())
    torch.testing.assert_close(metrics["logps/chosen"], pc.detach().mean(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(metrics["logps/rejected"], pr.detach().mean(), atol=1e-5, rtol=1e-6)


def test_image_encoded_once_per_pair(tiny_models, preference_data):
    built, dataset = build_kind(tiny_models, preference_data, "llava")
    model = built.model
    use_preference_forward(model)
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    items = [dataset[i] for i in range(4)]
    batch = DataCollatorForPreference(built.tokenizer.pad_token_id)(items)
    answer_logps(model, batch)
    handle.remove()
    assert calls == [4]  # one tower call over the 4 pairs' images, for 8 rows


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_token_logprobs_equal_log_softmax(with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=g, requires_grad=True)
    weight = torch.randn(37, 8, generator=g, requires_grad=True)
    bias = torch.randn(37, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 37, (11,), generator=g)
    upstream = torch.randn(11, generator=g)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    got = LinearTokenLogProbs.apply(hidden, weight, bias, targets, 3, torch.float32)  # 4 chunks, the last short
    got_grads = torch.autograd.grad((got * upstream).sum(), inputs)
    ref = F.linear(hidden, weight, bias).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), inputs)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
