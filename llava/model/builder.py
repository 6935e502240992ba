"""Compose a vision tower + LLM + projector into ``transformers.LlavaForConditionalGeneration``.

    built = build_llava_model(model_args)          # from an LLM dir + --vision_tower, or from a Llava checkpoint
    apply_freezing(built.model, model_args)         # the whole freezing policy, in one place

The vision tower and the LLM are loaded with ``from_pretrained`` exactly as user checkpoints are, then placed into a
Llava skeleton built on the meta device (no second copy of the weights). The ``<image>`` token is a real added
token; ``num_image_tokens`` is what the vision tower yields per image under the select strategy.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, HAS_CLS_TOKEN
from llava.data.anyres import AnyresLayout
from llava.errors import UsagePathError, UsageValueError
from llava.model.anyres_model import (
    MODEL_CLASSES,
    anyres_layout,
    layout_from_config,
    load_processor,
    make_anyres_config,
    make_anyres_processor,
    new_image_newline,
)
from llava.model.projector import load_projector_state

logger = logging.getLogger(__name__)

VISION_MODELS = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
}


@dataclass
class BuiltModel:
    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    num_image_tokens: int  # per image (LLaVA-1.5); per tower view under anyres, where ``layout`` counts per size
    added_tokens: int  # tokens added to the LLM's vocabulary (their embeddings are new)
    layout: AnyresLayout | None = None  # LlavaNext / LlavaOnevision: image tokens depend on each image's size

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id


def select_strategy(vision_config, mm_vision_select_feature: str) -> str:
    """LLaVA's ``patch`` drops CLIP's CLS token ("default"); SigLIP has no CLS, so every token is a patch ("full")."""
    if mm_vision_select_feature == "cls_patch" or vision_config.model_type not in HAS_CLS_TOKEN:
        return "full"
    return "default"


def num_image_tokens(vision_config, strategy: str) -> int:
    """Features per image: (H/patch)*(W/patch), +1 for CLIP's CLS, -1 under the "default" strategy."""
    n = (vision_config.image_size // vision_config.patch_size) ** 2
    n += 1 if vision_config.model_type in HAS_CLS_TOKEN else 0
    return n - 1 if strategy == "default" else n


def add_multimodal_tokens(tokenizer, mm_use_im_start_end: bool) -> int:
    """Register ``<image>`` (and ``<im_start>``/``<im_end>``) as special tokens and a pad token; return #added."""
    new = [DEFAULT_IMAGE_TOKEN] + ([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN] if mm_use_im_start_end else [])
    missing = [t for t in new if t not in tokenizer.get_vocab()]
    added = tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False) if missing else 0
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            added += tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return added


def vision_model_class(path: str, model_type: str):
    """The transformers class of a ``--vision_tower`` of this ``model_type``; a one-line error for anything else."""
    cls = VISION_MODELS.get(model_type)
    if cls is None:
        raise UsageValueError(f"--vision_tower {path}: model_type {model_type!r} is not one of {sorted(VISION_MODELS)}; "
                              f"give a CLIP or SigLIP vision tower directory")
    return cls


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dirs(model_name_or_path: str, vision_tower: str | None) -> None:
    """What local ``--model_name_or_path`` / ``--vision_tower`` directories hold, read from their ``config.json``
    before anything loads: an LLM or Llava checkpoint with its tokenizer (not a vision tower), and a CLIP / SigLIP
    tower. Hub ids are left to ``from_pretrained``; existence is ``require_model_path``'s."""
    llm = Path(model_name_or_path).expanduser()
    if (llm / "config.json").is_file():
        model_type = json.loads((llm / "config.json").read_text()).get("model_type")
        if model_type in VISION_MODELS:
            raise UsageValueError(f"--model_name_or_path {model_name_or_path} is a vision tower ({model_type}): give "
                                  f"the LLM or Llava checkpoint directory (the tower goes to --vision_tower)")
        if not any((llm / name).is_file() for name in TOKENIZER_FILES):
            raise UsagePathError(f"--model_name_or_path {model_name_or_path} has no tokenizer ({', '.join(TOKENIZER_FILES)}"
                                 f"): give an LLM directory saved with its tokenizer")
    tower = Path(vision_tower).expanduser() if vision_tower else None
    if tower is not None and (tower / "config.json").is_file():
        vision_model_class(vision_tower, json.loads((tower / "config.json").read_text()).get("model_type"))


def load_vision_tower(path: str, *, torch_dtype=torch.float32, trust_remote_code: bool = False):
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    tower = vision_model_class(path, config.model_type).from_pretrained(path, dtype=torch_dtype)
    image_processor = AutoImageProcessor.from_pretrained(path)
    return tower, image_processor


LLAVA_CLASSES = {"llava": LlavaForConditionalGeneration, **MODEL_CLASSES}


def _is_llava_checkpoint(path: str, trust_remote_code: bool) -> bool:
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type in LLAVA_CLASSES
    except (OSError, ValueError):
        return False


