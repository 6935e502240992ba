"""Merge a LoRA run into a native Llava checkpoint one language-model shard at a time (``llava merge``'s default).

    write_merged_streaming(adapter_dir, out_dir, run_args, dtype=torch.float32, max_shard_size="2GB")

The base LLM's safetensors files are read tensor by tensor; each weight with a LoRA pair becomes
``W + (alpha / r) * B @ A`` (computed in float32), the non-LoRA trainables (projector, new embeddings) replace
their base tensors, and output shards of ``--max_shard_size`` are written as they fill. The vision tower (frozen,
small next to the LLM) is loaded whole. Peak memory: the vision tower + the adapter + one output shard + one
tensor being merged — it does not grow with the LLM's size beyond ``--max_shard_size``.

Used when the run is a plain LoRA run on an LLM directory + vision tower with lora_A/lora_B adapters only
(:func:`can_stream`); QLoRA runs, runs from a Llava checkpoint and adapters with trained biases, DoRA or per-module
ranks go through the in-memory merge in ``merge.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

PEFT_PREFIX = "base_model.model."


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


def _llm_files(llm_dir: Path) -> list[Path]:
    index = llm_dir / "model.safetensors.index.json"
    if index.is_file():
        return [llm_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = llm_dir / "model.safetensors"
    return [single] if single.is_file() else []


def can_stream(adapter_dir: Path, run_args: dict, model_base: str | None) -> str | None:
    """``None`` if the streaming merge applies, else the reason it does not."""
    from llava.model.builder import _is_llava_checkpoint

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
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        return "DoRA or per-module ranks"
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        if any(".lora_A." not in k and ".lora_B." not in k for k in f.keys()):
            return "adapter holds trained biases"
    return None


def _llava_name(llm_key: str) -> str:
    if llm_key.startswith("model."):
        return "model.language_model." + llm_key[len("model."):]
    if llm_key.startswith("lm_head."):
        return llm_key
    raise ValueError(f"unexpected language-model weight {llm_key!r} (expected model.* or lm_head.*)")


class _ShardWriter:
    """Collects tensors into ``model-XXXXX.safetensors`` shards of at most ``max_bytes``; writes the index."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self.flush()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.current:
            return
        name = f"shard-{len(self.files):05d}.tmp.safetensors"
        save_file(self.current, str(self.out_dir / name), metadata={"format": "pt"})
        self.files.append((name, list(self.current)))
        self.current, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.out_dir / self.files[0][0], self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (tmp, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / tmp, self.out_dir / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_merged_streaming(adapter_dir: str | Path, out_dir: str | Path, run_args: dict, *,
                           dtype: torch.dtype = torch.float32, max_shard_size: str = "2GB",
                           model_base: str | None = None) -> None:
    """Weights (shards + index), config and generation config of the merged model; the caller adds the processor."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from llava.model.builder import load_vision_tower, make_llava_config
    from llava.train.args import ModelArguments
    from llava.train.lora import NON_LORA_FILE

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = set(ModelArguments.__dataclass_fields__)
    margs = ModelArguments(**{k: v for k, v in run_args["model_args"].items() if k in fields})
    llm_dir = Path(model_base or margs.model_name_or_path)
    lora_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = lora_config["r"], lora_config["lora_alpha"]
    scale = alpha / (r**0.5) if lora_config.get("use_rslora") else alpha / r
    adapter = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    pairs = {k.replace(".lora_A.weight", ".weight"): (v, adapter[k.replace(".lora_A.", ".lora_B.")])
             for k, v in adapter.items() if ".lora_A." in k}
    non_lora_path = adapter_dir / NON_LORA_FILE
    replaced = load_file(non_lora_path) if non_lora_path.is_file() else {}

    writer = _ShardWriter(out_dir, parse_size(max_shard_size))
    merged_names: set[str] = set()
    vocab = None
    for path in tqdm(_llm_files(llm_dir), desc="merging language-model shards", unit="shard"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                name = _llava_name(key)
                tensor = replaced[name] if name in replaced else f.get_tensor(key)
                if name in pairs:
                    a, b = pairs[name]
                    tensor = tensor.float() + scale * (b.float() @ a.float())
                    merged_names.add(name)
                if name == "model.language_model.embed_tokens.weight":
                    vocab = tensor.shape[0]
                writer.add(name, tensor.to(dtype))
    missing = sorted(set(pairs) - merged_names)
    if missing:
        raise ValueError(f"{adapter_dir}: LoRA weights for {missing[:3]} have no base weight in {llm_dir}")
    tower, _ = load_vision_tower(margs.vision_tower, trust_remote_code=margs.trust_remote_code)
    for key, tensor in tower.state_dict().items():
        writer.add(f"model.vision_tower.{key}", tensor.to(dtype))
    vision_config = tower.config
    del tower
    projector = {k: v for k, v in replaced.items() if k.startswith("model.multi_modal_projector.")}
    if len(projector) != 4:
        raise ValueError(f"{non_lora_path}: expected the 4 projector tensors, found {sorted(projector)}")
    for name, tensor in sorted(projector.items()):
        writer.add(name, tensor.to(dtype))
    writer.close()

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    llm_config = AutoConfig.from_pretrained(llm_dir, trust_remote_code=margs.trust_remote_code)
    config = make_llava_config(llm_config, vision_config, tokenizer, margs)
    config.text_config.vocab_size = vocab
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if (llm_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(llm_dir).save_pretrained(out_dir)
