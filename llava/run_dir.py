"""The run directory: what every output of ``llava train``, ``llava merge`` and ``llava import-llava`` contains.

    write_run_args(out, run_args, {"run_kind": RunKind.LORA})     # llava_args.json, written atomically
    run = read_run_args("out/lora")                                # -> dict (model_args, data_args, training_args...)
    run_kind("out/lora")                                           # -> RunKind.LORA (checks the kind's files exist)
    model_args = model_args_from_run(run, model_name_or_path=...)  # ModelArguments rebuilt as training parsed them

One directory per output; ``llava_args.json`` (the resolved arguments, plus facts such as the run kind) is beside
the weights in every kind, so a later step needs only the directory, never a folder name:

=========  ===================================================================================================
kind       files besides ``llava_args.json``
=========  ===================================================================================================
stage1     ``mm_projector.safetensors`` (projector, + ``embed_tokens.weight`` when stage 1 trained new tokens)
full       a native ``LlavaForConditionalGeneration`` checkpoint (``config.json``, ``model*.safetensors``) +
           processor
lora       peft's ``adapter_config.json`` + ``adapter_model.safetensors``, ``non_lora_trainables.safetensors``
           (projector, new embeddings; plain Llava names) + processor; ``llava merge`` turns it into ``merged``
qlora      as lora, with ``training_args.bits`` 4 or 8 (merged into the dequantized base)
merged     a native checkpoint + processor; ``merged_from`` names the lora run
imported   a native checkpoint + processor converted from an original LLaVA checkpoint; ``imported_from``
=========  ===================================================================================================

Training runs also hold ``bad_samples.json`` (what ``--on_bad_sample skip`` left out) and ``checkpoint-N/``
directories of the same kind (plus optimizer/scheduler/RNG state), staged as ``checkpoint-N.tmp`` and renamed.
Sharded safetensors checkpoints are written by :class:`llava.safetensors_io.HFShardWriter` (merge, Megatron export).
This module imports no heavy library at import time; ``model_args_from_run`` imports ``llava.model.model_args``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import Any

from llava.errors import UsagePathError
from llava.model.model_args import ModelArguments

ARGS_FILE = "llava_args.json"
PROJECTOR_FILE = "mm_projector.safetensors"
NON_LORA_FILE = "non_lora_trainables.safetensors"
BAD_SAMPLES_FILE = "bad_samples.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "config.json"


class RunKind(str, enum.Enum):
    STAGE1 = "stage1"
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"
    MERGED = "merged"
    IMPORTED = "imported"


# the files (besides llava_args.json) each kind must hold
REQUIRED_FILES = {
    RunKind.STAGE1: (PROJECTOR_FILE,),
    RunKind.FULL: (CONFIG_FILE,),
    RunKind.LORA: (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE),
    RunKind.QLORA: (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE),
    RunKind.MERGED: (CONFIG_FILE,),
    RunKind.IMPORTED: (CONFIG_FILE,),
}


def training_run_kind(*, projector_only: bool, lora_enable: bool, bits: int = 16) -> RunKind:
    """The kind of what ``llava train`` writes, from its flags."""
    if projector_only:
        return RunKind.STAGE1
    if lora_enable:
        return RunKind.QLORA if bits != 16 else RunKind.LORA
    return RunKind.FULL


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename into it) to disk, so a completed checkpoint survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through ``path.tmp`` + ``os.replace``: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def resolved_args_dict(model_args, data_args, training_args) -> dict[str, Any]:
    """The run's three argument dataclasses as ``llava_args.json`` records them (``write_run_args``)."""
    return {
        "model_args": dataclasses.asdict(model_args),
        "data_args": dataclasses.asdict(data_args),
        "training_args": json.loads(training_args.to_json_string()),
    }


def write_run_args(output_dir: str | os.PathLike, args: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write the run's resolved arguments (and facts such as the kind) to ``output_dir/llava_args.json``."""
    payload = {**args, **(extra or {})}
    return atomic_write_text(Path(output_dir) / ARGS_FILE, json.dumps(payload, indent=2, default=str))


def read_run_args(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / ARGS_FILE
    if not path.is_file():
        raise UsagePathError(f"{directory} has no {ARGS_FILE}: give a directory written by `llava train`, `llava merge` "
                             f"or `llava import-llava`")
    return json.loads(path.read_text())


def run_kind(directory: str | os.PathLike) -> RunKind:
    """The kind of a run directory (recorded in ``llava_args.json``, else inferred from what it records), after
    checking that the kind's files are there."""
    directory = Path(directory)
    run = read_run_args(directory)
    if "run_kind" in run:
        kind = RunKind(run["run_kind"])
    elif "imported_from" in run:
        kind = RunKind.IMPORTED
    elif "merged_from" in run:
        kind = RunKind.MERGED
    else:
        targs = run.get("training_args", {})
        kind = training_run_kind(projector_only=bool(run.get("projector_only")),
                                 lora_enable=bool(targs.get("lora_enable")), bits=int(targs.get("bits", 16)))
    missing = [name for name in REQUIRED_FILES[kind] if not (directory / name).is_file()]
    if missing:
        raise UsagePathError(f"{directory}: a {kind.value} run directory, but {missing} are missing (an interrupted "
                             f"save? use a complete checkpoint-N directory of the run)")
    return kind


def model_args_from_run(run: dict[str, Any], **overrides: Any):
    """``ModelArguments`` as the run parsed them (keys written by other versions are ignored), with overrides."""

    fields = {f.name for f in dataclasses.fields(ModelArguments)}
    values = {k: v for k, v in run["model_args"].items() if k in fields}
    values.update(overrides)
    return ModelArguments(**values)


def read_lora_run(directory: str | os.PathLike) -> dict[str, Any]:
    """The run's ``llava_args.json``, after checking the directory holds an adapter."""
    directory = Path(directory)
    run = read_run_args(directory)
    if not (directory / ADAPTER_CONFIG_FILE).is_file():
        raise UsagePathError(f"{directory} has no {ADAPTER_CONFIG_FILE}: give the output of a `llava train "
                             f"--lora_enable True` run")
    return run


def load_non_lora_trainables(model, path: str | os.PathLike) -> list[str]:
    """Copy ``non_lora_trainables.safetensors`` into a plain Llava model (strict on the file's keys)."""
    # `llava --help` imports this module (demo's parser): torch only when weights load
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{path}: keys {unknown[:5]} are not parameters of this Llava model")
    with torch.no_grad():
        for key, value in state.items():
            if params[key].shape != value.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model {tuple(params[key].shape)}")
            params[key].copy_(value.to(params[key].dtype))
    return sorted(state)
