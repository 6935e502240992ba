"""The native high-resolution classes: ``LlavaNextForConditionalGeneration`` (anyres) and
``LlavaOnevisionForConditionalGeneration`` (anyres_max_N), composed from a vision tower + an LLM by the builder.

    layout = anyres_layout(data_args, vision_config, strategy)      # None for pad / square (LLaVA-1.5)
    newline = new_image_newline(hidden_size, dtype)                  # randn(hidden) / sqrt(hidden), as LLaVA-NeXT
    processor = load_processor(checkpoint_dir)                       # AutoProcessor, or OneVision's files without it

The config and processor are assembled by ``make_llava_config(..., layout=layout)`` and
``make_llava_processor(..., layout)`` in ``llava/model/builder.py`` (one assembly for the three classes), which
call ``make_anyres_config`` / ``make_anyres_processor`` here for what LlavaNext / LlavaOnevision add.

``image_newline`` is created as LLaVA-NeXT's ``initialize_vision_modules`` creates it for a ``spatial_unpad`` merge
(``torch.randn(hidden_size) * 1 / sqrt(hidden_size)``, drawn right after the projector), trains with the projector,
and is saved beside it by stage 1 (``mm_projector.safetensors`` key ``image_newline``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

from llava.constants import DEFAULT_IMAGE_TOKEN, HAS_CLS_TOKEN
from llava.data.anyres import (
    AnyresLayout,
    build_anyres_image_processor,
    parse_grid_pinpoints,
    parse_image_aspect_ratio,
)
from llava.model.processor_files import ProcessorFiles

MODEL_CLASSES = {"llava_next": LlavaNextForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration}
ANYRES_MODEL_TYPES = tuple(MODEL_CLASSES)


def anyres_layout(data_args, vision_config, strategy: str) -> AnyresLayout | None:
    """The layout ``--image_aspect_ratio`` / ``--image_grid_pinpoints`` ask for on this tower (None unless anyres)."""
    if data_args is None:
        return None
    mode, max_n = parse_image_aspect_ratio(data_args.image_aspect_ratio)
    if mode != "anyres":
        return None
    pinpoints = parse_grid_pinpoints(data_args.image_grid_pinpoints, vision_config.image_size, max_num_patches=max_n)
    return AnyresLayout.from_vision_config(vision_config, strategy, pinpoints, max_n)


def image_layout_args_from_run(run: dict) -> SimpleNamespace:
    """A run's ``--image_aspect_ratio`` / ``--image_grid_pinpoints`` (its ``llava_args.json``), what ``anyres_layout``
    reads: an anyres run's base is rebuilt (``llava merge``) as the LlavaNext / LlavaOnevision it trained as."""
    data = run.get("data_args", {})
    return SimpleNamespace(image_aspect_ratio=data.get("image_aspect_ratio", "square"),
                           image_grid_pinpoints=data.get("image_grid_pinpoints"),
                           **{k: data.get(k, v) for k, v in _VIDEO_DATA_DEFAULTS.items()})


# a video run's data flags (llava/data/video_flags.py), so its base is rebuilt as the LlavaOnevision / LlavaNextVideo
# it trained as
_VIDEO_DATA_DEFAULTS = {"video_folder": None, "frames_upbound": 0, "video_fps": 1.0, "force_sample": False,
                        "add_time_instruction": False}


def layout_from_config(config) -> AnyresLayout | None:
    """The layout of a saved LlavaNext / LlavaOnevision config (None for a Llava config)."""
    if config.model_type not in (*ANYRES_MODEL_TYPES, "llava_next_video"):  # LlavaNextVideo's images: LlavaNext's
        return None
    max_n = None
    if config.model_type == "llava_onevision":
        max_n = parse_image_aspect_ratio(config.vision_aspect_ratio)[1]
        if max_n is None:
            raise ValueError(f"vision_aspect_ratio {config.vision_aspect_ratio!r} of a LlavaOnevision config is not "
                             f"anyres_max_N")
    return AnyresLayout.from_vision_config(config.vision_config, config.vision_feature_select_strategy,
                                           config.image_grid_pinpoints, max_n)


def make_anyres_config(common: dict, layout: AnyresLayout) -> LlavaNextConfig | LlavaOnevisionConfig:
    """The native config of ``layout``: the Llava fields ``common`` (assembled by ``builder.make_llava_config``, its
    one caller) plus the pinpoints and the class's own field."""
    common = {**common, "image_grid_pinpoints": [list(p) for p in layout.grid_pinpoints]}
    if layout.max_num_patches:
        return LlavaOnevisionConfig(**common, vision_aspect_ratio=layout.vision_aspect_ratio)
    return LlavaNextConfig(**common, image_seq_length=layout.base_tokens)


