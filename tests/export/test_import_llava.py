"""``llava import-llava``: an original-layout LLaVA checkpoint, built here from the tiny models, becomes a native one.

The reference is an independent re-implementation of the original LLaVA forward pass: vision tower
``hidden_states[select_layer]``, CLS dropped, ``mlp2x_gelu`` projector, features spliced into the text embeddings at
the ``<image>`` position, then the Llama LM on ``inputs_embeds``.

    .venv/bin/pytest tests/export/test_import_llava.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from llava.cli import main as cli_main
from llava.run_dir import RunKind, run_kind

SELECT_LAYER = -2


def write_original_checkpoint(tiny_models, out: Path, *, embed_tower: bool) -> dict:
    """The original LLaVA-1.5 layout: llava_llama config with mm_* keys, model.* / lm_head / model.mm_projector.*
    weights, the vision tower embedded under model.vision_tower.vision_tower.* or named by path only."""
    out.mkdir(parents=True)
    llm = LlamaForCausalLM.from_pretrained(tiny_models["llm"])
    tower = CLIPVisionModel.from_pretrained(tiny_models["vision_tower"])
    gen = torch.Generator().manual_seed(3)
    hidden, vision_hidden = llm.config.hidden_size, tower.config.hidden_size
    projector = {"0.weight": torch.randn(hidden, vision_hidden, generator=gen) * 0.1,
                 "0.bias": torch.randn(hidden, generator=gen) * 0.1,
                 "2.weight": torch.randn(hidden, hidden, generator=gen) * 0.1,
                 "2.bias": torch.randn(hidden, generator=gen) * 0.1}
    state = {k: v.clone().contiguous() for k, v in llm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v for k, v in projector.items()})
    if embed_tower:  # weights that differ from the tower directory's, so the importer must take these
        with torch.no_grad():
            for p in tower.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        # keys as transformers 4.x saved them: with the tower's vision_model. prefix (5.x dropped it)
        state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v.clone().contiguous()
                      for k, v in tower.state_dict().items()})
        keys = sorted(state)
        halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, part in halves.items():
            save_file({k: state[k] for k in part}, str(out / name), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, out / "pytorch_model.bin")
    config = llm.config.to_dict()
    config.update({"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
                   "mm_vision_tower": str(tiny_models["vision_tower"]), "mm_projector_type": "mlp2x_gelu",
                   "mm_vision_select_layer": SELECT_LAYER, "mm_vision_select_feature": "patch",
                   "mm_hidden_size": vision_hidden, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
                   "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False, "use_mm_proj": True})
    (out / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(tiny_models["llm"]).save_pretrained(out)
    return {"llm": llm, "tower": tower, "projector": projector}


def original_forward(source: dict, prefix_ids: list[int], suffix_ids: list[int], pixel_values) -> torch.Tensor:
    """LLaVA's prepare_inputs_labels_for_multimodal + LlamaForCausalLM, written out."""
    llm, tower, w = source["llm"].eval(), source["tower"].eval(), source["projector"]
    feats = tower(pixel_values, output_hidden_states=True).hidden_states[SELECT_LAYER][:, 1:]  # drop CLS
    feats = F.linear(F.gelu(F.linear(feats, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])[0]
    embed = llm.get_input_embeddings()
    inputs_embeds = torch.cat([embed(torch.tensor(prefix_ids)), feats, embed(torch.tensor(suffix_ids))])
    return llm(inputs_embeds=inputs_embeds[None]).logits


@pytest.mark.parametrize("embed_tower", [True, False], ids=["tower-weights-embedded", "tower-by-path"])
def test_imported_checkpoint_matches_original_forward(tiny_models, tmp_path, embed_tower):
    src = tmp_path / "llava-v1.5-tiny"
    source = write_original_checkpoint(tiny_models, src, embed_tower=embed_tower)
    out = tmp_path / "native"
    assert cli_main(["import-llava", "--src", str(src), "--out", str(out)]) == 0

    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id
    image = Image.new("RGB", (64, 64), (30, 160, 40))
    pixel_values = CLIPImageProcessor.from_pretrained(tiny_models["vision_tower"])(
        images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor.image_processor(images=[image], return_tensors="pt")["pixel_values"],
                               pixel_values, rtol=0, atol=0)
    prefix = tokenizer("USER: ", add_special_tokens=False)["input_ids"]
    suffix = tokenizer("\nWhat colour is the shape? ASSISTANT:", add_special_tokens=False)["input_ids"]
    n_features = (64 // 16) ** 2  # patches, CLS dropped
    input_ids = torch.tensor([prefix + [image_id] * n_features + suffix])
    with torch.no_grad():
        expected = original_forward(source, prefix, suffix, pixel_values)
        got = model(input_ids=input_ids, pixel_values=pixel_values).logits
    vocab = expected.shape[-1]
    assert got.shape[-1] >= vocab  # <image> may be a new row
    torch.testing.assert_close(got[..., :vocab], expected, rtol=0, atol=1e-5)

    args = json.loads((out / "llava_args.json").read_text())
    assert args["data_args"]["image_aspect_ratio"] == "pad" and args["model_args"]["version"] == "vicuna_v1"
    assert run_kind(out) is RunKind.IMPORTED
    for path in out.rglob("*.safetensors"):  # no zero-size tensor anywhere
        with safe_open(str(path), "pt") as f:
            assert all(f.get_tensor(k).numel() > 0 for k in f.keys()), path


def test_import_rejects_unsupported_projector(tiny_models, tmp_path, capsys):
    src = tmp_path / "src"
    write_original_checkpoint(tiny_models, src, embed_tower=False)
    config = json.loads((src / "config.json").read_text())
    config["mm_projector_type"] = "linear"
    (src / "config.json").write_text(json.dumps(config))
    assert cli_main(["import-llava", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "llava import-llava: error:" in err and "mlp2x_gelu" in err
    shutil.rmtree(src)
