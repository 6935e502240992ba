"""anyres flags and token accounting against the native processors: `pytest tests/data/test_anyres.py`.

The oracle for every count is transformers' own code: ``LlavaNextProcessor`` (its ``__call__`` on real images for a
subset including the extreme sizes, its ``_get_num_multimodal_tokens`` for >= 200 random sizes) and
``LlavaOnevisionProcessor``'s counting method (the processor itself cannot be built without torchvision, so its
method runs on a stand-in holding the same attributes). Configs are real towers' (CLIP-L/14-336, SigLIP-so400m
384/14); only their configs are needed.
"""

from __future__ import annotations

import ast
import random
import re
from types import SimpleNamespace

import pytest
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaNextProcessor,
    LlavaOnevisionProcessor,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava.data.anyres import AnyresLayout, parse_grid_pinpoints, parse_image_aspect_ratio, select_best_resolution
from llava.train.args import parse_args

CLIP_336 = CLIPVisionConfig(image_size=336, patch_size=14)  # openai/clip-vit-large-patch14-336: 24x24 patches + CLS
SIGLIP_384 = SiglipVisionConfig(image_size=384, patch_size=14)  # siglip-so400m-patch14-384: 27x27, no CLS
EXTREMES = [(20, 1000), (1000, 20), (3000, 4000), (4000, 3000), (1, 1), (336, 336), (337, 673), (2, 5000)]


def random_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    """(height, width) pairs: log-uniform sides from 8 to 5000 px, so extreme aspect ratios are common."""
    rng = random.Random(seed)
    return EXTREMES + [(int(8 * 625 ** rng.random()), int(8 * 625 ** rng.random())) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    return tok


def next_processor(tokenizer, pinpoints, size=336) -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                 image_grid_pinpoints=pinpoints)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


PINPOINT_SETS = {
    "llava-1.6 default": None,
    "(1x1),...,(3x3)": "(1x1),...,(3x3)",
    "explicit pixels": "[[336, 672], [672, 336], [336, 1344], [1344, 336], [1008, 1008]]",
}


@pytest.mark.parametrize("name", list(PINPOINT_SETS))
def test_llava_next_counts_equal_native_processor_for_200_sizes(tokenizer, name):
    pinpoints = parse_grid_pinpoints(PINPOINT_SETS[name], 336)
    layout = AnyresLayout.from_vision_config(CLIP_336, "default", pinpoints)
    processor = next_processor(tokenizer, pinpoints)
    sizes = random_sizes(220, seed=len(name))
    native = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    ours = [layout.image_tokens(h, w) for h, w in sizes]
    mismatches = [(s, a, b) for s, a, b in zip(sizes, ours, native) if a != b]
    assert not mismatches, mismatches[:5]
    assert len(set(ours)) > 20  # the sizes really exercise different grids and unpaddings


def test_llava_next_processor_call_on_real_images_gives_our_counts_and_sizes(tokenizer):
    """The full native pipeline (resize, crops, padding) on images incl. 20x1000 and 4000x3000."""
    pinpoints = parse_grid_pinpoints("(1x1),...,(3x3)", 336)
    layout = AnyresLayout.from_vision_config(CLIP_336, "default", pinpoints)
    processor = next_processor(tokenizer, pinpoints)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for h, w in EXTREMES[:6] + random_sizes(6, seed=7)[-6:]:
        out = processor(images=[Image.new("RGB", (w, h), (90, 20, 200))], text="<image>\nWhat is it?",
                        return_tensors="pt")
        assert (out["input_ids"] == image_id).sum().item() == layout.image_tokens(h, w), (h, w)
        assert out["image_sizes"].tolist() == [[h, w]]
        assert out["pixel_values"].shape[1] == layout.num_views(h, w)


def onevision_native_count(processor_attrs: dict, h: int, w: int, tower: int, strategy: str) -> int:
    """``LlavaOnevisionProcessor``'s own counting code, run on a stand-in with the processor's attributes."""
    standin = SimpleNamespace(**processor_attrs)
    standin._get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features.__get__(standin)
    n = LlavaOnevisionProcessor._get_number_of_features(standin, h, w, tower, tower)
    return n - 1 if strategy == "default" else n


