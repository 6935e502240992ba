"""Convert an original LLaVA checkpoint (``llava_llama`` / ``llava_mistral``) into a native Llava checkpoint.

    llava import-llava --src liuhaotian/llava-v1.5-7b-local-copy --out out/llava-1.5-native [--version vicuna_v1]
                       [--vision_tower DIR]     # when config.json's mm_vision_tower is not a local directory

The source layout: ``config.json`` with a Llama/Mistral config plus ``mm_vision_tower``, ``mm_projector_type``
(``mlp2x_gelu``), ``mm_vision_select_layer``, ``mm_vision_select_feature``; weights (safetensors or ``.bin``,
sharded or not) ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``, ``model.mm_projector.0/2.*``
and optionally ``model.vision_tower.vision_tower.*`` (else the tower comes from ``mm_vision_tower``). Keys map to
``model.language_model.*``, ``model.multi_modal_projector.linear_1/2.*``, ``model.vision_tower.*``; ``<image>``
becomes a real added token (its embedding row is new; image tokens are replaced by features, never read).
``.bin`` files are read with ``weights_only=True``. The model is assembled on the meta device and the tensors
assigned, so peak memory is one copy of the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration

from llava.data.chat_templates import set_chat_template
from llava.data.templates import get_template
from llava.errors import UsagePathError, UsageValueError, require_model_path
from llava.model.builder import add_multimodal_tokens, load_vision_tower, make_llava_config, make_llava_processor
from llava.run_dir import RunKind, write_run_args

logger = logging.getLogger(__name__)
TEXT_MODEL_TYPES = {"llava_llama": "llama", "llava": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
MM_KEYS = ("mm_", "image_aspect_ratio", "image_grid_pinpoints", "tune_mm", "freeze_mm", "unfreeze_mm",
           "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj", "mm_vision_tower")
PROJECTOR_KEYS = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
                  "2.bias": "linear_2.bias"}
VISION_PREFIX = "model.vision_tower.vision_tower."


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
    if key.startswith(VISION_PREFIX):
        return "model.vision_tower." + key.removeprefix(VISION_PREFIX)
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    if key.startswith("lm_head."):
        return key
    raise ValueError(f"unexpected key {key!r} in an original LLaVA checkpoint")


def import_llava(src: str | Path, out: str | Path, *, version: str = "vicuna_v1", vision_tower: str | None = None,
                 max_shard_size: str = "5GB") -> Path:
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise UsagePathError(f"--src {src}: {'no config.json in it' if src.is_dir() else 'no such directory'}; give "
                             f"the directory of an original LLaVA checkpoint (config.json with mm_vision_tower + weights)")
    raw = json.loads((src / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type not in TEXT_MODEL_TYPES:
        raise UsageValueError(f"--src {src}: model_type {model_type!r} is not one of {sorted(TEXT_MODEL_TYPES)}")
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise UsageValueError(f"--src {src}: mm_projector_type {raw.get('mm_projector_type')!r}: only mlp2x_gelu maps to "
                         "transformers' LlavaMultiModalProjector")
    tower_path = vision_tower or raw.get("mm_vision_tower") or raw.get("vision_tower")
    if not tower_path:
        raise UsageValueError(f"--src {src}: config.json names no mm_vision_tower; pass --vision_tower")
    require_model_path("--vision_tower" if vision_tower else f"mm_vision_tower in {src / 'config.json'}", tower_path,
                       hint="pass --vision_tower with a local CLIP or SigLIP directory")
    text_fields = {k: v for k, v in raw.items() if not k.startswith(MM_KEYS) and k not in ("model_type", "architectures")}
    text_config = AutoConfig.for_model(TEXT_MODEL_TYPES[model_type], **text_fields)

    tokenizer = AutoTokenizer.from_pretrained(src, use_fast=True, padding_side="right")
    add_multimodal_tokens(tokenizer, bool(raw.get("mm_use_im_start_end", False)))
    tower, image_processor = load_vision_tower(tower_path)  # config + processor (+ weights if not embedded)
    text_config.tie_word_embeddings = bool(raw.get("tie_word_embeddings", False))
    config = make_llava_config(text_config, tower.config, tokenizer,
                               select_feature=raw.get("mm_vision_select_feature", "patch"),
                               select_layer=int(raw.get("mm_vision_select_layer", -2)))
    strategy = config.vision_feature_select_strategy

    state = {}
    for key, tensor in read_original_weights(src).items():
        new = map_original_key(key)
        if new is not None:
            state[new] = tensor
    if not any(k.startswith("model.vision_tower.") for k in state):
        logger.info("no vision tower weights in %s: taking them from %s", src, tower_path)
        state.update({"model.vision_tower." + k: v for k, v in tower.state_dict().items()})
    del tower
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
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

    processor = make_llava_processor(image_processor, tokenizer, config.vision_config, strategy)
    set_chat_template(processor, get_template(version))  # renders its training prompts
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.save_pretrained(out)
    write_run_args(out, {
        "model_args": {"version": version, "vision_tower": str(tower_path),
                       "mm_vision_select_layer": config.vision_feature_layer,
                       "mm_use_im_start_end": bool(raw.get("mm_use_im_start_end", False))},
        "data_args": {"image_aspect_ratio": "pad" if raw.get("image_aspect_ratio") == "pad" else "square"},
    }, {"imported_from": str(src), "num_image_tokens": config.image_seq_length, "projector_only": False,
        "run_kind": RunKind.IMPORTED.value})
    return out


def import_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import_llava(args.src, args.out, version=args.version, vision_tower=args.vision_tower,
                 max_shard_size=args.max_shard_size)
    print(f"native Llava checkpoint written to {args.out}")
    return 0
