"""Where each part of a composed Llava model comes from: one plan per model kind, read by every writer of one.

    plan = plan_for("llava")                                  # or "llava_next", "llava_onevision"
    plan.llava_key("llm", "model.layers.0.mlp.up_proj.weight")  # -> "model.language_model.layers.0.mlp.up_proj.weight"
    plan.attach_loaded_parts(model, llm=llm, tower=tower)     # the in-memory builder: modules moved in
    plan.draw_new_parts(model, config, dtype)                 # the parts made from the seed, in the plan's order

A model composed from an LLM directory and a vision tower is made of *parts*: a part is one module of the Llava
model, filled from the LLM checkpoint (``model.*`` -> ``model.language_model.*``, ``lm_head.*``), from the vision
tower (``model.vision_tower.*``), or drawn new from the random state at the start of the composition (the projector,
then, for LlavaNext / LlavaOnevision, ``image_newline``, in that order, as LLaVA-NeXT's ``initialize_vision_modules``
draws them). ``llava/model/builder.py`` moves the loaded modules in and draws the new parts; the streaming writers
that never hold the model -- the Megatron backend's starting checkpoint
(``llava/megatron/backend/init_checkpoint.py``) and the streamed LoRA merge (``llava/export/merge_stream.py``) -- map
each source tensor to its Llava name and draw the new parts through the same plan, so the three agree by
construction. ``tests/model/test_tensor_plan.py`` holds the plan to what the builder builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava.model.anyres_model import new_image_newline

LLM, TOWER, NEW = "llm", "tower", "new"


@dataclass(frozen=True)
class Part:
    """One module of the composed model: ``name`` in the Llava model, filled from ``source`` (``llm``, ``tower`` or
    ``new``), whose tensors sit under ``source_prefix`` in that source's state dict."""

    name: str
    source: str
    source_prefix: str = ""


@dataclass(frozen=True)
class TensorPlan:
    """The parts of one model kind, new parts in the order they are drawn from the random state."""

    model_type: str
    parts: tuple[Part, ...]

    def llava_key(self, source: str, key: str) -> str:
        """Where tensor ``key`` of the ``llm`` checkpoint or the ``tower``'s state dict lives in the composed model."""
        for part in self.parts:
            if part.source == source and key.startswith(part.source_prefix):
                return f"{part.name}.{key[len(part.source_prefix):]}"
        expected = " or ".join(f"{p.source_prefix}*" for p in self.parts if p.source == source) or "nothing"
        raise ValueError(f"unexpected {source} weight {key!r} (expected {expected})")

    def attach_loaded_parts(self, model: torch.nn.Module, *, llm: torch.nn.Module, tower: torch.nn.Module) -> None:
        """Move the loaded LLM's and tower's modules into ``model`` (a skeleton on the meta device)."""
        sources = {LLM: llm, TOWER: tower}
        for part in self.parts:
            if part.source != NEW:
                module = sources[part.source]
                model.set_submodule(part.name, module.get_submodule(part.source_prefix.rstrip(".")))

    def draw_new_parts(self, model: torch.nn.Module, config, dtype: torch.dtype) -> None:
        """Make the new parts, in the plan's order, from the current random state (the caller restores the state it
        had at the start of the composition, so the result depends on the seed, not on how the parts loaded)."""
        for part in self.parts:
            if part.source != NEW:
                continue
            if part.name == "model.multi_modal_projector":
                model.set_submodule(part.name, type(model.get_submodule(part.name))(config).to(dtype))
            elif part.name == "model.image_newline":
                model.get_submodule("model").image_newline = new_image_newline(config.text_config.hidden_size, dtype)
            else:
                raise ValueError(f"{self.model_type}: no recipe for the new part {part.name}")


LOADED_PARTS = (
    Part("model.vision_tower", TOWER, ""),
    Part("model.language_model", LLM, "model."),
    Part("lm_head", LLM, "lm_head."),
)
PLANS = {
    "llava": TensorPlan("llava", (*LOADED_PARTS, Part("model.multi_modal_projector", NEW))),
    **{model_type: TensorPlan(model_type, (*LOADED_PARTS, Part("model.multi_modal_projector", NEW),
                                           Part("model.image_newline", NEW)))
       for model_type in ("llava_next", "llava_onevision", "llava_next_video")},
}


def plan_for(model_type: str) -> TensorPlan:
    """The plan of a Llava ``config.model_type``."""
    if model_type not in PLANS:
        raise ValueError(f"no tensor plan for model type {model_type!r} (known: {sorted(PLANS)})")
    return PLANS[model_type]