@pytest.mark.parametrize("max_n", [1, 4, 9, 16])
@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_onevision_counts_equal_native_processor(max_n, tower):
    config, strategy, extra = (SIGLIP_384, "full", 0) if tower == "siglip" else (CLIP_336, "default", 1)
    side = config.image_size // config.patch_size
    pinpoints = parse_grid_pinpoints(None, config.image_size, max_num_patches=max_n)  # (1x1)..(6x6)
    assert len(pinpoints) == 36
    layout = AnyresLayout.from_vision_config(config, strategy, pinpoints, max_num_patches=max_n)
    attrs = {"image_processor": SimpleNamespace(image_grid_pinpoints=pinpoints), "num_image_tokens": side * side + extra,
             "vision_aspect_ratio": f"anyres_max_{max_n}"}
    sizes = random_sizes(200, seed=max_n)
    ours = [layout.image_tokens(h, w) for h, w in sizes]
    native = [onevision_native_count(attrs, h, w, config.image_size, strategy) for h, w in sizes]
    assert ours == native
    # several images in one sample: the base view + one newline each, as the processor's replace_image_token
    assert layout.record_image_tokens([(20, 1000), (4000, 3000)]) == [side * side + 1] * 2


def test_best_resolution_prefers_most_kept_pixels_then_least_waste():
    pins = [[336, 672], [672, 336], [672, 672]]
    assert select_best_resolution(300, 600, pins) == (336, 672)  # wide image, wide grid: nothing wasted
    assert select_best_resolution(1000, 1000, pins) == (672, 672)
    assert select_best_resolution(100, 100, pins) in ((336, 672), (672, 336))  # both keep all pixels, 672^2 wastes more


# --- flags


def test_pinpoint_forms():  # LLaVA-NeXT writes (width x height) and [width, height]; native configs [height, width]
    assert parse_grid_pinpoints("(1x1),...,(2x3)", 10) == [[10, 10], [20, 10], [30, 10], [10, 20], [20, 20], [30, 20]]
    assert parse_grid_pinpoints("[[336, 672], [672, 336]]", 336) == [[672, 336], [336, 672]]
    assert parse_grid_pinpoints([[336, 1008]], 336) == [[1008, 336]]
    assert parse_grid_pinpoints(None, 64)[0] == [128, 64]  # LLaVA-1.6's [[336, 672], ...]: first a tall grid
    assert parse_image_aspect_ratio("anyres_max_9") == ("anyres", 9)
    assert parse_image_aspect_ratio("anyres") == ("anyres", None)


@pytest.mark.parametrize("value, message", [
    ("[[336, 600]]", "not a multiple of the vision tower's input size 336"),
    ("[[0, 336]]", "not a multiple"),
    ("(3x3),...,(1x1)", "smaller to a larger"),
    ("not pinpoints", "neither a grid range"),
    ("[336, 672]", "list of [width, height] pairs"),
])
def test_bad_pinpoints_name_flag_and_value(value, message):
    with pytest.raises(ValueError, match="--image_grid_pinpoints") as err:
        parse_grid_pinpoints(value, 336)
    assert message in str(err.value) and repr(value) in str(err.value)


def _argv(tiny_models, shapes_data, *extra):
    return ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
            "--data_path", str(shapes_data["stage2_qa"]), "--output_dir", "unused", "--report_to", "none", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--image_aspect_ratio", "anyres_max_0"], "--image_aspect_ratio 'anyres_max_0'"),
    (["--image_aspect_ratio", "crop_split"], "--image_aspect_ratio 'crop_split'"),
    (["--image_aspect_ratio", "anyres"], "needs --mm_patch_merge_type spatial_unpad, got 'flat'"),
    (["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "spatial"], "got 'spatial'"),
    (["--mm_patch_merge_type", "spatial_unpad"], "--mm_patch_merge_type 'spatial_unpad' merges the crops"),
    (["--mm_patch_merge_type", "unpad_bogus"], "--mm_patch_merge_type 'unpad_bogus'"),
    (["--mm_newline_position", "one_frame"], "--mm_newline_position 'one_frame'"),  # one_token: video (#22)
    (["--image_grid_pinpoints", "(1x1),...,(2x2)"], "needs --image_aspect_ratio anyres"),
    (["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "spatial_unpad", "--image_grid_pinpoints",
      "[[64, 100]]"], "[64, 100] is not a multiple of the vision tower's input size 64"),
    (["--image_aspect_ratio", "anyres_max_4", "--mm_patch_merge_type", "spatial_unpad",
      "--mm_vision_select_feature", "cls_patch"], "--mm_vision_select_feature 'cls_patch'"),
])
def test_invalid_anyres_flags_fail_at_startup(tiny_models, shapes_data, extra, message):
    with pytest.raises(ValueError) as err:
        parse_args(_argv(tiny_models, shapes_data, *extra))
    assert message in str(err.value)


