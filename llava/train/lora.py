"""LoRA / QLoRA on the language model of a Llava model, through peft and bitsandbytes.

    names = find_all_linear_names(model)                        # every nn.Linear of the LM, full module names
    qconfig = quantization_config(training_args, torch.float32)  # llava/model/quantization.py (--bits 4|8)
    model = setup_lora(model, model_args, training_args, added_tokens=built.added_tokens)   # -> PeftModel

LoRA adapters go on every linear layer of the language model, never on the vision tower, the projector or
``lm_head``. Alongside the adapters the projector trains fully (at ``--mm_projector_lr``) and, when tokens were
added to the vocabulary, the input and output embeddings train too; these "non-LoRA trainables" are saved beside
the adapter in ``non_lora_trainables.safetensors`` under their names in the plain Llava model (the run directory's
layout and its readers are in ``llava/run_dir.py``).

``--lora_bias``: ``none`` trains no bias; ``all`` every bias of the language model; ``lora_only`` the biases of
the LoRA-wrapped layers only. Vision-tower biases stay as the freezing policy left them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from peft import LoraConfig, get_peft_model
from torch import nn

from llava.run_dir import NON_LORA_FILE
from llava.safetensors_io import atomic_save_safetensors
from llava.train.zero3_gather import gather_named_parameters

LM_PREFIX = "model.language_model."
PEFT_PREFIX = "base_model.model."


def find_all_linear_names(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Full names of every ``nn.Linear`` (quantized ones included) inside the language model of a Llava model.

    ``exclude``: extra name fragments to leave out (a name is dropped when any fragment occurs in it)."""
    exclude = tuple(exclude)
    names = []
    for name, module in model.named_modules():
        if not name.startswith(LM_PREFIX) or not isinstance(module, nn.Linear):
            continue
        if "lora_" in name or any(fragment in name for fragment in exclude):
            continue
        names.append(name)
    if not names:
        raise ValueError("no linear layer found in the language model (model.language_model.*) to put LoRA on")
    return sorted(names)


def lora_config(model: nn.Module, training_args, *, exclude: Iterable[str] = ()):
    return LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        lora_dropout=training_args.lora_dropout,
        target_modules=find_all_linear_names(model, exclude),
        bias=training_args.lora_bias,
    )


def setup_lora(model: nn.Module, model_args, training_args, *, added_tokens: int = 0, exclude: Iterable[str] = ()):
    """Wrap ``model`` in a ``PeftModel``; then the projector (and, with new tokens, the embeddings) train fully.

    ``exclude``: name fragments of language-model linear layers to leave without an adapter."""

    vision_trainable = [p.requires_grad for p in model.model.vision_tower.parameters()]
    peft_model = get_peft_model(model, lora_config(model, training_args, exclude=exclude))
    base = peft_model.get_base_model()
    # peft's bias="all" marks every bias in the model, the vision tower's included: restore the freezing policy
    for param, trainable in zip(base.model.vision_tower.parameters(), vision_trainable):
        param.requires_grad_(trainable)
    base.model.multi_modal_projector.requires_grad_(not model_args.freeze_mm_mlp_adapter)
    if getattr(base.model, "image_newline", None) is not None:  # anyres: trains with the projector
        base.model.image_newline.requires_grad_(not model_args.freeze_mm_mlp_adapter)
    if added_tokens:
        base.get_input_embeddings().requires_grad_(True)
        base.get_output_embeddings().requires_grad_(True)
    return peft_model


def split_trainables(peft_model) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Trainable parameters as (adapter part: peft state-dict names, non-LoRA part: plain Llava names)."""
    base = peft_model.get_base_model()
    non_lora_ids = {id(p) for m in (base.model.multi_modal_projector, base.get_input_embeddings(),
                                    base.get_output_embeddings(), base.model.vision_tower) for p in m.parameters()}
    if getattr(base.model, "image_newline", None) is not None:
        non_lora_ids.add(id(base.model.image_newline))
    adapter, non_lora = [], []
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in non_lora_ids:
            non_lora.append((name.removeprefix(PEFT_PREFIX), param))
        else:
            adapter.append((name, param))
    return adapter, non_lora


def save_lora_checkpoint(peft_model, output_dir: str | os.PathLike, *, should_save: bool = True) -> None:
    """Adapter (peft format) + ``non_lora_trainables.safetensors``; gathered under ZeRO-3 (every rank calls)."""

    adapter, non_lora = split_trainables(peft_model)
    adapter_state = gather_named_parameters(adapter)
    non_lora_state = gather_named_parameters(non_lora)
    if not should_save:
        return
    empty = [k for k, v in adapter_state.items() if v.numel() == 0]
    if empty:
        raise ValueError(f"refusing to write zero-size adapter tensors {empty[:5]}: gather ZeRO-3 parameters first")
    peft_model.save_pretrained(str(output_dir), state_dict=adapter_state, safe_serialization=True)
    if non_lora_state:
        atomic_save_safetensors(non_lora_state, os.path.join(output_dir, NON_LORA_FILE))