def llava_key_of_llm_key(llm_key: str) -> str:
    """Where a language model's checkpoint tensor lives in a Llava checkpoint (``model.x`` ->
    ``model.language_model.x``; ``lm_head.*`` unchanged)."""
    if llm_key.startswith("model."):
        return "model.language_model." + llm_key[len("model."):]
    if llm_key.startswith("lm_head."):
        return llm_key
    raise ValueError(f"unexpected language-model weight {llm_key!r} (expected model.* or lm_head.*)")


def build_llava_model(model_args, *, torch_dtype=torch.float32, quantization_config=None, data_args=None) -> BuiltModel:
    """Build from ``--model_name_or_path`` (+ ``--vision_tower``), load a stage-1 projector if given.

    ``data_args.image_aspect_ratio`` anyres / anyres_max_N composes ``LlavaNextForConditionalGeneration`` /
    ``LlavaOnevisionForConditionalGeneration`` instead of ``LlavaForConditionalGeneration`` (see anyres_model.py).
    ``quantization_config`` (QLoRA, see ``llava/model/quantization.py``) applies to the language model's
    linear layers only; its ``llm_int8_skip_modules`` must name the tower, projector and lm_head by full prefix."""
    if _is_llava_checkpoint(model_args.model_name_or_path, model_args.trust_remote_code):
        built = _load_llava_checkpoint(model_args, torch_dtype, quantization_config)
    else:
        built = _compose_llava(model_args, torch_dtype, quantization_config, data_args)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector_state(built.model, model_args.pretrain_mm_mlp_adapter)
    return built


def _compose_llava(model_args, torch_dtype, quantization_config=None, data_args=None) -> BuiltModel:
    if not model_args.vision_tower:
        raise UsageValueError(
            f"--model_name_or_path {model_args.model_name_or_path} is a language model, so --vision_tower is required: "
            f"give a CLIP or SigLIP directory"
        )
    rng_at_start = torch.get_rng_state()  # new weights below depend on the seed, not on how the parts were loaded
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, use_fast=True, padding_side="right", trust_remote_code=model_args.trust_remote_code
    )
    added = add_multimodal_tokens(tokenizer, model_args.mm_use_im_start_end)
    llm = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=torch_dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
        **({"quantization_config": quantization_config} if quantization_config is not None else {}),
    )
    tower, image_processor = load_vision_tower(
        model_args.vision_tower, torch_dtype=torch_dtype, trust_remote_code=model_args.trust_remote_code
    )
    strategy = select_strategy(tower.config, model_args.mm_vision_select_feature)
    layout = anyres_layout(data_args, tower.config, strategy)
    config = make_llava_config(llm.config, tower.config, tokenizer, select_feature=model_args.mm_vision_select_feature,
                               select_layer=model_args.mm_vision_select_layer, layout=layout)
    n_tokens = config.image_seq_length if layout is None else layout.base_tokens
    config._attn_implementation = model_args.attn_implementation
    with torch.device("meta"), _without_zero3_init():
        model = LLAVA_CLASSES[config.model_type](config)
    model.model.vision_tower = tower
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    torch.set_rng_state(rng_at_start)  # (ZeRO-3's partitioned loading draws random numbers; a plain load does not)
    projector_cls = LlavaMultiModalProjector if layout is None else type(model.model.multi_modal_projector)
    model.model.multi_modal_projector = projector_cls(config).to(torch_dtype)
    if layout is not None:  # drawn right after the projector, as LLaVA-NeXT's initialize_vision_modules does
        model.model.image_newline = new_image_newline(config.text_config.hidden_size, torch_dtype)
    model.generation_config = llm.generation_config
    if added:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    _assert_materialized(model)
    if quantization_config is not None:  # what peft reads to pick its bitsandbytes LoRA layers
        model.is_loaded_in_4bit = bool(quantization_config.load_in_4bit)
        model.is_loaded_in_8bit = bool(quantization_config.load_in_8bit)

    processor = make_llava_processor(image_processor, tokenizer, tower.config, strategy, layout)
    return BuiltModel(model, processor, n_tokens, added, layout)


def make_llava_config(llm_config, vision_config, tokenizer, *, select_feature: str, select_layer: int,
                      layout: AnyresLayout | None = None):
    """The Llava config of a vision tower + LLM (before any vocabulary resize): the one assembly used by
    ``build_llava_model``, ``llava merge`` (streaming) and ``llava import-llava``; with an anyres ``layout`` the
    native LlavaNext / LlavaOnevision config (the same fields, plus what ``make_anyres_config`` adds).

    ``select_feature``: ``--mm_vision_select_feature`` (patch | cls_patch); ``select_layer``:
    ``--mm_vision_select_layer``."""
    strategy = select_strategy(vision_config, select_feature)
    common = dict(
        vision_config=vision_config.to_dict(),
        text_config=llm_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=int(select_layer),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm_config, "tie_word_embeddings", False)),
    )
    if layout is not None:
        return make_anyres_config(common, layout)
    return LlavaConfig(**common, image_seq_length=num_image_tokens(vision_config, strategy))