def test_valid_anyres_flags_parse(tiny_models, shapes_data):
    _, data_args, _ = parse_args(_argv(tiny_models, shapes_data, "--image_aspect_ratio", "anyres_max_9",
                                       "--mm_patch_merge_type", "spatial_unpad", "--image_grid_pinpoints",
                                       "(1x1),...,(3x3)", "--mm_newline_position", "grid"))
    assert data_args.image_grid_pinpoints == "(1x1),...,(3x3)"


def test_per_image_counts_expand_in_order_and_truncation_never_cuts_an_image(tokenizer):
    from llava.constants import IGNORE_INDEX
    from llava.data.records import Message
    from llava.data.templates import get_template
    from llava.data.tokenize import SampleRejected, tokenize_conversation

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    messages = [Message("user", "<image>\nand\n<image>\nSame?"), Message("assistant", "no, they differ " * 10)]
    kwargs = dict(image_token_id=image_id, num_image_tokens=[30, 57])
    full = tokenize_conversation(messages, get_template("vicuna_v1"), tokenizer, model_max_length=10**6, **kwargs)
    runs, start = [], None
    for i, t in enumerate([*full.input_ids, None]):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            runs.append(i - start)
            start = None
    assert runs == [30, 57]
    last_image = max(i for i, t in enumerate(full.input_ids) if t == image_id)
    first_answer = next(i for i, x in enumerate(full.labels) if x != IGNORE_INDEX)
    assert first_answer > last_image
    cut = tokenize_conversation(messages, get_template("vicuna_v1"), tokenizer, model_max_length=first_answer + 2,
                                **kwargs)  # the text after the second image is cut, never the image
    assert cut.truncated and cut.input_ids.count(image_id) == 87 and any(x != IGNORE_INDEX for x in cut.labels)
    with pytest.raises(SampleRejected, match="image tokens end at position"):
        tokenize_conversation(messages, get_template("vicuna_v1"), tokenizer, model_max_length=last_image, **kwargs)


@pytest.mark.parametrize("pinpoints", ["(1x1),...,(2x3)", "[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]",
                                       "(1x2),...,(3x3)", None])
def test_grid_choice_equals_llava_next_on_its_own_flag(pinpoints):
    """LLaVA-NeXT's mm_utils (written out here, on PIL's (width, height)) picks the same grid as the layout built from
    the same flag value, for asymmetric sets and for ties (a small square fits 1x2 and 2x1 equally: the first wins)."""
    tower = 336
    flag = pinpoints or "[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]"  # LLaVA-1.6's own list
    if flag.startswith("["):
        width_height = [tuple(p) for p in ast.literal_eval(flag)]
    else:  # mm_utils: range_start/range_end from the first and last "(AxB)", i over A (width), j over B (height)
        grids = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", flag)]
        (a, b), (c, d) = grids[0], grids[-1]
        width_height = [(i * tower, j * tower) for i in range(a, c + 1) for j in range(b, d + 1)]
    layout_pinpoints = [list(p) for p in parse_grid_pinpoints(pinpoints, tower)]
    rng = random.Random(3)
    sizes = [(100, 100), (50, 50), (300, 600), (600, 300), (20, 1000), (1000, 20)] + [
        (rng.randint(10, 2000), rng.randint(10, 2000)) for _ in range(200)]
    for height, width in sizes:
        best, best_effective, best_waste = None, 0, float("inf")
        for pw, ph in width_height:  # mm_utils.select_best_resolution
            scale = min(pw / width, ph / height)
            effective = min(int(width * scale) * int(height * scale), width * height)
            if effective > best_effective or (effective == best_effective and pw * ph - effective < best_waste):
                best, best_effective, best_waste = (pw, ph), effective, pw * ph - effective
        assert select_best_resolution(height, width, layout_pinpoints) == (best[1], best[0]), (height, width)
