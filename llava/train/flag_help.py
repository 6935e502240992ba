"""``llava train --help`` in a fraction of a second: the LLaVA flags first, grouped, then the inherited trainer flags.

    llava train --help                              # rendered from train_flags.json, no torch import
    python -m llava.train.flag_help --write         # regenerate train_flags.json after changing the flags

The flags are defined by the dataclasses of ``llava/model/model_args.py`` and ``llava/train/args.py``, whose
``TrainingArguments`` subclasses ``transformers.TrainingArguments``: importing it pulls in torch (seconds). So the flag
table read from the real ``HfArgumentParser`` (names, types, defaults, choices, help) is stored in
``train_flags.json`` beside this file, keyed by the transformers version and a hash of the files in ``SOURCES``. When
the key still matches, help is rendered from the table without importing torch; otherwise (an edited args file,
another transformers) the table is read from the live parser, so help is never stale, only slower.
``tests/test_cli.py`` checks the stored table against the live parser and that ``SOURCES`` names every file that
declares a flag. The group a flag is shown in is decided at render time (``GROUPS``, keyed by field name), so moving a
flag between groups needs no regeneration; a LLaVA flag missing from ``GROUPS`` is shown under its dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

SPEC_FILE = Path(__file__).with_name("train_flags.json")
SOURCES = ("train/args.py", "model/model_args.py", "megatron/backend/megatron_args.py")  # files (in llava/) whose dataclasses define the flags: the cache key

# (title, field names) in display order; add a flag to its group here. Empty groups are not shown.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", ("model_name_or_path", "vision_tower", "version", "mm_projector_type", "mm_vision_select_layer",
               "mm_vision_select_feature", "mm_use_im_start_end", "attn_implementation", "trust_remote_code")),
    ("data", ("data_path", "image_folder", "image_aspect_ratio", "image_placement", "eval_data_path", "on_bad_sample",
              "model_max_length", "group_by_modality_length")),
    ("stage and freezing", ("tune_mm_mlp_adapter", "pretrain_mm_mlp_adapter", "freeze_backbone",
                            "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "mm_tunable_parts",
                            "mm_projector_lr", "mm_vision_tower_lr", "mm_vision_tower_lr_decay")),
    ("preference tuning (DPO)", ("training_stage", "beta", "dpo_alpha", "gamma", "loss_type",
                                 "precompute_ref_log_probs")),
    ("LoRA / QLoRA", ("lora_enable", "lora_r", "lora_alpha", "lora_dropout", "lora_bias", "bits", "double_quant",
                      "quant_type")),
    ("high resolution", ("image_grid_pinpoints", "mm_patch_merge_type")),
    ("video", ("video_folder", "frames_upbound", "video_fps", "force_sample", "add_time_instruction",
               "mm_newline_position", "mm_spatial_pool_mode", "mm_spatial_pool_stride")),
    ("packing, speed, memory and start-up", ("packing", "packing_attention", "supervised_head", "skip_padding_mask",
                                             "tiled_mlp_shards", "supervised_head_chunk_rows", "sequence_parallel_size",
                                             "index_cache_dir", "index_workers")),
    ("Megatron", ("backend", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "virtual_pipeline_model_parallel_size", "sequence_parallel", "save_hf")),
    ("accepted from LLaVA scripts (fixed values)", ("mm_use_im_patch_token", "lazy_preprocess", "is_multimodal",
                                                     "lora_weight_path", "cache_dir", "remove_unused_columns")),
)
# LLaVA flags not in GROUPS: shown under their dataclass
CLASS_GROUPS = {"ModelArguments": "model", "DataArguments": "data", "TrainingArguments": "training (LLaVA)",
                "MegatronArguments": "Megatron"}
INHERITED_TITLE = "transformers.TrainingArguments (inherited; the Trainer's own flags)"

USAGE = "llava train [CONFIG.yaml] --model_name_or_path DIR --vision_tower DIR --data_path FILE --output_dir DIR " \
        "[--flag VALUE ...]"
DESCRIPTION = """\
Stage 1 (projector: --tune_mm_mlp_adapter True) or stage 2 (full, LoRA, QLoRA) with the original LLaVA flags, as
`python -m llava.train.train` under DeepSpeed/torchrun. `llava train run.yaml [--flag V]`: the same keys in YAML.
Dashes work too (--model-name-or-path); booleans: --flag, --flag True|False, --no_flag where the default is True."""


def _declared_in(dtype: type, name: str) -> type:
    """The class in ``dtype``'s MRO whose body declares field ``name`` (an override counts as a declaration)."""
    for cls in dtype.__mro__:
        if name in cls.__dict__.get("__annotations__", {}):
            return cls
    return dtype


