"""Optimizer parameter groups: projector (+ image_newline) at ``--mm_projector_lr``, vision tower at
``--mm_vision_tower_lr`` with layer-wise decay ``--mm_vision_tower_lr_decay``, the rest at ``--learning_rate``.

    groups = optimizer_param_groups(model, training_args, decay_names)   # [{"params", "lr"?, "weight_decay"}, ...]
    with deepspeed_optimizer_keeps_groups(groups):                      # a DeepSpeed config with its own "optimizer"
        trainer.train()

Layer-wise decay (the OneVision recipe trains the tower at 2e-6; decay is ours): with L encoder layers, layer k
(1..L) gets ``lr * decay ** (L - k)``, the embeddings (and CLIP's pre-layernorm) ``lr * decay ** L``, what follows
the last layer (post-layernorm, SigLIP's head) ``lr``. Parameters sharing a learning rate and weight decay share a
group. Under DeepSpeed with an "optimizer" block, transformers hands DeepSpeed a flat parameter list (LLaVA-NeXT's
groups are silently lost there); ``deepspeed_optimizer_keeps_groups`` hands it these groups instead.
"""

from __future__ import annotations

import contextlib
import re

import torch

_LAYER_RE = re.compile(r"vision_tower\..*\.layers\.(\d+)\.")
_AFTER_LAYERS = ("post_layernorm", ".head.")


def vision_layer_index(name: str, num_layers: int) -> int:
    """0 for the embeddings / pre-layernorm, k for encoder layer k-1 (k = 1..L), L for what follows the layers."""
    match = _LAYER_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers if any(part in name for part in _AFTER_LAYERS) else 0


def is_projector_param(name: str) -> bool:
    return "multi_modal_projector" in name or name.endswith("image_newline")


def optimizer_param_groups(model: torch.nn.Module, args, decay_names: set[str] | list[str]) -> list[dict]:
    """Groups of the trainable parameters by (learning rate, weight decay); ``lr`` is set only where it differs
    from ``--learning_rate`` (a DeepSpeed "optimizer" block then gives the rest its own lr)."""
    decay_names = set(decay_names)
    vision_lr = args.mm_vision_tower_lr if args.mm_vision_tower_lr is not None else args.learning_rate
    layer_decay = args.mm_vision_tower_lr_decay
    num_layers = _num_vision_layers(model)
    groups: dict[tuple[float | None, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = None
        if "vision_tower" in name:
            lr = vision_lr
            if layer_decay is not None:
                lr = vision_lr * layer_decay ** (num_layers - vision_layer_index(name, num_layers))
        elif is_projector_param(name) and args.mm_projector_lr is not None:
            lr = args.mm_projector_lr
        if lr == args.learning_rate:
            lr = None
        weight_decay = args.weight_decay if name in decay_names else 0.0
        groups.setdefault((lr, weight_decay), []).append(param)
    out = []
    for (lr, weight_decay), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay}
        if lr is not None:
            group["lr"] = lr
        out.append(group)
    return out


def needs_param_groups(args) -> bool:
    return any(getattr(args, k) is not None for k in ("mm_projector_lr", "mm_vision_tower_lr", "mm_vision_tower_lr_decay"))


def _num_vision_layers(model: torch.nn.Module) -> int:
    indices = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER_RE.search(n))]
    return max(indices) + 1 if indices else 0


@contextlib.contextmanager
def deepspeed_optimizer_keeps_groups(groups_fn):
    """While active, a DeepSpeed config with its own "optimizer" gets ``groups_fn()`` as its parameter groups (each
    group's ``lr`` overrides the config's) instead of transformers' flat list of trainable parameters."""
    # transformers' DeepSpeed integration only for a DeepSpeed config
    from transformers.integrations import deepspeed as hf_deepspeed

    original = hf_deepspeed.deepspeed_optim_sched

    def with_groups(trainer, hf_deepspeed_config, args, num_training_steps, model_parameters):
        if "optimizer" in hf_deepspeed_config.config:
            model_parameters = groups_fn()
        return original(trainer, hf_deepspeed_config, args, num_training_steps, model_parameters)

    hf_deepspeed.deepspeed_optim_sched = with_groups
    try:
        yield
    finally:
        hf_deepspeed.deepspeed_optim_sched = original
