"""``llava import-llava`` for LLaVA-NeXT 1.6 (``anyres``) and LLaVA-OneVision (``llava_qwen``, ``anyres_max_N``).

Two synthetic checkpoints in the original layout (config.json + safetensors with the original key names, random
weights): a 1.6-style ``llava_llama`` with the tiny CLIP tower embedded, an asymmetric set of ``[width, height]``
pinpoints and ``model.image_newline``; a OneVision-style ``LlavaQwenForCausalLM`` (tiny Qwen2, tied embeddings, no
``lm_head``) with the tiny SigLIP tower trimmed as LLaVA-NeXT's ``SigLipVisionTower`` trims it (last layer and head
deleted) and an asymmetric ``(width x height)`` grid range under ``anyres_max_2``.

The reference is written here from LLaVA-NeXT's code, on the original state dict: ``process_anyres_image`` (best
grid by the original's ``[width, height]`` rule, aspect-preserving resize + black padding, crops, squashed base
view), the tower (``hidden_states[select_layer]`` minus CLS, or SigLIP's ``hidden_states[-1]`` of the trimmed tower),
the ``mlp2x_gelu`` projector, the grid unpadded (``unpad_image`` with the original's ``int``), shrunk bilinearly above
1.1x N crops (``anyres_max``), one ``image_newline`` per row, base view first, spliced into the LLM's embeddings.
Its logits must equal the imported native model's on the native processor's inputs (fp32, 1e-5), for wide, tall,
very wide (12x300, 20x1000) and very tall images.

    .venv/bin/pytest tests/export/test_import_llava_next.py
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionModel,
)

from llava.cli import main as cli_main
from llava.model.anyres_model import anyres_layout, image_layout_args_from_run
from llava.run_dir import RunKind, run_kind

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
NEXT_PINPOINTS = [[128, 64], [64, 128], [128, 128], [192, 64]]  # [width, height]; no [64, 192]: asymmetric
OV_PINPOINTS = "(1x1),...,(2x3)"  # (width x height) tower units: up to 2 wide, 3 high
SIZES = {"square": (64, 64), "wide": (40, 100), "tall": (96, 50), "very_wide": (12, 300), "very_tall": (300, 12),
         "huge_wide": (20, 1000), "big": (200, 150), "photo": (3000, 4000)}  # (height, width)


def _random(shape, gen, scale=0.1):
    return torch.randn(shape, generator=gen) * scale


def write_original(out: Path, llm, tower, *, config: dict, tokenizer_dir: Path, seed: int) -> dict:
    """Original LLaVA-NeXT layout: model.* / lm_head (if untied) / model.mm_projector.* / model.image_newline /
    model.vision_tower.vision_tower.* in two safetensors shards + config.json + tokenizer."""
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    hidden, vision_hidden = llm.config.hidden_size, tower.config.hidden_size
    extra = {"model.mm_projector.0.weight": _random((hidden, vision_hidden), gen),
             "model.mm_projector.0.bias": _random((hidden,), gen),
             "model.mm_projector.2.weight": _random((hidden, hidden), gen),
             "model.mm_projector.2.bias": _random((hidden,), gen),
             "model.image_newline": _random((hidden,), gen, 1 / math.sqrt(hidden))}
    with torch.no_grad():  # a tower that differs from the tower directory's, so the importer must take these
        for p in tower.parameters():
            p.add_(_random(p.shape, gen, 0.02))
    state = {k: v.clone().contiguous() for k, v in llm.state_dict().items()}
    if llm.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    state.update(extra)
    # the tower's keys as transformers 4.x saved them (with the vision_model. prefix that 5.x dropped)
    state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v.clone().contiguous()
                  for k, v in tower.state_dict().items()})
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(out / name), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}))
    (out / "config.json").write_text(json.dumps({**llm.config.to_dict(), **config}))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return {"llm": llm.eval(), "tower": tower.eval(), "state": state, "config": {**llm.config.to_dict(), **config},
            "src": out}


@pytest.fixture(scope="module")
def next_source(tiny_models, tmp_path_factory) -> dict:
    llm = LlamaForCausalLM.from_pretrained(tiny_models["llm"])
    tower = CLIPVisionModel.from_pretrained(tiny_models["vision_tower"])
    config = {"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": str(tiny_models["vision_tower"]), "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 64,
              "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres",
              "image_grid_pinpoints": NEXT_PINPOINTS, "image_crop_resolution": 224, "image_split_resolution": 224,
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "unfreeze_mm_vision_tower": True,
              "mm_vision_tower_lr": 2e-6, "tokenizer_model_max_length": 4096, "use_mm_proj": True}
    source = write_original(tmp_path_factory.mktemp("next") / "llava-v1.6-tiny", llm, tower, config=config,
                            tokenizer_dir=tiny_models["llm"], seed=5)
    return {**source, "mean": CLIP_MEAN, "std": CLIP_STD, "select_layer": -2, "drop_cls": True, "max_n": None}


@pytest.fixture(scope="module")
def onevision_source(tiny_models, tmp_path_factory) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llm"])
    torch.manual_seed(7)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    tower = SiglipVisionModel.from_pretrained(tiny_models["siglip_tower"])
    del tower.encoder.layers[-1:]  # what LLaVA-NeXT's SigLipVisionTower does before training
    tower.head = torch.nn.Identity()
    config = {"model_type": "llava", "architectures": ["LlavaQwenForCausalLM"],
              "mm_vision_tower": str(tiny_models["siglip_tower"]), "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 64,
              "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_2",
              "image_grid_pinpoints": OV_PINPOINTS, "mm_newline_position": "one_token",
              "mm_spatial_pool_mode": "bilinear", "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
              "mm_resampler_type": None, "image_crop_resolution": None, "use_mm_proj": True,
              "tokenizer_padding_side": "right"}
    source = write_original(tmp_path_factory.mktemp("ov") / "llava-onevision-tiny", llm, tower, config=config,
                            tokenizer_dir=tiny_models["llm"], seed=6)
    return {**source, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "select_layer": -1, "drop_cls": False,
            "max_n": 2}


@pytest.fixture(scope="module")
def imported(next_source, onevision_source, tmp_path_factory) -> dict:
    """Both sources imported once through the ``llava import-llava`` command."""
    outs = {}
    for name, source in (("next", next_source), ("onevision", onevision_source)):
        out = tmp_path_factory.mktemp("imported") / name
        assert cli_main(["import-llava", "--src", str(source["src"]), "--out", str(out)]) == 0
        outs[name] = out
    return outs


# ---- the reference: LLaVA-NeXT's anyres path, written out on the original state dict ----------------------------

def original_pinpoints(value, tower_size: int) -> list[tuple[int, int]]:
    """mm_utils: a "(AxB),...,(CxD)" range -> (width, height) pixels for i in A..C, j in B..D; a list as written."""
    if isinstance(value, str):
        grids = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", value)]
        (a, b), (c, d) = grids[0], grids[-1]
        return [(i * tower_size, j * tower_size) for i in range(a, c + 1) for j in range(b, d + 1)]
    return [tuple(p) for p in value]


def best_resolution(width: int, height: int, pinpoints) -> tuple[int, int]:
    best, best_effective, best_waste = None, 0, float("inf")
    for pw, ph in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (pw, ph), effective, waste
    return best


def original_views(image: Image.Image, source: dict, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """process_anyres_image: [squashed base view] + crops of the image resized into the best grid and padded black."""
    pw, ph = best_resolution(*image.size, original_pinpoints(source["config"]["image_grid_pinpoints"], size))
    w, h = image.size
    if pw / w < ph / h:
        nw, nh = pw, min(math.ceil(h * pw / w), ph)
    else:
        nw, nh = min(math.ceil(w * ph / h), pw), ph
    canvas = Image.new("RGB", (pw, ph), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((pw - nw) // 2, (ph - nh) // 2))
    crops = [canvas.crop((x, y, x + size, y + size)) for y in range(0, ph, size) for x in range(0, pw, size)]
    views = [image.resize((size, size), Image.BICUBIC)] + crops
    mean, std = np.array(source["mean"]), np.array(source["std"])
    arrays = [((np.asarray(v, dtype=np.float64) / 255.0 - mean) / std).transpose(2, 0, 1) for v in views]
    return torch.tensor(np.stack(arrays), dtype=torch.float32), (pw // size, ph // size)


def original_image_features(source: dict, image: Image.Image) -> torch.Tensor:
    tower, state = source["tower"], source["state"]
    size, patch = tower.config.image_size, tower.config.patch_size
    pixels, (grid_w, grid_h) = original_views(image, source, size)
    with torch.no_grad():
        feats = tower(pixels, output_hidden_states=True).hidden_states[source["select_layer"]]
        feats = feats[:, 1:] if source["drop_cls"] else feats
        feats = F.linear(F.gelu(F.linear(feats, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])),
                         state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
    side = size // patch
    base, grid = feats[0], feats[1:]
    grid = grid.view(grid_h, grid_w, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    width, height = image.size  # unpad_image, with the original's int()
    cur_h, cur_w = grid.shape[1:]
    if width / height > cur_w / cur_h:
        pad = (cur_h - int(height * (cur_w / width))) // 2
        grid = grid[:, pad: cur_h - pad, :]
    else:
        pad = (cur_w - int(width * (cur_h / height))) // 2
        grid = grid[:, :, pad: cur_w - pad]
    if source["max_n"]:
        c, h, w = grid.shape
        times = math.sqrt(h * w / (source["max_n"] * side ** 2))
        if times > 1.1:
            grid = F.interpolate(grid[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    newline = state["model.image_newline"][:, None, None].expand(*grid.shape[:-1], 1)
    grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat((base, grid)), pixels


def original_logits(source: dict, prefix: list[int], suffix: list[int], features: torch.Tensor) -> torch.Tensor:
    llm = source["llm"]
    embed = llm.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([embed(torch.tensor(prefix)), features, embed(torch.tensor(suffix))])
        return llm(inputs_embeds=embeds[None]).logits


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---- the tests ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native(imported) -> dict:
    """The imported checkpoints loaded with plain transformers (AutoProcessor where torchvision is not needed)."""
    next_model = LlavaNextForConditionalGeneration.from_pretrained(imported["next"]).eval()
    ov_model = LlavaOnevisionForConditionalGeneration.from_pretrained(imported["onevision"]).eval()
    try:
        ov_processor = AutoProcessor.from_pretrained(imported["onevision"])
    except (ImportError, AttributeError, OSError):  # its video half needs torchvision (and its files)
        ov_processor = None
    return {"next": (next_model, AutoProcessor.from_pretrained(imported["next"])), "onevision": (ov_model, ov_processor)}


def check_logits(source: dict, model, input_ids: list[int], pixel_values, image_sizes, image) -> None:
    image_id = model.config.image_token_id
    positions = [i for i, t in enumerate(input_ids) if t == image_id]
    features, pixels = original_image_features(source, image)
    assert len(positions) == features.shape[0] == positions[-1] - positions[0] + 1  # one run of image tokens
    # the native processor's views are the original preprocessing's (crop/resize/pad), base view first
    torch.testing.assert_close(pixel_values[0, : pixels.shape[0]], pixels, rtol=0, atol=1e-5)
    assert not pixel_values[0, pixels.shape[0]:].any()  # batch padding views only
    expected = original_logits(source, input_ids[: positions[0]], input_ids[positions[-1] + 1:], features)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([input_ids]), pixel_values=pixel_values, image_sizes=image_sizes).logits
    vocab = expected.shape[-1]
    assert got.shape[-1] >= vocab  # <image> may be a new row
    torch.testing.assert_close(got[..., :vocab], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", list(SIZES))
def test_imported_llava_next_matches_original_forward(next_source, native, size):
    model, processor = native["next"]
    assert model.config.image_grid_pinpoints == [[h, w] for w, h in NEXT_PINPOINTS]
    image = noise_image(*SIZES[size], seed=len(size))
    inputs = processor(images=image, text="USER: <image>\nWhat is in the picture? ASSISTANT:", return_tensors="pt")
    assert inputs["image_sizes"].tolist() == [list(SIZES[size])]
    check_logits(next_source, model, inputs["input_ids"][0].tolist(), inputs["pixel_values"], inputs["image_sizes"],
                 image)


@pytest.mark.parametrize("size", list(SIZES))
def test_imported_onevision_matches_original_forward(onevision_source, imported, native, size):
    model, processor = native["onevision"]
    assert model.config.vision_config.num_hidden_layers == 1 and not model.config.vision_config.vision_use_head
    assert model.config.vision_aspect_ratio == "anyres_max_2" and model.config.vision_feature_select_strategy == "full"
    image = noise_image(*SIZES[size], seed=len(size))
    features, _ = original_image_features(onevision_source, image)
    if processor is not None:
        inputs = processor(images=image, text="<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n", return_tensors="pt")
        input_ids = inputs["input_ids"][0].tolist()
    else:  # without torchvision: the saved image processor, and the ids around the reference's feature count
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        image_processor = LlavaOnevisionImageProcessorPil(**{k: v for k, v in json.loads(
            (imported["onevision"] / "processor_config.json").read_text())["image_processor"].items()
            if k != "image_processor_type"})
        inputs = image_processor(images=[image], return_tensors="pt")
        tokenizer = AutoTokenizer.from_pretrained(imported["onevision"])
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        input_ids = (tokenizer("<|im_start|>user\n")["input_ids"] + [image_id] * features.shape[0]
                     + tokenizer("\nWhat is it?<|im_end|>\n")["input_ids"])
    check_logits(onevision_source, model, input_ids, inputs["pixel_values"], inputs["image_sizes"], image)


def test_imported_runs_are_described_and_predict_answers(imported, tmp_path):
    next_args = json.loads((imported["next"] / "llava_args.json").read_text())
    assert next_args["data_args"]["image_aspect_ratio"] == "anyres"
    assert json.loads(next_args["data_args"]["image_grid_pinpoints"]) == NEXT_PINPOINTS  # the flag's [width, height]
    assert next_args["model_args"]["version"] == "vicuna_v1"
    ov_args = json.loads((imported["onevision"] / "llava_args.json").read_text())
    assert ov_args["data_args"]["image_aspect_ratio"] == "anyres_max_2" and ov_args["model_args"]["version"] == "chatml"
    # (1x1)..(2x3) read as (width x height): 2 wide and 3 high, written back as the flag's [width, height]
    assert json.loads(ov_args["data_args"]["image_grid_pinpoints"]) == [
        [w * 64, h * 64] for w in (1, 2) for h in (1, 2, 3)]
    for name, run in (("next", next_args), ("onevision", ov_args)):  # what `llava merge` rebuilds = the saved config
        config = AutoConfig.from_pretrained(imported[name])
        rebuilt = anyres_layout(image_layout_args_from_run(run), config.vision_config,
                                config.vision_feature_select_strategy)
        assert [list(p) for p in rebuilt.grid_pinpoints] == config.image_grid_pinpoints
    image_path = tmp_path / "wide.png"
    noise_image(30, 170, seed=1).save(image_path)
    for name in ("next", "onevision"):  # the native forward inside generate raises if a token count were off
        assert run_kind(imported[name]) is RunKind.IMPORTED
        assert cli_main(["predict", "--model", str(imported[name]), "--image", str(image_path), "--prompt",
                         "What is in the picture?", "--max_new_tokens", "3"]) == 0


REFUSED = {  # config.json change -> what the one-line error names (the key and its value)
    "merge_spatial": ({"mm_patch_merge_type": "spatial"}, "mm_patch_merge_type 'spatial'"),
    "merge_flat": ({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type 'flat'"),
    "merge_nobase": ({"mm_patch_merge_type": "spatial_unpad_nobase"}, "mm_patch_merge_type 'spatial_unpad_nobase'"),
    "projector": ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type 'mlp3x_gelu'"),
    "aspect_ratio": ({"image_aspect_ratio": "highres"}, "image_aspect_ratio 'highres'"),
    "select_feature": ({"mm_vision_select_feature": "slicefour_patch"}, "mm_vision_select_feature 'slicefour_patch'"),
    "cls_patch_grid": ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature 'cls_patch'"),
    "resampler": ({"mm_resampler_type": "spatial_pool"}, "mm_resampler_type 'spatial_pool'"),
    "no_pinpoints": ({"image_grid_pinpoints": None}, "image_grid_pinpoints None"),
    "pinpoints_off_grid": ({"image_grid_pinpoints": [[100, 64]]}, "image_grid_pinpoints [[100, 64]]"),
    "llm_family": ({"model_type": "llava_mpt", "architectures": ["LlavaMptForCausalLM"]}, "model_type 'llava_mpt'"),
    "no_newline_weight": (None, "model.image_newline"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_source_settings_fail_with_one_line(next_source, tmp_path, capsys, case):
    change, expected = REFUSED[case]
    src = tmp_path / "src"
    shutil.copytree(next_source["src"], src)
    if change is None:  # spatial_unpad trained an image_newline: a checkpoint without one is not what it says
        for shard in src.glob("*.safetensors"):
            save_file({k: v for k, v in load_file(str(shard)).items() if k != "model.image_newline"}, str(shard))
    else:
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out"
    assert cli_main(["import-llava", "--src", str(src), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llava import-llava: error:")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not out.exists()  # nothing written


def test_onevision_tower_taken_from_its_directory_when_not_embedded(onevision_source, tiny_models, tmp_path):
    """A OneVision run that froze the tower saves none of it: the tower directory's weights are used, trimmed as
    LLaVA-NeXT's SigLipVisionTower trims them (last layer and pooling head left out)."""
    src = tmp_path / "src"
    shutil.copytree(onevision_source["src"], src)
    for shard in src.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(str(shard)).items() if not k.startswith("model.vision_tower.")},
                  str(shard))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.vision_tower.")}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert cli_main(["import-llava", "--src", str(src), "--out", str(out), "--version", "chatml"]) == 0
    tower = SiglipVisionModel.from_pretrained(tiny_models["siglip_tower"]).eval()
    del tower.encoder.layers[-1:]
    tower.head = torch.nn.Identity()
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
    image = noise_image(*SIZES["very_wide"], seed=3)
    features, pixels = original_image_features({**onevision_source, "tower": tower}, image)
    with torch.no_grad():
        got = model.model.get_image_features(pixels[None], torch.tensor([list(SIZES["very_wide"])])).pooler_output
    torch.testing.assert_close(torch.cat(list(got)), features, rtol=0, atol=1e-5)