def _metavar(action: argparse.Action) -> str | None:
    if action.choices is not None or action.nargs == 0:
        return None
    name = getattr(action.type, "__name__", "")
    return {"string_to_bool": "BOOL", "str": "STR", "int": "INT", "float": "FLOAT"}.get(name, "VALUE")


def flag_spec(parser) -> list[dict[str, Any]]:
    """One JSON-able entry per flag of a live ``HfArgumentParser``: what ``--help`` needs, and where it is declared."""
    owners = {}
    for dtype in parser.dataclass_types:
        for f in dataclasses.fields(dtype):
            cls = _declared_in(dtype, f.name)
            owners[f.name] = (f"{cls.__module__}.{cls.__qualname__}", dtype.__name__)
    spec = []
    for action in parser._actions:
        if action.dest not in owners:
            continue  # -h/--help
        declared, dataclass_name = owners[action.dest]
        spec.append({
            "flag": action.option_strings[0], "dest": action.dest, "metavar": _metavar(action),
            "nargs": action.nargs, "choices": None if action.choices is None else [str(c) for c in action.choices],
            "default": str(action.default), "required": action.required, "help": action.help or "",
            "declared_in": declared, "dataclass": dataclass_name,
        })
    return spec


def cache_key() -> dict[str, str]:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((Path(__file__).parents[1] / name).read_bytes())
    return {"transformers": metadata.version("transformers"), "sources_sha256": digest.hexdigest()}


def live_spec() -> list[dict[str, Any]]:
    """The flag table of the real parser (imports transformers and torch)."""
    # the live parser imports transformers: only when the stored table is stale
    from llava.train.args import build_parser

    return flag_spec(build_parser())


def load_spec() -> list[dict[str, Any]]:
    """The stored table when it was written from these sources and this transformers version, else the live one."""
    try:
        stored = json.loads(SPEC_FILE.read_text())
        if stored["key"] == cache_key():
            return stored["flags"]
    except (OSError, ValueError, KeyError):
        pass
    return live_spec()


def group_of(entry: dict[str, Any]) -> str:
    for title, names in GROUPS:
        if entry["dest"] in names:
            return title
    if not entry["declared_in"].startswith("llava."):
        return INHERITED_TITLE
    return CLASS_GROUPS.get(entry["dataclass"], entry["dataclass"].removesuffix("Arguments").lower() or "other")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def format_train_help(spec: list[dict[str, Any]]) -> str:
    """Render the table: LLaVA groups in ``GROUPS`` order, then the other LLaVA groups, then the inherited flags."""
    parser = argparse.ArgumentParser(prog="llava train", usage=USAGE, description=DESCRIPTION,
                                     formatter_class=_Formatter)
    titles = [t for t, _ in GROUPS]
    by_group: dict[str, list[dict[str, Any]]] = {}
    for entry in spec:
        if entry["flag"].startswith("--no_"):
            continue  # the complement of a boolean that defaults to True (see the description)
        by_group.setdefault(group_of(entry), []).append(entry)
    order = sorted(by_group, key=lambda t: (t == INHERITED_TITLE, titles.index(t) if t in titles else len(titles)))
    for title in order:
        group = parser.add_argument_group(title)
        for e in by_group[title]:
            group.add_argument(e["flag"], dest=e["dest"], metavar=e["metavar"], choices=e["choices"],
                               nargs=e["nargs"], default=argparse.SUPPRESS if e["required"] else e["default"],
                               help=f"{e['help']} (required)" if e["required"] else e["help"])
    return parser.format_help()


def train_help() -> str:
    return format_train_help(load_spec())


def write_spec() -> Path:
    SPEC_FILE.write_text(json.dumps({"key": cache_key(), "flags": live_spec()}, indent=1) + "\n")
    return SPEC_FILE


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        print(f"wrote {write_spec()}")
    else:
        print(train_help())
