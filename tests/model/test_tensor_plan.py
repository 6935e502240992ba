"""The tensor plan (``llava/model/tensor_plan.py``) against what the in-memory builder builds, for each model kind.

    .venv/bin/pytest tests/model/test_tensor_plan.py

Every tensor of the source checkpoints -- the LLM's safetensors file read as it is on disk, the tower loaded by
``transformers`` alone -- must sit, unchanged, where the plan maps it in the built model; what no source fills must be
exactly the plan's new parts. The streaming writers that use the plan are checked against the builder in
``tests/megatron/backend/test_megatron_init.py`` and ``tests/export/test_merge.py``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from llava.model.builder import build_llava_model
from llava.model.tensor_plan import NEW, plan_for
from llava.train.args import DataArguments, ModelArguments

KINDS = {  # model type: (--image_aspect_ratio, video flags)
    "llava": ("pad", {}), "llava_next": ("anyres", {}), "llava_onevision": ("anyres_max_2", {}),
    "llava_next_video": ("anyres", {"mm_newline_position": "no_token", "mm_spatial_pool_mode": "average"}),
}


@pytest.mark.parametrize("model_type", list(KINDS))
def test_every_source_tensor_lands_where_the_plan_says(tiny_models, anyres_data, model_type):
    aspect, video_flags = KINDS[model_type]
    model_args = ModelArguments(model_name_or_path=str(tiny_models["llm"]), vision_tower=str(tiny_models["vision_tower"]),
                                mm_patch_merge_type="spatial_unpad", **video_flags)
    video = {"video_folder": str(anyres_data["image_folder"])} if video_flags else {}
    data_args = DataArguments(data_path=str(anyres_data["train"]), image_folder=str(anyres_data["image_folder"]),
                              image_aspect_ratio=aspect, **video)
    built = build_llava_model(model_args, data_args=data_args)
    assert built.model.config.model_type == model_type
    state, plan = built.model.state_dict(), plan_for(model_type)
    llm_state = load_file(tiny_models["llm"] / "model.safetensors")
    tower_state = AutoModel.from_pretrained(tiny_models["vision_tower"]).state_dict()
    old_vocab = llm_state["model.embed_tokens.weight"].shape[0]

    covered = set()
    for source, tensors in (("llm", llm_state), ("tower", tower_state)):
        for key, tensor in tensors.items():
            name = plan.llava_key(source, key)
            ours = state[name]
            if ours.shape[0] == old_vocab + built.added_tokens and key.endswith(("embed_tokens.weight", "lm_head.weight")):
                ours = ours[:old_vocab]  # the added <image> row follows the original vocabulary
            torch.testing.assert_close(ours, tensor, rtol=0, atol=0, msg=f"{source} {key} -> {name}")
            covered.add(name)
    if built.model.config.tie_word_embeddings:
        covered.add("lm_head.weight")  # the same tensor as the embeddings
    new_names = [p.name for p in plan.parts if p.source == NEW]
    uncovered = set(state) - covered
    assert {k for k in uncovered if not any(k == n or k.startswith(n + ".") for n in new_names)} == set()
    assert all(any(k == n or k.startswith(n + ".") for k in uncovered) for n in new_names)
    assert ("model.image_newline" in new_names) == (model_type != "llava")


def test_a_key_outside_the_plan_is_named():
    plan = plan_for("llava")
    assert plan.llava_key("llm", "lm_head.weight") == "lm_head.weight"
    assert plan.llava_key("tower", "vision_model.post_layernorm.bias") == "model.vision_tower.vision_model.post_layernorm.bias"
    with pytest.raises(ValueError, match=r"unexpected llm weight 'transformer.h.0.weight' \(expected model\.\* or lm_head"):
        plan.llava_key("llm", "transformer.h.0.weight")
    with pytest.raises(ValueError, match="no tensor plan for model type 'mllama'"):
        plan_for("mllama")
