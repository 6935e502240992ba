"""Streaming converters: HF checkpoint -> MCA shards (``hf_to_mcore``), back (``mcore_to_hf``), and reshard.

Every conversion runs twice over the same generator of tensor groups: first on ``meta`` tensors built from the
safetensors headers (this plans every output file's exact layout at no memory cost), then on real tensors read
one group at a time (one op's inputs: e.g. q, k, v of one layer) and written straight to their offsets. Peak
memory is one group's inputs, its fused tensor and its shards, never the model (measure with
``python -m llava.megatron.converter.convert_cli hf2mcore ... --report-memory``).

On-disk MCA layout (OUT/)::

    mca_config.json                     {"format", "template", "variant", "mca_config", "parallel", "hf"}
    hf_files/                           verbatim copies of the HF source's non-weight files (config.json,
                                        tokenizer, generation config...), so export reproduces them exactly
    mp_rank_{tp:02d}_{pp:03d}/model_chunk_{vp}.safetensors
                                        local Megatron-Core GPTModel (local spec) keys of TP rank tp, PP stage pp,
                                        virtual chunk vp (0 without VPP); layers numbered from 0 in each chunk

``parallel`` holds tp, pp, vpp, vocab_divisor and padded_vocab_size. The HF side is written by
``llava.safetensors_io.HFShardWriter``. Tested in ``tests/megatron/converter/test_megatron_roundtrip.py``,
``tests/megatron/converter/test_megatron_layout.py`` and ``tests/megatron/converter/test_megatron_errors.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from llava.megatron.converter.conversion_templates import Claim, Template, TemplateError, get_conversion_template
from llava.megatron.converter.mcore_config import hf_to_mca_config, mca_to_hf_config
from llava.megatron.converter.parallel_layout import (
    EMBEDDING,
    OUTPUT,
    VOCAB_KEYS,
    ParallelLayout,
    merge_tp,
    pad_vocab,
    padded_vocab_size,
    split_tp,
)
from llava.safetensors_io import HFShardWriter, SafetensorsReader, SafetensorsWriter

FORMAT = "llava-mcore/1"
Group = list[tuple[str, torch.Tensor]]  # (name, tensor) pairs produced together
Loader = Callable[[SafetensorsReader, str], torch.Tensor]


def _real(reader: SafetensorsReader, key: str) -> torch.Tensor:
    return reader.get(key)


def _meta(reader: SafetensorsReader, key: str) -> torch.Tensor:
    dtype, shape = reader.meta(key)
    return torch.empty(shape, dtype=dtype, device="meta")


def rank_dir(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def chunk_file(tp_rank: int, pp_rank: int, vp: int) -> str:
    return f"{rank_dir(tp_rank, pp_rank)}/model_chunk_{vp}.safetensors"


def _group_claims(template: Template, keys: list[str], side: str) -> list[tuple[Claim, list[str]]]:
    """Claims in a stable order (top-level first, then by layer), each checked complete."""
    claims: dict[tuple, Claim] = {}
    for key in keys:
        claim = template.claim_hf(key) if side == "hf" else template.claim_mca(key)
        claims.setdefault((id(claim.op), claim.layer, claim.capture), claim)
    present = set(keys)
    ordered = sorted(claims.values(), key=lambda c: -1 if c.layer is None else c.layer)
    out = []
    for claim in ordered:
        names = template.hf_keys(claim) if side == "hf" else template.mca_keys(claim)
        missing = [n for n in names if n not in present]
        if missing:
            raise TemplateError(f"{claim.op} needs {missing}, missing from the checkpoint (has {names[0]!r}...)")
        out.append((claim, names))
    return out


# ---- HF side -----------------------------------------------------------------------------------------------


class HFCheckpoint:
    """An HF checkpoint directory: config dict, tensor name -> reader (single file or index), other files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{self.path}: no config.json (expected a Hugging Face checkpoint directory)")
        self.config = json.loads(config_file.read_text())
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors weights (convert .bin checkpoints first)")
        self.readers = {name: SafetensorsReader(self.path / name) for name in files}
        self.where = {k: r for r in self.readers.values() for k in r.keys()}
        self.weight_files = set(files) | {"model.safetensors.index.json"}


def _hf_template(config: dict, keys, variant: str | None = None) -> Template:
    if "model_type" not in config:
        raise TemplateError("config.json has no model_type; cannot pick a conversion template")
    return get_conversion_template(config["model_type"]).resolve(config, keys, variant)


