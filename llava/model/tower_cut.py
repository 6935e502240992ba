"""Stop the vision tower at the feature layer the projector reads: frozen layers past it are not computed.

    from llava.model.tower_cut import use_tower_cut
    use_tower_cut(model)          # encoder layers after ``vision_feature_layer`` pass their input through
    use_tower_cut(model, False)   # every layer runs again

LLaVA feeds the projector the hidden state of ``--mm_vision_select_layer`` (-2 by default), yet the stock
``get_image_features`` runs the whole tower and then indexes ``hidden_states``: the last layer (and for a list of
feature layers, every layer past the deepest one) is computed and thrown away -- 1/24 of a CLIP-L tower per image,
more for deeper selections. Here each such layer's ``forward`` is replaced on the instance by one that returns its
input, so the tower's ``hidden_states`` tuple keeps its length and every selected index still points at the same
tensor (the layers' forward hooks -- transformers' output recorder, ZeRO-3's gathers -- still run). Only the
unused ``last_hidden_state`` / pooled output change, which no Llava family model reads.

A layer is skipped only while all its parameters are frozen (checked on every call): a trainable tower
(``--unfreeze_mm_vision_tower``) runs every layer as before, so its optimizer sees the same parameters and
DeepSpeed's gradient hooks fire as before. Module names, weights and ``state_dict`` are untouched, so the saved
checkpoint is the full native model. Held by ``tests/model/test_tower_cut.py`` (features and loss equal the full
tower's exactly; the skipped layers really are not run; a trainable layer runs).
"""

from __future__ import annotations

from functools import partial

from torch import nn

_ATTR = "_llava_tower_cut"


def tower_layers(llava) -> nn.ModuleList | None:
    """The vision tower's encoder layers (CLIP / SigLIP vision models), or None for a tower of another shape."""
    tower = llava.model.vision_tower
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    layers = getattr(encoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def layers_needed(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """How many leading encoder layers the selected hidden states depend on (``hidden_states`` has
    ``num_layers + 1`` entries: the embeddings, then each layer's output)."""
    selected = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    return max(i if i >= 0 else num_layers + 1 + i for i in selected)


def _skip_if_frozen(layer: nn.Module, hidden_states, *args, **kwargs):
    if any(p.requires_grad for p in layer.parameters()):
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    return hidden_states


def use_tower_cut(model, enable: bool = True) -> int:
    """Skip (or stop skipping) the frozen vision-tower layers after the selected feature layer of the (possibly
    PEFT-wrapped) Llava model. Returns how many layers are cut (0 when none can be)."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = tower_layers(llava)
    if layers is None:
        return 0
    for layer in getattr(llava, _ATTR, ()):
        layer.__dict__.pop("forward", None)
    llava.__dict__.pop(_ATTR, None)
    if not enable:
        return 0
    cut = list(layers[layers_needed(llava.config.vision_feature_layer, len(layers)):])
    for layer in cut:
        layer.forward = partial(_skip_if_frozen, layer)
    llava.__dict__[_ATTR] = cut
    return len(cut)