def new_image_newline(hidden_size: int, dtype: torch.dtype) -> torch.nn.Parameter:
    """LLaVA-NeXT's ``image_newline``: ``randn(hidden) * 1/sqrt(hidden)`` (the native ``_init_weights`` agrees)."""
    return torch.nn.Parameter((torch.randn(hidden_size) / math.sqrt(hidden_size)).to(dtype))


def make_anyres_processor(layout: AnyresLayout, tower_processor, tokenizer, vision_config, strategy: str):
    """The native processor, told the tower's extra CLS token so its counts equal the model's features."""
    image_processor = build_anyres_image_processor(layout, tower_processor)
    has_cls = vision_config.model_type in HAS_CLS_TOKEN
    chat_template = getattr(tokenizer, "chat_template", None)
    if layout.max_num_patches:
        side = vision_config.image_size // vision_config.patch_size
        settings = dict(num_image_tokens=side * side + int(has_cls), vision_feature_select_strategy=strategy,
                        image_token=DEFAULT_IMAGE_TOKEN, vision_aspect_ratio=layout.vision_aspect_ratio)
        try:
            return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           chat_template=chat_template, **settings)
        except (AttributeError, ImportError, TypeError):  # its video processor needs torchvision
            return OnevisionProcessorFiles(image_processor, tokenizer, chat_template, settings)
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy, image_token=DEFAULT_IMAGE_TOKEN,
        num_additional_image_tokens=int(has_cls), chat_template=chat_template,
    )


class OnevisionProcessorFiles(ProcessorFiles):
    """Stands in for ``LlavaOnevisionProcessor`` (see :class:`ProcessorFiles`)."""

    processor_class = "LlavaOnevisionProcessor"
    image_processor_type = "LlavaOnevisionImageProcessor"
    fixed_settings = {"video_token": "<video>"}

    def video_processor_dict(self, image_processor: dict) -> dict:
        return onevision_video_processor_dict(image_processor)


def onevision_video_processor_dict(image_processor: dict) -> dict:
    """The nested ``video_processor`` entry of a OneVision ``processor_config.json``: ``AutoProcessor`` loads the
    processor's video half from it (without it transformers raises ``OSError`` for a missing
    ``video_preprocessor_config.json`` before any image is read). Frames resize to the tower's square input with the
    image processor's normalisation, as the native OneVision checkpoints configure it."""

    size = image_processor["size"]
    side = size.get("height") or size.get("shortest_edge")
    video = LlavaOnevisionVideoProcessor(
        size={"height": side, "width": side}, image_mean=image_processor["image_mean"],
        image_std=image_processor["image_std"], resample=image_processor["resample"],
        rescale_factor=image_processor["rescale_factor"]).to_dict()
    return json.loads(json.dumps(video, default=int))  # resample is an enum


# processor_config.json keys LlavaOnevisionProcessor takes besides its image processor
_ONEVISION_SETTINGS = ("num_image_tokens", "vision_feature_select_strategy", "image_token", "vision_aspect_ratio")


def load_processor(path, *, trust_remote_code: bool = False):
    """``AutoProcessor.from_pretrained(path)``; for a OneVision directory on a machine where transformers cannot build
    ``LlavaOnevisionProcessor`` (without torchvision, which its video half needs), an ``OnevisionProcessorFiles``
    read from the same files: the tokenizer, the PIL ``LlavaOnevisionImageProcessorPil`` and the counting settings.
    Training from a OneVision checkpoint, ``llava merge`` and ``llava predict`` read processors through it."""
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (AttributeError, ImportError, OSError):
        config_file = Path(path) / "processor_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if (config.get("processor_class") not in ("LlavaOnevisionProcessor", "LlavaNextVideoProcessor")
                or "image_processor" not in config):
            raise

    settings = {k: v for k, v in config["image_processor"].items() if k != "image_processor_type"}
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    template_file = Path(path) / "chat_template.jinja"
    chat_template = template_file.read_text() if template_file.is_file() else getattr(tokenizer, "chat_template", None)
    if config["processor_class"] == "LlavaNextVideoProcessor":
        from llava.model.video_model import load_next_video_processor_files  # video_model imports this module

        return load_next_video_processor_files(path, config, tokenizer, chat_template)
    return OnevisionProcessorFiles(LlavaOnevisionImageProcessorPil(**settings), tokenizer, chat_template,
                                   {k: config[k] for k in _ONEVISION_SETTINGS if k in config})
