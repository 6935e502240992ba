"""Model builder: composing a Llava model from a tiny LLM + CLIP, the freezing policy, stage-1 projector files.

Every expectation is computed independently of ``llava.model``: source weights are loaded with
``AutoModelForCausalLM`` / ``CLIPVisionModel``, parameter counts come from the source models' configs and tensors.

    .venv/bin/pytest tests/model/test_builder.py
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
)

from llava.model.builder import apply_freezing, build_llava_model
from llava.train.args import ModelArguments, parse_args


def model_args(tiny_models, **overrides) -> ModelArguments:
    kwargs = {"model_name_or_path": str(tiny_models["llm"]), "vision_tower": str(tiny_models["vision_tower"])}
    return ModelArguments(**{**kwargs, **overrides})


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def n_trainable(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@pytest.fixture(scope="module")
def sources(tiny_models):
    """The source checkpoints, loaded without our code."""
    llm = AutoModelForCausalLM.from_pretrained(tiny_models["llm"])
    clip = CLIPVisionModel.from_pretrained(tiny_models["vision_tower"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llm"])
    return {"llm": llm, "clip": clip, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def built(tiny_models):
    return build_llava_model(model_args(tiny_models))


@pytest.fixture(scope="module")
def expected_counts(sources):
    """Trainable-parameter counts per part, from the source models' configs and parameters alone."""
    llm, clip, tokenizer = sources["llm"], sources["clip"], sources["tokenizer"]
    text_h, vision_h = llm.config.hidden_size, clip.config.hidden_size
    # "<image>" is new to the tiny tokenizer; it has a pad token already, so exactly one row is added.
    assert "<image>" not in tokenizer.get_vocab() and tokenizer.pad_token is not None
    new_rows = 1
    untied = not llm.config.tie_word_embeddings
    llm_total = n_params(llm) + new_rows * text_h * (2 if untied else 1)
    projector = (vision_h * text_h + text_h) + (text_h * text_h + text_h)
    return {"llm": llm_total, "vision": n_params(clip), "projector": projector,
            "embed_rows": llm.config.vocab_size + new_rows, "text_h": text_h}


def test_composed_model_holds_the_source_weights(built, sources):
    model = built.model
    assert isinstance(model, LlavaForConditionalGeneration)
    state = model.state_dict()
    llm_state = sources["llm"].state_dict()
    old_vocab = sources["llm"].config.vocab_size
    for key, tensor in llm_state.items():
        ours = state["lm_head.weight" if key == "lm_head.weight" else key.replace("model.", "model.language_model.", 1)]
        if key in ("lm_head.weight", "model.embed_tokens.weight"):
            assert ours.shape[0] == old_vocab + 1, key
            ours = ours[:old_vocab]  # the new <image> row is appended after the original vocabulary
        torch.testing.assert_close(ours, tensor, rtol=0, atol=0, msg=key)
    for key, tensor in sources["clip"].state_dict().items():
        torch.testing.assert_close(state[f"model.vision_tower.{key}"], tensor, rtol=0, atol=0, msg=key)