def make_llava_processor(image_processor, tokenizer, vision_config, strategy: str,
                         layout: AnyresLayout | None = None) -> LlavaProcessor:
    """The processor of a Llava model: the tower's image processor, the tokenizer (with ``<image>``), the patch
    grid and select strategy the processor needs to expand ``<image>`` the way the model does; with an anyres
    ``layout`` the native LlavaNext / LlavaOnevision processor (``make_anyres_processor``)."""
    if layout is not None:
        return make_anyres_processor(layout, image_processor, tokenizer, vision_config, strategy)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        image_token=DEFAULT_IMAGE_TOKEN,
        num_additional_image_tokens=1 if vision_config.model_type in HAS_CLS_TOKEN else 0,
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def _load_llava_checkpoint(model_args, torch_dtype, quantization_config=None) -> BuiltModel:
    path = model_args.model_name_or_path
    quant = {"quantization_config": quantization_config} if quantization_config is not None else {}
    model_type = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code).model_type
    model = LLAVA_CLASSES[model_type].from_pretrained(
        path, dtype=torch_dtype, attn_implementation=model_args.attn_implementation, **quant
    )
    processor = load_processor(path, trust_remote_code=model_args.trust_remote_code)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    added = add_multimodal_tokens(tokenizer, model_args.mm_use_im_start_end)
    if added:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if model.config.image_token_id != tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN):
        raise ValueError(f"{path}: config.image_token_id {model.config.image_token_id} is not the tokenizer's "
                         f"{DEFAULT_IMAGE_TOKEN} id {tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)}")
    layout = layout_from_config(model.config)
    n_tokens = (layout.base_tokens if layout is not None
                else num_image_tokens(model.config.vision_config, model.config.vision_feature_select_strategy))
    return BuiltModel(model, processor, n_tokens, added, layout)


@contextlib.contextmanager
def _without_zero3_init():
    """Build the Llava skeleton on the meta device outside ZeRO-3's ``zero.Init`` (which would try to initialise
    meta tensors). Its parts come from ``from_pretrained`` (partitioned under ZeRO-3 as usual); the new projector
    stays whole until ``deepspeed.initialize`` partitions every parameter not yet partitioned."""
    # transformers' DeepSpeed integration only when building under ZeRO-3
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def _assert_materialized(model: torch.nn.Module) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left on the meta device after composing the model: {left[:5]}")


def apply_freezing(model: LlavaForConditionalGeneration, model_args, *, added_tokens: int = 0) -> dict[str, int]:
    """The freezing policy. Returns trainable parameter counts per part.

    - default (stage 2): language model + projector train, vision tower frozen;
    - ``--tune_mm_mlp_adapter`` (stage 1): only the projector (plus input embeddings when
      ``--mm_use_im_start_end`` added tokens, as LLaVA does);
    - ``--freeze_backbone``: the language model is frozen; ``--freeze_mm_mlp_adapter``: the projector is frozen;
    - ``--unfreeze_mm_vision_tower``: the vision tower trains too.
    """
    inner = model.model
    tune_llm = not (model_args.tune_mm_mlp_adapter or model_args.freeze_backbone)
    tune_projector = not model_args.freeze_mm_mlp_adapter
    tune_vision = model_args.unfreeze_mm_vision_tower and not model_args.tune_mm_mlp_adapter
    inner.vision_tower.requires_grad_(tune_vision)
    inner.multi_modal_projector.requires_grad_(tune_projector)
    if getattr(inner, "image_newline", None) is not None:  # LlavaNext / LlavaOnevision: trains with the projector
        inner.image_newline.requires_grad_(tune_projector)
    _set_trainable(inner.language_model, tune_llm)
    model.lm_head.requires_grad_(tune_llm)
    if model_args.tune_mm_mlp_adapter and model_args.mm_use_im_start_end and added_tokens:
        model.get_input_embeddings().requires_grad_(True)
    return count_trainable_parameters(model)


def _set_trainable(module: torch.nn.Module, trainable: bool) -> None:
    """``requires_grad_`` that skips integer tensors (QLoRA's quantized weights; their adapters train instead)."""
    for param in module.parameters():
        if param.is_floating_point():
            param.requires_grad_(trainable)


def count_trainable_parameters(model: LlavaForConditionalGeneration) -> dict[str, int]:
    parts = {
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
    }
    counts = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in parts.items()}
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:
        counts["image_newline"] = newline.numel() if newline.requires_grad else 0
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    counts["total"] = total
    return counts


def set_use_cache(model, use_cache: bool) -> None:
    """Set ``use_cache`` on the Llava config, its text config, and every sub-model's own config object.

    The composed language model keeps a config object of its own (not ``model.config.text_config``), and it is the
    one its forward reads: training with a cache left on fills a KV cache every step and hides packed sequences
    from ``masking_utils`` (it only reads sample boundaries from position ids when there is no cache).
    """
    configs = {id(model.config): model.config, id(model.config.text_config): model.config.text_config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            configs[id(config)] = config
    for config in configs.values():
        config.use_cache = use_cache
