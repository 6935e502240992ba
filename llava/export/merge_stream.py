"""Merge a LoRA run into a native Llava checkpoint one language-model shard at a time (``llava merge``'s default).

    write_merged_streaming(adapter_dir, out_dir, run_args, dtype=torch.float32, max_shard_size="2GB")

The base LLM's safetensors files are read tensor by tensor; each weight with a LoRA pair becomes
``W + (alpha / r) * B @ A`` (computed in float32), the non-LoRA trainables (projector, new embeddings) replace
their base tensors, and each result is written straight to its offset in an output shard of ``--max_shard_size``
(``llava.safetensors_io.HFShardWriter``, layout planned from the headers first). The vision tower (frozen, small
next to the LLM) is loaded whole. Peak memory: the vision tower + the adapter + the tensor being merged — it does
not grow with the LLM's size.

Used when the run is a plain LoRA run on an LLM directory + vision tower with lora_A/lora_B adapters only
(:func:`can_stream`); QLoRA runs, runs from a Llava checkpoint and adapters with trained biases, DoRA or per-module
ranks go through the in-memory merge in ``merge.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from llava.model.builder import _is_llava_checkpoint, llava_key_of_llm_key, load_vision_tower, make_llava_config
from llava.run_dir import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, NON_LORA_FILE, model_args_from_run
from llava.safetensors_io import HFShardWriter, SafetensorsReader, parse_size

PEFT_PREFIX = "base_model.model."


def _llm_files(llm_dir: Path) -> list[Path]:
    index = llm_dir / "model.safetensors.index.json"
    if index.is_file():
        return [llm_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = llm_dir / "model.safetensors"
    return [single] if single.is_file() else []


def can_stream(adapter_dir: Path, run_args: dict, model_base: str | None) -> str | None:
    """``None`` if the streaming merge applies, else the reason it does not."""

    margs, targs = run_args["model_args"], run_args["training_args"]
    base = model_base or margs["model_name_or_path"]
    if targs.get("bits", 16) != 16:
        return "QLoRA run (dequantize-then-merge)"
    if str(run_args.get("data_args", {}).get("image_aspect_ratio", "")).startswith("anyres"):
        return "anyres run (LlavaNext / LlavaOnevision checkpoint)"
    if _is_llava_checkpoint(base, margs.get("trust_remote_code", False)):
        return "base is a Llava checkpoint"
    if not _llm_files(Path(base)):
        return f"{base} has no safetensors weights"
    config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        return "DoRA or per-module ranks"
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS_FILE), "pt") as f:
        if any(".lora_A." not in k and ".lora_B." not in k for k in f.keys()):
            return "adapter holds trained biases"
    return None


def write_merged_streaming(adapter_dir: str | Path, out_dir: str | Path, run_args: dict, *,
                           dtype: torch.dtype = torch.float32, max_shard_size: str = "2GB",
                           model_base: str | None = None) -> None:
    """Weights (shards + index), config and generation config of the merged model; the caller adds the processor.

    The output layout is planned from the safetensors headers first (names and shapes are known before any
    tensor is read), then every tensor is merged and written straight to its place in its shard."""

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    margs = model_args_from_run(run_args)
    llm_dir = Path(model_base or margs.model_name_or_path)
    lora_config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    r, alpha = lora_config["r"], lora_config["lora_alpha"]
    scale = alpha / (r**0.5) if lora_config.get("use_rslora") else alpha / r
    adapter = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(adapter_dir / ADAPTER_WEIGHTS_FILE).items()}
    pairs = {k.replace(".lora_A.weight", ".weight"): (v, adapter[k.replace(".lora_A.", ".lora_B.")])
             for k, v in adapter.items() if ".lora_A." in k}
    non_lora_path = adapter_dir / NON_LORA_FILE
    replaced = load_file(non_lora_path) if non_lora_path.is_file() else {}
    projector = {k: v for k, v in replaced.items() if k.startswith("model.multi_modal_projector.")}
    if len(projector) != 4:
        raise ValueError(f"{non_lora_path}: expected the 4 projector tensors, found {sorted(projector)}")

    readers = [SafetensorsReader(path) for path in _llm_files(llm_dir)]
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for reader in readers:
        for key in reader.keys():
            name = llava_key_of_llm_key(key)
            layout[name] = (dtype, tuple(replaced[name].shape) if name in replaced else reader.meta(key)[1])
    missing = sorted(set(pairs) - set(layout))
    if missing:
        raise ValueError(f"{adapter_dir}: LoRA weights for {missing[:3]} have no base weight in {llm_dir}")
    tower, _ = load_vision_tower(margs.vision_tower, trust_remote_code=margs.trust_remote_code)
    tower_state = {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    vision_config = tower.config
    del tower
    for name, tensor in [*tower_state.items(), *sorted(projector.items())]:
        layout[name] = (dtype, tuple(tensor.shape))

    writer = HFShardWriter(out_dir, layout, parse_size(max_shard_size))
    for reader in tqdm(readers, desc="merging language-model shards", unit="shard"):
        for key in reader.keys():
            name = llava_key_of_llm_key(key)
            tensor = replaced[name] if name in replaced else reader.get(key)
            if name in pairs:
                a, b = pairs[name]
                tensor = tensor.float() + scale * (b.float() @ a.float())
            writer.write(name, tensor.to(dtype))
    for name, tensor in [*tower_state.items(), *sorted(projector.items())]:
        writer.write(name, tensor.to(dtype))
    writer.close()

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    llm_config = AutoConfig.from_pretrained(llm_dir, trust_remote_code=margs.trust_remote_code)
    config = make_llava_config(llm_config, vision_config, tokenizer, select_feature=margs.mm_vision_select_feature,
                               select_layer=margs.mm_vision_select_layer)
    config.text_config.vocab_size = layout["model.language_model.embed_tokens.weight"][1][0]
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if (llm_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(llm_dir).save_pretrained(out_dir)
