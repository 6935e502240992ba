"""Stage-1 projector files: write ours (safetensors), read ours and the original LLaVA's ``mm_projector.bin``.

    save_projector_state(state, "out/pretrain/mm_projector.safetensors")
    load_projector_state(model, "out/pretrain/mm_projector.safetensors")   # or LLaVA's mm_projector.bin

Our file holds ``linear_1.*``/``linear_2.*`` (transformers' ``LlavaMultiModalProjector``), ``image_newline`` for
anyres models (LlavaNext / LlavaOnevision) and, when stage 1 trained new token embeddings
(``--mm_use_im_start_end``), ``embed_tokens.weight``. LLaVA's ``model.mm_projector.0.*`` /
``.2.*`` keys are mapped; pickles are read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import pickle

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llava.errors import UsagePathError, UsageValueError
from llava.safetensors_io import atomic_save_safetensors

logger = logging.getLogger(__name__)

LLAVA_KEY_MAP = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
                 "2.bias": "linear_2.bias"}


def save_projector_state(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Atomically write a projector state dict (refusing zero-size tensors, e.g. un-gathered ZeRO-3 shards)."""
    atomic_save_safetensors(state, path)


def read_projector_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read our safetensors file or LLaVA's ``mm_projector.bin`` into our key names."""
    path = str(path)
    if not os.path.isfile(path):
        raise UsagePathError(f"--pretrain_mm_mlp_adapter {path} does not exist")
    try:
        raw = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu",
                                                                               weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise UsageValueError(f"--pretrain_mm_mlp_adapter {path} is not a projector file ({type(err).__name__}): give "
                              f"a stage-1 run's mm_projector.safetensors or LLaVA's mm_projector.bin") from err
    if not isinstance(raw, dict):
        raise UsageValueError(f"--pretrain_mm_mlp_adapter {path} holds a {type(raw).__name__}, not a state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if "embed_tokens" in key:
            out["embed_tokens.weight"] = value
            continue
        if key.split(".")[-1] == "image_newline":  # ours, and LLaVA-NeXT's model.image_newline
            out["image_newline"] = value
            continue
        short = key.split("mm_projector.")[-1].split("multi_modal_projector.")[-1]
        short = LLAVA_KEY_MAP.get(short, short)
        if short not in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
            raise UsageValueError(f"{path}: key {key!r} is not a projector weight of an mlp2x_gelu projector")
        out[short] = value
    return out


def load_projector_state(model, path: str | os.PathLike) -> None:
    """Load projector weights (and stage-1 token embeddings, if present) into a Llava model."""
    state = read_projector_file(path)
    embed = state.pop("embed_tokens.weight", None)
    newline = state.pop("image_newline", None)
    model_newline = getattr(model.model, "image_newline", None)
    if model_newline is not None and newline is None:  # LLaVA-NeXT's recipe: stage 1 square, stage 2 anyres
        logger.warning("%s has no image_newline (stage 1 ran without anyres, as LLaVA-NeXT's pretrain scripts do): "
                       "image_newline keeps its fresh initialisation, randn(hidden)/sqrt(hidden) as in LLaVA-NeXT, "
                       "and trains when the projector does", path)
    if newline is not None and model_newline is not None:
        if newline.shape != model_newline.shape:
            raise UsageValueError(f"{path}: image_newline {tuple(newline.shape)} does not match the model's "
                             f"{tuple(model_newline.shape)}")
        with torch.no_grad():
            model_newline.copy_(newline.to(model_newline.dtype))
    projector = model.model.multi_modal_projector
    expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise UsageValueError(f"{path}: projector shapes {got} do not match this model's projector {expected} "
                         "(was it trained for another vision tower or LLM?)")
    projector.load_state_dict({k: v.to(projector.linear_1.weight.dtype) for k, v in state.items()})
    if embed is not None:
        current = model.get_input_embeddings().weight
        if embed.shape != current.shape:
            raise UsageValueError(f"{path}: embed_tokens {tuple(embed.shape)} does not match the model's {tuple(current.shape)}")
        with torch.no_grad():
            current.copy_(embed.to(current.dtype))