def test_image_token_is_a_real_added_token(built, sources):
    tokenizer = built.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == sources["llm"].config.vocab_size  # appended after the original vocabulary
    assert built.model.config.image_token_id == image_id
    assert "<image>" in tokenizer.all_special_tokens
    # a real token: the text "<image>" tokenizes to that single id, whatever surrounds it
    ids = tokenizer("a <image> b", add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == 1
    assert built.model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    # CLIP 64px / patch 16 -> 16 patches (+CLS, dropped by the default "patch" feature)
    assert built.num_image_tokens == (64 // 16) ** 2


@pytest.mark.parametrize("layer", [-1, -3])
def test_vision_feature_layer_follows_select_layer(tiny_models, sources, layer):
    built = build_llava_model(model_args(tiny_models, mm_vision_select_layer=layer))
    assert built.model.config.vision_feature_layer == layer
    assert built.model.config.vision_feature_select_strategy == "default"
    # the projector is fed CLIP's hidden state of that layer, CLS dropped
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = sources["clip"](pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        expected = built.model.model.multi_modal_projector(hidden)
        got = built.model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    torch.testing.assert_close(torch.stack(list(got)), expected)  # one (patches, hidden) tensor per image


@pytest.mark.parametrize(
    "flags, parts",
    [
        ({}, {"llm", "projector"}),
        ({"tune_mm_mlp_adapter": True}, {"projector"}),
        ({"freeze_backbone": True}, {"projector"}),
        ({"unfreeze_mm_vision_tower": True}, {"llm", "projector", "vision"}),
        ({"freeze_mm_mlp_adapter": True}, {"llm"}),
        ({"freeze_backbone": True, "unfreeze_mm_vision_tower": True}, {"projector", "vision"}),
    ],
    ids=["default", "tune_mm_mlp_adapter", "freeze_backbone", "unfreeze_vision", "freeze_projector", "vision+proj"],
)
def test_freezing_policy_counts(tiny_models, expected_counts, flags, parts):
    args = model_args(tiny_models, **flags)
    built = build_llava_model(args)
    apply_freezing(built.model, args, added_tokens=built.added_tokens)
    assert n_trainable(built.model) == sum(expected_counts[p] for p in parts)
    inner = built.model.model
    assert all(p.requires_grad == ("vision" in parts) for p in inner.vision_tower.parameters())
    assert all(p.requires_grad == ("projector" in parts) for p in inner.multi_modal_projector.parameters())
    assert all(p.requires_grad == ("llm" in parts) for p in inner.language_model.parameters())


def test_stage1_with_im_start_end_also_trains_the_input_embeddings(tiny_models, expected_counts):
    args = model_args(tiny_models, tune_mm_mlp_adapter=True, mm_use_im_start_end=True)
    built = build_llava_model(args)
    assert built.added_tokens == 3  # <image>, <im_start>, <im_end>
    apply_freezing(built.model, args, added_tokens=built.added_tokens)
    embed_rows = expected_counts["embed_rows"] + 2
    assert n_trainable(built.model) == expected_counts["projector"] + embed_rows * expected_counts["text_h"]


def _projector_tensors(text_h: int, vision_h: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "0.weight": torch.randn(text_h, vision_h, generator=g),
        "0.bias": torch.randn(text_h, generator=g),
        "2.weight": torch.randn(text_h, text_h, generator=g),
        "2.bias": torch.randn(text_h, generator=g),
    }


def _assert_projector_equals(model, tensors: dict[str, torch.Tensor]) -> None:
    projector = model.model.multi_modal_projector
    torch.testing.assert_close(projector.linear_1.weight, tensors["0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(projector.linear_1.bias, tensors["0.bias"], rtol=0, atol=0)
    torch.testing.assert_close(projector.linear_2.weight, tensors["2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(projector.linear_2.bias, tensors["2.bias"], rtol=0, atol=0)


def test_loads_our_safetensors_projector(tiny_models, sources, tmp_path):
    t = _projector_tensors(sources["llm"].config.hidden_size, sources["clip"].config.hidden_size)
    path = tmp_path / "mm_projector.safetensors"
    save_file({"linear_1.weight": t["0.weight"], "linear_1.bias": t["0.bias"],
               "linear_2.weight": t["2.weight"], "linear_2.bias": t["2.bias"]}, str(path))
    built = build_llava_model(model_args(tiny_models, pretrain_mm_mlp_adapter=str(path)))
    _assert_projector_equals(built.model, t)


def test_loads_original_llava_mm_projector_bin(tiny_models, sources, tmp_path):
    t = _projector_tensors(sources["llm"].config.hidden_size, sources["clip"].config.hidden_size, seed=2)
    path = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in t.items()}, path)
    built = build_llava_model(model_args(tiny_models, pretrain_mm_mlp_adapter=str(path)))
    _assert_projector_equals(built.model, t)


def test_projector_shape_mismatch_is_a_clear_error(tiny_models, sources, tmp_path):
    t = _projector_tensors(sources["llm"].config.hidden_size, sources["clip"].config.hidden_size + 8)
    path = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in t.items()}, path)
    with pytest.raises(ValueError, match=r"mm_projector\.bin.*shapes.*do not match"):
        build_llava_model(model_args(tiny_models, pretrain_mm_mlp_adapter=str(path)))


def test_unsupported_projector_type_fails_at_parsing(tiny_models, shapes_data, tmp_path):
    argv = ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--data_path", str(shapes_data["stage1_captions"]), "--output_dir", str(tmp_path),
            "--mm_projector_type", "linear"]
    with pytest.raises(ValueError, match="--mm_projector_type linear"):
        parse_args(argv)


def test_continues_from_a_saved_llava_checkpoint(built, tiny_models, tmp_path):
    built.model.save_pretrained(tmp_path)
    built.processor.save_pretrained(tmp_path)
    # the vision tower flag is irrelevant for a Llava directory: it is ignored, not required
    again = build_llava_model(ModelArguments(model_name_or_path=str(tmp_path)))
    assert again.added_tokens == 0
    assert again.num_image_tokens == built.num_image_tokens
    assert again.model.config.image_token_id == built.model.config.image_token_id
    expected = built.model.state_dict()
    got = again.model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert type(again.image_processor) is type(built.image_processor)
    assert again.tokenizer.padding_side == "right"
