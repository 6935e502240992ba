"""Exact video token accounting: the project's per-video token count (``VideoLayout`` built from the flags) equals the
native model's feature count (``get_video_features`` of LlavaOnevision / LlavaNextVideo on tiny configs) and the
native processor's formula, for 120 combinations of frame count, frame grid (tower size / patch), tower (CLIP with its
CLS dropped, SigLIP) and pooling.

    .venv/bin/python -m pytest tests/model/test_video_tokens.py -q

The processors' formulas are written out from transformers' ``processing_llava_onevision.py`` (``replace_video_token``
/ ``_get_num_multimodal_tokens``) and ``processing_llava_next_video.py`` (``replace_video_token``): their classes need
torchvision, which cannot run here.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    SiglipVisionConfig,
)

from llava.data.video_flags import video_layout_from_flags
from llava.errors import UsageValueError
from llava.model.model_args import ModelArguments

PATCH = 4
FRAMES = (1, 2, 3, 4, 5)


def tower_config(kind: str, side: int):
    cls = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    return cls(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
               image_size=side * PATCH, patch_size=PATCH)


def native_model(kind: str, side: int, newline: str, mode: str):
    common = dict(vision_config=tower_config(kind, side).to_dict(),
                  text_config=LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2).to_dict(),
                  vision_feature_select_strategy="default" if kind == "clip" else "full", vision_feature_layer=-1,
                  image_token_index=60, video_token_index=61)
    torch.manual_seed(0)
    if newline == "one_token":
        return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**common)).eval()
    return LlavaNextVideoForConditionalGeneration(
        LlavaNextVideoConfig(**common, spatial_pool_mode=mode, spatial_pool_stride=2)).eval()


def project_layout(kind: str, side: int, newline: str, mode: str):
    model_args = ModelArguments(model_name_or_path="llm", mm_newline_position=newline, mm_spatial_pool_mode=mode,
                                mm_spatial_pool_stride=2)
    data_args = SimpleNamespace(video_folder="videos", image_aspect_ratio="anyres_max_9" if newline == "one_token"
                                else "anyres", frames_upbound=8, video_fps=1, force_sample=False,
                                add_time_instruction=False, eval_data_path=None)
    return video_layout_from_flags(model_args, data_args, tower_config(kind, side))


def onevision_processor_formula(num_frames: int, num_image_tokens: int) -> int:
    """processing_llava_onevision.py, replace_video_token: num_image_tokens is the processor's setting (the tower's
    features per view, CLS included)."""
    patches_height_width = int(math.sqrt(num_image_tokens))
    pooled_height_width = math.ceil(patches_height_width / 2)
    return (num_frames * pooled_height_width * pooled_height_width) + 1  # +1 for newline token


def next_video_processor_formula(num_frames: int, height: int, width: int, patch_size: int) -> int:
    """processing_llava_next_video.py, replace_video_token (frames resized to the tower's input)."""
    num_image_tokens = (height // patch_size) * (width // patch_size)
    return num_image_tokens // 4 * num_frames  # divide by 4 needed for avg pooling layer


CASES = ([("one_token", "bilinear", kind, side) for kind in ("clip", "siglip") for side in (3, 4, 5, 6, 7, 8)]
         + [("no_token", mode, kind, side) for mode in ("average", "max") for kind in ("clip", "siglip")
            for side in (4, 6, 8)])


@pytest.mark.parametrize(("newline", "mode", "kind", "side"), CASES)
def test_video_tokens_equal_native_features_and_processor(newline, mode, kind, side):
    model = native_model(kind, side, newline, mode)
    layout = project_layout(kind, side, newline, mode)
    assert layout.model_type == model.config.model_type
    size = side * PATCH
    strategy = model.config.vision_feature_select_strategy
    for frames in FRAMES:
        pixels = torch.randn(2, frames, 3, size, size)  # two videos of one frame count, as a batch
        with torch.no_grad():
            out = model.model.get_video_features(pixel_values_videos=pixels, vision_feature_layer=-1,
                                                 vision_feature_select_strategy=strategy)
        features = out.pooler_output
        per_video = features.shape[1] if features.dim() == 3 else features.shape[0] // 2
        if newline == "one_token":
            processor = onevision_processor_formula(frames, side * side + int(kind == "clip"))
        else:
            processor = next_video_processor_formula(frames, size, size, PATCH)
        assert layout.video_tokens(frames) == per_video == processor, (frames, per_video, processor)


def test_next_video_refuses_an_odd_grid_where_its_processor_miscounts():
    # LlavaNextVideo pools a 5x5 grid to 2x2 = 4 per frame; its processor counts 25 // 4 = 6
    model = native_model("clip", 5, "no_token", "average")
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=torch.randn(1, 1, 3, 20, 20), vision_feature_layer=-1,
                                             vision_feature_select_strategy="default")
    assert out.pooler_output.shape[1] == 4 != next_video_processor_formula(1, 20, 20, PATCH)
    with pytest.raises(UsageValueError, match="no_token .* 5x5 feature grid"):
        project_layout("clip", 5, "no_token", "average")