def _hf_groups(ckpt: HFCheckpoint, template: Template, mca: dict, load: Loader) -> Iterator[Group]:
    """Full (unsharded, unpadded) MCA tensors, one op's worth at a time."""
    for claim, names in _group_claims(template, sorted(ckpt.where), "hf"):
        tensors = [load(ckpt.where[n], n) for n in names]
        mca_names = template.mca_keys(claim)
        outputs = claim.op.hf_to_mca(tensors, mca)
        yield [
            (k, t)
            for k, t in zip(mca_names, outputs)
            if not (k == OUTPUT and mca["share_embeddings_and_output_weights"])
        ]


# ---- MCA side ----------------------------------------------------------------------------------------------


class MCACheckpoint:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / "mca_config.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path}: no mca_config.json (not written by llava.megatron hf2mcore)")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.mca = self.meta["mca_config"]
        par = self.meta["parallel"]
        self.layout = ParallelLayout(
            par["tp"], par["pp"], par["vpp"], self.mca["num_layers"], self.mca["share_embeddings_and_output_weights"]
        )
        self.hf_config = json.loads((self.path / "hf_files" / "config.json").read_text())
        self.template = _hf_template(self.hf_config, (), self.meta.get("variant"))
        # global key -> [(reader, local key)] in TP-rank order
        self.shards: dict[str, list[tuple[SafetensorsReader, str]]] = defaultdict(list)
        for tp_rank in range(self.layout.tp):
            for pp_rank in range(self.layout.pp):
                for vp in range(self.layout.num_vp):
                    reader = SafetensorsReader(self.path / chunk_file(tp_rank, pp_rank, vp))
                    for local in reader.keys():
                        key = self.layout.global_key(pp_rank, vp, local)
                        if key is not None:
                            self.shards[key].append((reader, local))

    def full_tensor(self, key: str, load: Loader) -> torch.Tensor:
        """The merged, vocab-truncated tensor of a global MCA key."""
        tensor = merge_tp(key, [load(r, local) for r, local in self.shards[key]])
        if key in VOCAB_KEYS:
            tensor = tensor[: self.mca["vocab_size"]]
        return tensor


def _mca_groups(ckpt: MCACheckpoint, load: Loader) -> Iterator[Group]:
    for key in sorted(ckpt.shards):
        yield [(key, ckpt.full_tensor(key, load))]


# ---- writers -------------------------------------------------------------------------------------------------


def _plan_and_write(groups: Callable[[Loader], Iterator[list[tuple[str, str, torch.Tensor]]]], out: Path) -> None:
    """Run ``groups`` on meta tensors to plan every file, then on real tensors to fill them."""
    plan: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = defaultdict(dict)
    for group in groups(_meta):
        for file, name, tensor in group:
            plan[file][name] = (tensor.dtype, tuple(tensor.shape))
    writers = {}
    for file, layout in plan.items():
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        writers[file] = SafetensorsWriter(out / file, layout)
    for group in groups(_real):
        for file, name, tensor in group:
            writers[file].write(name, tensor)
    for w in writers.values():
        if w.missing():
            raise RuntimeError(f"{w.path}: tensors planned but never written: {w.missing()}")


def _write_mca(
    out: Path, source: Callable[[Loader], Iterator[Group]], layout: ParallelLayout, padded: int, groups: int
) -> None:
    def sharded(load: Loader) -> Iterator[list[tuple[str, str, torch.Tensor]]]:
        for group in source(load):
            items = []
            for key, tensor in group:
                if key in VOCAB_KEYS:
                    tensor = pad_vocab(tensor, padded)
                shards = split_tp(key, tensor, layout.tp, groups)
                for pp_rank, vp, local in layout.placements(key):
                    for tp_rank, shard in enumerate(shards):
                        items.append((chunk_file(tp_rank, pp_rank, vp), local, shard))
            yield items

    _plan_and_write(sharded, out)
    for tp_rank in range(layout.tp):  # every rank file exists, even an empty one (e.g. a passthrough-only split)
        for pp_rank in range(layout.pp):
            for vp in range(layout.num_vp):
                if not (out / chunk_file(tp_rank, pp_rank, vp)).exists():
                    (out / rank_dir(tp_rank, pp_rank)).mkdir(parents=True, exist_ok=True)
                    SafetensorsWriter(out / chunk_file(tp_rank, pp_rank, vp), {})


