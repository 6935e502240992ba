"""The vision tower stops at the selected feature layer: same features and loss, the layers past it not run.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/model/test_tower_cut.py

The reference is the stock tower run in full (``output_hidden_states``) and indexed by hand; the skipped layers'
attention modules are watched with forward hooks to show they are not run (and that a trainable one is).
"""

from __future__ import annotations

import pytest
import torch

from llava.data.collator import DataCollatorForSupervisedDataset
from llava.data.dataset import LazySupervisedDataset
from llava.data.templates import get_template
from llava.model.builder import build_llava_model, set_use_cache
from llava.model.tower_cut import layers_needed, tower_layers, use_tower_cut


@pytest.fixture(scope="module")
def built(tiny_models):
    from llava.train.args import ModelArguments

    built = build_llava_model(
        ModelArguments(model_name_or_path=str(tiny_models["llm"]), vision_tower=str(tiny_models["vision_tower"]))
    )
    set_use_cache(built.model, False)
    built.model.model.vision_tower.requires_grad_(False)  # the stage-2 default: a frozen tower
    return built


@pytest.fixture(scope="module")
def batch(built, shapes_data):
    ds = LazySupervisedDataset(shapes_data["stage2_qa"], built.tokenizer, template=get_template("vicuna_v1"),
                               image_processor=built.image_processor, image_folder=shapes_data["image_folder"],
                               image_token_id=built.image_token_id, num_image_tokens=built.num_image_tokens,
                               model_max_length=512, show_progress=False)
    with_image = [i for i, n in enumerate(ds.modality_lengths) if n > 0][:2]
    return DataCollatorForSupervisedDataset(pad_token_id=built.tokenizer.pad_token_id)([ds[i] for i in with_image])


def test_layers_needed_counts_from_the_embeddings():
    assert layers_needed(-1, 12) == 12
    assert layers_needed(-2, 12) == 11
    assert layers_needed(0, 12) == 0
    assert layers_needed([-2, -5, 3], 12) == 11
    assert layers_needed([3, 6], 12) == 6


def _attention_calls(layers):
    calls = [0] * len(layers)
    handles = [layer.self_attn.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(layers)]
    return calls, handles


@pytest.mark.parametrize("feature_layer", [-2, -3, [0, -2], 1])  # the tiny tower has 2 layers
def test_features_equal_full_tower_and_cut_layers_not_run(built, batch, feature_layer):
    model = built.model.eval()
    llava_model = model.model
    layers = tower_layers(model)
    n = len(layers)
    pixels = batch["pixel_values"]
    with torch.no_grad():
        full = llava_model.vision_tower(pixels, output_hidden_states=True).hidden_states  # n + 1 states
    selected = [feature_layer] if isinstance(feature_layer, int) else feature_layer
    reference = torch.cat([full[i][:, 1:] for i in selected], dim=-1)  # "default": the CLS token dropped
    old = model.config.vision_feature_layer
    model.config.vision_feature_layer = feature_layer
    try:
        cut = use_tower_cut(model)
        keep = max(i if i >= 0 else n + 1 + i for i in selected)
        assert cut == n - keep > 0
        calls, handles = _attention_calls(layers)
        with torch.no_grad():
            got = llava_model.vision_tower(pixels, output_hidden_states=True).hidden_states
            if isinstance(feature_layer, int):  # (a list concatenates features: wider than this projector takes)
                features = llava_model.get_image_features(pixels, vision_feature_layer=feature_layer,
                                                          vision_feature_select_strategy="default").pooler_output
        for h in handles:
            h.remove()
        assert len(got) == n + 1
        runs = 2 if isinstance(feature_layer, int) else 1
        assert calls == [runs] * keep + [0] * (n - keep)  # the layers past the selection never ran
        torch.testing.assert_close(torch.cat([got[i][:, 1:] for i in selected], dim=-1), reference, rtol=0, atol=0)
        if isinstance(feature_layer, int):
            with torch.no_grad():
                expected = llava_model.multi_modal_projector(reference)
            torch.testing.assert_close(torch.stack(features), expected, rtol=0, atol=0)
    finally:
        use_tower_cut(model, False)
        model.config.vision_feature_layer = old
    calls, handles = _attention_calls(layers)
    with torch.no_grad():
        llava_model.vision_tower(pixels)
    for h in handles:
        h.remove()
    assert calls == [1] * n  # switched off: the whole tower runs again


def test_training_loss_and_grads_equal_and_trainable_layer_runs(built, batch):
    model = built.model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    ref_loss, ref_grads = loss_and_grads()
    keys = list(model.state_dict())
    assert use_tower_cut(model) == 1
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert list(model.state_dict()) == keys  # the checkpoint is the full native model
    last = tower_layers(model)[-1]
    last.requires_grad_(True)  # a trainable layer past the selection runs as before
    try:
        calls, handles = _attention_calls([last])
        model(**batch).loss.backward()
        for h in handles:
            h.remove()
        assert calls == [1]
    finally:
        last.requires_grad_(False)
        use_tower_cut(model, False)
        model.zero_grad()
