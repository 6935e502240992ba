"""Convert an original LLaVA checkpoint into a native one: LLaVA-1.5 (``llava_llama`` / ``llava_mistral``, ``pad`` or
``square``) -> ``LlavaForConditionalGeneration``; LLaVA-NeXT 1.6 (``image_aspect_ratio anyres``) ->
``LlavaNextForConditionalGeneration``; LLaVA-OneVision (``llava_qwen``, ``anyres_max_N``) ->
``LlavaOnevisionForConditionalGeneration``; each with its processor and ``llava_args.json``.

    llava import-llava --src liuhaotian/llava-v1.5-7b-local-copy --out out/llava-1.5-native [--version vicuna_v1]
    llava import-llava --src llava-v1.6-vicuna-7b/ --out out/llava-1.6-native
    llava import-llava --src llava-onevision-qwen2-0.5b-ov/ --out out/ov-native --vision_tower siglip-so400m-dir/
                       [--version chatml]     # chatml is the default for a Qwen2 LLM, vicuna_v1 otherwise

The source layout: ``config.json`` with the LLM's config plus ``mm_vision_tower``, ``mm_projector_type``
(``mlp2x_gelu``), ``mm_vision_select_layer``, ``mm_vision_select_feature`` (and for anyres ``image_aspect_ratio``,
``image_grid_pinpoints``, ``mm_patch_merge_type spatial_unpad``); weights (safetensors or ``.bin``, sharded or not)
``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head`` (absent when tied), ``model.mm_projector.0/2.*``,
``model.image_newline`` (anyres) and optionally ``model.vision_tower.vision_tower.[vision_model.]*`` (else the tower comes from
``mm_vision_tower`` / ``--vision_tower``). Keys map to ``model.language_model.*``,
``model.multi_modal_projector.linear_1/2.*``, ``model.image_newline``, ``model.vision_tower.*``; the config facts
(pinpoints as ``[height, width]``, select layer and strategy, SigLIP's trimmed tower) are translated in
``original_config.py``, which also refuses what no native class expresses, naming the config key and value.
``<image>`` becomes a real added token (its embedding row is new; image tokens are replaced by features, never read).
``.bin`` files are read with ``weights_only=True``. The model is assembled on the meta device and the tensors
assigned, so peak memory is one copy of the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from llava.constants import HAS_CLS_TOKEN
from llava.data.anyres import AnyresLayout
from llava.data.chat_templates import set_chat_template
from llava.data.templates import get_template
from llava.errors import UsagePathError, UsageValueError, require_model_path
from llava.export.original_config import (
    OriginalSettings,
    check_select_feature,
    native_grid_pinpoints,
    read_original_settings,
    trim_siglip_tower,
)
from llava.model.builder import (
    LLAVA_CLASSES,
    add_multimodal_tokens,
    load_vision_tower,
    make_llava_config,
    make_llava_processor,
    select_strategy,
)
from llava.run_dir import RunKind, write_run_args

logger = logging.getLogger(__name__)
MM_KEYS = ("mm_", "image_aspect_ratio", "image_grid_pinpoints", "image_crop_resolution", "image_split_resolution",
           "tune_mm", "freeze_mm", "unfreeze_mm", "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj",
           "mm_vision_tower", "vision_tower_pretrained", "add_faster_video", "faster_token_stride", "pos_skipping_range")
PROJECTOR_KEYS = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
                  "2.bias": "linear_2.bias"}
VISION_PREFIX = "model.vision_tower.vision_tower."
NEWLINE_KEY = "model.image_newline"
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.")


def read_original_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint: ``*.safetensors`` if any, else ``*.bin`` (``weights_only=True``)."""
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin")) or sorted(src.glob("*.bin"))
    if not files:
        raise UsagePathError(f"--src {src}: no *.safetensors or *.bin weight files")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        part = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                     weights_only=True)
        state.update(part)
    return state


