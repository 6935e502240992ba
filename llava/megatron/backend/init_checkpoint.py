"""The Hugging Face checkpoint the Megatron backend starts from, as the hf backend would build it.

    hf_dir, facts = prepare_init_checkpoint(model_args, training_args)   # every rank; rank 0 does the work

A Llava checkpoint (``--model_name_or_path``) that needs nothing added is used as it is. Otherwise (an LLM plus
``--vision_tower``, a stage-1 projector to load, tokens to add) rank 0 writes, once, to
``OUTPUT_DIR/megatron_init/`` exactly what the hf backend's ``build_llava_model`` would build after
``transformers.set_seed(--seed)`` (same projector initialisation, same mean-resized new embeddings), without
holding the model: the language model's tensors are streamed from its safetensors files one at a time into the
output (``compose_streaming``); only the new or changed parts are made in memory -- the projector, the
(resized) token embeddings and LM head, and the vision tower, which every first-stage rank holds whole anyway.
Every rank then reads only its own shards from that directory (``llava.megatron.backend.rank_weights``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.core_model_loading import revert_weight_conversion
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llava.model.anyres_model import load_processor
from llava.model.builder import (
    _is_llava_checkpoint,
    add_multimodal_tokens,
    build_llava_model,
    llava_key_of_llm_key,
    load_vision_tower,
    make_llava_config,
    make_llava_processor,
    select_strategy,
)
from llava.model.projector import load_projector_state
from llava.safetensors_io import HFShardWriter, SafetensorsReader, parse_size

logger = logging.getLogger("llava.megatron")
INIT_DIR = "megatron_init"
FACTS_FILE = "megatron_init.json"  # where the run started from: [directory, {"added_tokens": n}]
EMBED, LM_HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"
PROJECTOR, TOWER = "model.multi_modal_projector.", "model.vision_tower."


def _usable_as_is(model_args) -> bool:
    if model_args.pretrain_mm_mlp_adapter or not _is_llava_checkpoint(model_args.model_name_or_path,
                                                                       model_args.trust_remote_code):
        return False
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    return add_multimodal_tokens(tokenizer, model_args.mm_use_im_start_end) == 0


def prepare_init_checkpoint(model_args, training_args, reuse: bool = False) -> tuple[Path, dict]:
    """(directory of the initial native Llava checkpoint, {"added_tokens": n}). ``reuse`` (resuming): take the one
    an earlier run wrote into the same output directory."""
    result: list = [None]
    facts_file = Path(training_args.output_dir) / FACTS_FILE
    if torch.distributed.get_rank() == 0:
        if reuse and facts_file.is_file():
            result[0] = tuple(json.loads(facts_file.read_text()))
        elif _usable_as_is(model_args):
            result[0] = (str(model_args.model_name_or_path), {"added_tokens": 0})
        else:
            out = Path(training_args.output_dir) / INIT_DIR
            transformers.set_seed(training_args.seed)  # what the hf backend's train() does before building
            dtype = torch.bfloat16 if training_args.bf16 else torch.float32
            added = compose_streaming(model_args, out, dtype)
            if added is None:  # no safetensors to stream from: build in memory, once
                logger.warning("%s has no safetensors weights: rank 0 builds the starting model in memory",
                               model_args.model_name_or_path)
                built = build_llava_model(model_args, torch_dtype=dtype)
                built.model.save_pretrained(out)
                built.processor.save_pretrained(out)
                added = built.added_tokens
                del built
            result[0] = (str(out), {"added_tokens": added})
        facts_file.parent.mkdir(parents=True, exist_ok=True)
        facts_file.write_text(json.dumps(result[0]))
    torch.distributed.broadcast_object_list(result, src=0)
    path, facts = result[0]
    return Path(path), facts


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(path.glob("*.safetensors"))


def _saved_names(skeleton, names) -> dict[str, str]:
    """Module name -> the name ``save_pretrained`` writes it under (transformers reverts its checkpoint renames)."""

    metas = {name: torch.empty(0, device="meta") for name in names}
    ids = {id(t): name for name, t in metas.items()}
    return {ids[id(t)]: saved for saved, t in revert_weight_conversion(skeleton, metas).items()}


def compose_streaming(model_args, out: Path, dtype: torch.dtype) -> int | None:
    """Write ``build_llava_model(model_args)``'s weights, config, generation config and processor to ``out``
    (see the module docstring); the RNG must be where the hf backend's is (``set_seed``). Returns the number of
    added tokens, or None when the checkpoint has no safetensors files (or names) to stream from."""

    source = Path(model_args.model_name_or_path)
    files = _weight_files(source)
    if not files:
        return None
    rng_at_start = torch.get_rng_state()  # as _compose_llava: the projector is drawn from the seed's state
    readers = [SafetensorsReader(f) for f in files]
    from_llava = _is_llava_checkpoint(str(source), model_args.trust_remote_code)
    tower_state: dict[str, torch.Tensor] = {}
    if from_llava:  # a Llava checkpoint that needs a projector or tokens: tensors keep their names
        processor = load_processor(source, trust_remote_code=model_args.trust_remote_code)
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "right"
        added = add_multimodal_tokens(tokenizer, model_args.mm_use_im_start_end)
        config = LlavaConfig.from_pretrained(source)
    else:  # an LLM + --vision_tower, composed as _compose_llava does
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, padding_side="right",
                                                  trust_remote_code=model_args.trust_remote_code)
        added = add_multimodal_tokens(tokenizer, model_args.mm_use_im_start_end)
        llm_config = AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
        tower, image_processor = load_vision_tower(model_args.vision_tower, torch_dtype=dtype,
                                                   trust_remote_code=model_args.trust_remote_code)
        config = make_llava_config(llm_config, tower.config, tokenizer,
                                   select_feature=model_args.mm_vision_select_feature,
                                   select_layer=model_args.mm_vision_select_layer)
        strategy = select_strategy(tower.config, model_args.mm_vision_select_feature)
        processor = make_llava_processor(image_processor, tokenizer, tower.config, strategy)
        tower_state = {TOWER + k: v for k, v in tower.state_dict().items()}
        del tower
    config.dtype = dtype
    with torch.device("meta"):
        skeleton = LlavaForConditionalGeneration(config)  # holds only the parts made in memory below
    projector_names = [PROJECTOR + k for k in skeleton.model.multi_modal_projector.state_dict()]
    if from_llava:
        saved = _saved_names(skeleton, [EMBED, LM_HEAD, *projector_names])
        sources = {k: (r, k) for r in readers for k in r.keys()}
        if any(saved[n] not in sources for n in [EMBED, *projector_names]):
            return None  # names of another transformers version: build in memory
    else:
        internal = {(r, k): llava_key_of_llm_key(k) for r in readers for k in r.keys()}
        saved = _saved_names(skeleton, [*internal.values(), *tower_state, LM_HEAD, EMBED, *projector_names])
        sources = {saved[name]: rk for rk, name in internal.items()}
        tower_state = {saved[name]: tensor for name, tensor in tower_state.items()}

    def read(name: str) -> torch.Tensor:
        reader, key = sources[saved[name]]
        return reader.get(key).to(dtype)

    tied = bool(config.tie_word_embeddings)
    embed = torch.nn.Parameter(read(EMBED))
    skeleton.model.language_model.embed_tokens.weight = embed
    skeleton.lm_head.weight = embed if tied or saved[LM_HEAD] not in sources else torch.nn.Parameter(read(LM_HEAD))
    if from_llava:
        skeleton.model.multi_modal_projector.load_state_dict(  # as loaded: no random draw
            {n[len(PROJECTOR):]: read(n) for n in projector_names}, assign=True)
        gen = source / "generation_config.json"
        if gen.is_file():
            skeleton.generation_config = GenerationConfig.from_pretrained(source)
    else:
        torch.set_rng_state(rng_at_start)
        skeleton.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
        gen = source / "generation_config.json"
        skeleton.generation_config = (GenerationConfig.from_pretrained(source) if gen.is_file()
                                      else GenerationConfig.from_model_config(llm_config))
    if added:
        skeleton.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if tied:
        skeleton.tie_weights()
    if model_args.pretrain_mm_mlp_adapter:
        load_projector_state(skeleton, model_args.pretrain_mm_mlp_adapter)

    made = {saved[EMBED]: skeleton.get_input_embeddings().weight, **tower_state,
            **{saved[PROJECTOR + k]: v for k, v in skeleton.model.multi_modal_projector.state_dict().items()}}
    if not tied:
        made[saved[LM_HEAD]] = skeleton.lm_head.weight
    streamed = {name: rk for name, rk in sources.items() if name not in made and name != saved[LM_HEAD]}
    layout = {name: (dtype if r.meta(k)[0].is_floating_point else r.meta(k)[0], r.meta(k)[1])
              for name, (r, k) in streamed.items()}
    layout.update({name: (t.dtype, tuple(t.shape)) for name, t in made.items()})
    writer = HFShardWriter(out, layout, parse_size("5GB"))
    for name, (reader, key) in streamed.items():  # one tensor in memory at a time
        tensor = reader.get(key)
        writer.write(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    for name, tensor in made.items():
        writer.write(name, tensor.detach())
    writer.close()
    skeleton.config.architectures = [type(skeleton).__name__]
    skeleton.config.save_pretrained(out)
    skeleton.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    return added