def _write_meta(out: Path, template: Template, mca: dict, layout: ParallelLayout, divisor: int, hf: dict) -> None:
    meta = {
        "format": FORMAT,
        "template": template.hf_model_type,
        "variant": template.variant,
        "mca_config": mca,
        "parallel": {
            "tp": layout.tp,
            "pp": layout.pp,
            "vpp": layout.vpp,
            "vocab_divisor": divisor,
            "padded_vocab_size": padded_vocab_size(mca["vocab_size"], layout.tp, divisor),
        },
        "hf": hf,
    }
    (out / "mca_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _prepare_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output directory exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    return out


def hf_to_mcore(
    src: str | os.PathLike,
    out: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    vocab_divisor: int = 128,
) -> dict:
    """Convert an HF checkpoint directory to MCA shards; returns the written mca_config.json as a dict."""
    ckpt = HFCheckpoint(src)
    template = _hf_template(ckpt.config, ckpt.where)
    mca = hf_to_mca_config(ckpt.config, template)
    layout = ParallelLayout(tp, pp, vpp, mca["num_layers"], mca["share_embeddings_and_output_weights"])
    padded = padded_vocab_size(mca["vocab_size"], tp, vocab_divisor)
    lm_head_keys = template.hf_keys(template.claim_mca(OUTPUT))
    out = _prepare_out(out)
    _write_mca(out, lambda load: _hf_groups(ckpt, template, mca, load), layout, padded, mca["num_query_groups"])
    (out / "hf_files").mkdir()
    for item in sorted(ckpt.path.iterdir()):
        if item.is_file() and item.name not in ckpt.weight_files:
            shutil.copy2(item, out / "hf_files" / item.name)
    hf = {"tied_lm_head_saved": mca["share_embeddings_and_output_weights"] and lm_head_keys[0] in ckpt.where}
    _write_meta(out, template, mca, layout, vocab_divisor, hf)
    return json.loads((out / "mca_config.json").read_text())


def mcore_to_mcore(
    src: str | os.PathLike,
    out: str | os.PathLike,
    tp: int,
    pp: int,
    vpp: int | None = None,
    vocab_divisor: int | None = None,
) -> dict:
    """Reshard an MCA checkpoint to another TP/PP/VPP."""
    ckpt = MCACheckpoint(src)
    divisor = vocab_divisor or ckpt.meta["parallel"]["vocab_divisor"]
    layout = ParallelLayout(tp, pp, vpp, ckpt.mca["num_layers"], ckpt.layout.tied)
    out = _prepare_out(out)
    padded = padded_vocab_size(ckpt.mca["vocab_size"], tp, divisor)
    _write_mca(out, lambda load: _mca_groups(ckpt, load), layout, padded, ckpt.mca["num_query_groups"])
    shutil.copytree(ckpt.path / "hf_files", out / "hf_files")
    _write_meta(out, ckpt.template, ckpt.mca, layout, divisor, ckpt.meta["hf"])
    return json.loads((out / "mca_config.json").read_text())


def mcore_to_hf(src: str | os.PathLike, out: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Convert MCA shards back to an HF checkpoint directory (safetensors, sharded above ``max_shard_bytes``)."""
    ckpt = MCACheckpoint(src)
    template, mca = ckpt.template, ckpt.mca
    tied_copy = template.hf_keys(template.claim_mca(OUTPUT))[0] if ckpt.meta["hf"].get("tied_lm_head_saved") else None

    def hf_groups(load: Loader) -> Iterator[Group]:
        for claim, names in _group_claims(template, sorted(ckpt.shards), "mca"):
            tensors = claim.op.mca_to_hf([ckpt.full_tensor(n, load) for n in names], mca)
            group = list(zip(template.hf_keys(claim), tensors))
            if tied_copy and EMBEDDING in names:
                group.append((tied_copy, tensors[0]))
            yield group

    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for group in hf_groups(_meta):  # plan every file from meta tensors, then fill them with real ones
        for name, t in group:
            layout[name] = (t.dtype, tuple(t.shape))
    out = _prepare_out(out)
    writer = HFShardWriter(out, layout, max_shard_bytes)
    for group in hf_groups(_real):
        for name, t in group:
            writer.write(name, t)
    writer.close()
    for item in sorted((ckpt.path / "hf_files").iterdir()):
        if item.name != "config.json":
            shutil.copy2(item, out / item.name)
    config = mca_to_hf_config(mca, template, ckpt.hf_config)
    if config == ckpt.hf_config:  # unchanged: the original bytes
        shutil.copy2(ckpt.path / "hf_files" / "config.json", out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