def map_original_key(key: str) -> str | None:
    """Original LLaVA key -> native Llava key (``None``: not a weight to keep, e.g. a rotary buffer)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith("model.mm_projector."):
        short = key.removeprefix("model.mm_projector.")
        if short not in PROJECTOR_KEYS:
            raise ValueError(f"{key}: not a weight of an mlp2x_gelu projector")
        return "model.multi_modal_projector." + PROJECTOR_KEYS[short]
    if key == NEWLINE_KEY:
        return key
    if key.startswith(VISION_PREFIX):  # saved by transformers 4.x with the tower's own vision_model. prefix
        return "model.vision_tower." + key.removeprefix(VISION_PREFIX).removeprefix("vision_model.")
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    if key.startswith("lm_head."):
        return key
    raise ValueError(f"unexpected key {key!r} in an original LLaVA checkpoint")


def map_original_state(settings: OriginalSettings, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in original.items():
        new = map_original_key(key)
        if new is not None:
            state[new] = tensor
    if settings.anyres and NEWLINE_KEY not in state:
        raise settings.error("mm_patch_merge_type", f"the checkpoint has no {NEWLINE_KEY} weight, which spatial_unpad "
                                                    f"trains")
    if not settings.anyres and state.pop(NEWLINE_KEY, None) is not None:  # a pad/square forward never reads it
        logger.info("%s: image_aspect_ratio %s never uses %s; left out", settings.config_path,
                    settings.aspect_ratio, NEWLINE_KEY)
    return state


def original_vision_tower(tower, state: dict[str, torch.Tensor], settings: OriginalSettings):
    """The tower's native config and select layer; its weights are added to ``state`` from the tower directory
    (``tower``, loaded from it) when the checkpoint does not embed them (``model.vision_tower.*`` keys)."""
    embedded = {k for k in state if k.startswith("model.vision_tower.")}
    vision_config, select_layer = tower.config, int(settings.raw.get("mm_vision_select_layer", -2))
    if vision_config.model_type not in HAS_CLS_TOKEN:  # SigLIP: LLaVA-NeXT's SigLipVisionTower, see original_config
        layers = {int(m.group(1)) for k in embedded if (m := _LAYER_RE.match(k.removeprefix("model.vision_tower.")))}
        vision_config, select_layer = trim_siglip_tower(vision_config, max(layers) + 1 if layers else None)
    if not embedded:
        logger.info("no vision tower weights in %s: taking them from the tower directory", settings.config_path.parent)
        for key, tensor in tower.state_dict().items():
            layer = _LAYER_RE.match(key)
            if not key.startswith("head.") and not (layer and int(layer.group(1)) >= vision_config.num_hidden_layers):
                state["model.vision_tower." + key] = tensor
    return vision_config, select_layer


def import_llava(src: str | Path, out: str | Path, *, version: str | None = None, vision_tower: str | None = None,
                 max_shard_size: str = "5GB") -> Path:
    """Write the native checkpoint of the original one in ``src`` to ``out``; returns ``out``."""
    src, out = Path(src), Path(out)
    settings = read_original_settings(src)
    raw = settings.raw
    tower_path = vision_tower or raw.get("mm_vision_tower") or raw.get("vision_tower")
    if not tower_path:
        raise UsageValueError(f"--src {src}: config.json names no mm_vision_tower; pass --vision_tower")
    require_model_path("--vision_tower" if vision_tower else f"mm_vision_tower in {settings.config_path}", tower_path,
                       hint="pass --vision_tower with a local CLIP or SigLIP directory")
    version = version or ("chatml" if settings.text_model_type == "qwen2" else "vicuna_v1")
    text_fields = {k: v for k, v in raw.items() if not k.startswith(MM_KEYS) and k not in ("model_type", "architectures")}
    text_config = AutoConfig.for_model(settings.text_model_type, **text_fields)
    text_config.tie_word_embeddings = bool(raw.get("tie_word_embeddings", False))

    tokenizer = AutoTokenizer.from_pretrained(src, use_fast=True, padding_side="right")
    add_multimodal_tokens(tokenizer, bool(raw.get("mm_use_im_start_end", False)))
    tower, image_processor = load_vision_tower(tower_path)  # config + processor (+ weights if not embedded)
    check_select_feature(settings, tower.config.model_type in HAS_CLS_TOKEN)  # before reading the checkpoint
    state = map_original_state(settings, read_original_weights(src))
    vision_config, select_layer = original_vision_tower(tower, state, settings)
    del tower
    strategy = select_strategy(vision_config, settings.select_feature)
    layout = None
    if settings.anyres:
        layout = AnyresLayout.from_vision_config(vision_config, strategy, native_grid_pinpoints(
            settings, vision_config.image_size), settings.max_num_patches)
    config = make_llava_config(text_config, vision_config, tokenizer, select_feature=settings.select_feature,
                               select_layer=select_layer, layout=layout)

    with torch.device("meta"):
        model = LLAVA_CLASSES[config.model_type](config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing or unexpected:
        raise ValueError(f"{src}: missing weights {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    dtype = next(iter(state.values())).dtype
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(dtype)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)

    processor = make_llava_processor(image_processor, tokenizer, vision_config, strategy, layout)
    set_chat_template(processor, get_template(version))  # renders its training prompts
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.save_pretrained(out)
    write_run_args(out, run_args(settings, version, tower_path, select_layer, layout), {
        "imported_from": str(src), "num_image_tokens": layout.base_tokens if layout else config.image_seq_length,
        "projector_only": False, "run_kind": RunKind.IMPORTED.value})
    return out


def run_args(settings: OriginalSettings, version: str, tower_path: str, select_layer: int,
             layout: AnyresLayout | None) -> dict:
    """The ``llava_args.json`` of the import: what ``llava predict`` / ``eval`` / a later ``llava train`` read."""
    raw = settings.raw
    model_args = {"version": version, "vision_tower": str(tower_path), "mm_vision_select_layer": select_layer,
                  "mm_use_im_start_end": bool(raw.get("mm_use_im_start_end", False)),
                  "mm_patch_merge_type": "spatial_unpad" if layout else "flat"}
    if layout is None:
        return {"model_args": model_args,
                "data_args": {"image_aspect_ratio": "pad" if settings.aspect_ratio == "pad" else "square"}}
    return {"model_args": model_args, "data_args": {
        "image_aspect_ratio": layout.vision_aspect_ratio,
        # as the flag reads them (LLaVA-NeXT's [width, height]), so `llava merge` rebuilds this very layout
        "image_grid_pinpoints": json.dumps([[w, h] for h, w in layout.grid_pinpoints])}}


def import_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = import_llava(args.src, args.out, version=args.version, vision_tower=args.vision_tower,
                       max_shard_size=args.max_shard_size)
    model_type = json.loads((out / "config.json").read_text())["model_type"]
    print(f"native {LLAVA_CLASSES[model_type].__name__} checkpoint written to {args.out}")
    return 0
