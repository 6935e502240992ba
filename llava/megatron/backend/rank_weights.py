"""Weights of one rank in and out through the registered conversion templates, never the whole model on a rank.

    states = read_rank_state(hf_dir, layout, tp_rank, pp_rank, padded_vocab)   # {vp: {MCA local key: tensor}}
    write_rank_shards(out, chunks, layout, tp_rank, pp_rank)                   # this rank's MCA shard files
    write_mca_meta(out, hf_dir, mca, layout, divisor); mcore_to_hf(out, hf_out) # rank 0, streaming

Reading: the HF checkpoint's keys are claimed by the template's ops (``llava.megatron.converter.conversion_templates``); only the ops
whose outputs live on this pipeline stage are read (one op's inputs at a time, e.g. one layer's q, k, v), fused,
padded (vocabulary) and split for tensor parallelism exactly as ``llava convert hf2mcore`` does, and only this
rank's shard is kept. The vision tower and projector are template passthroughs: read on the first stage only,
whole on every tensor-parallel rank.

Writing: each rank writes its own ``mp_rank_{tp:02d}_{pp:03d}/model_chunk_{vp}.safetensors`` (the layout of
``llava.megatron.converter.mcore_convert``), rank 0 the metadata; ``mcore_to_hf`` then streams them into a native HF checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from llava.megatron.converter.mcore_config import hf_to_mca_config
from llava.megatron.converter.mcore_convert import (
    FORMAT,
    HFCheckpoint,
    _group_claims,
    _hf_template,
    chunk_file,
    rank_dir,
)
from llava.megatron.converter.parallel_layout import OUTPUT, VOCAB_KEYS, ParallelLayout, pad_vocab, split_tp


def hf_mca_config(hf_dir: str | Path) -> tuple[dict, dict, str | None]:
    """(HF config dict, MCA config dict, template variant) of an HF checkpoint directory."""
    ckpt = HFCheckpoint(hf_dir)
    template = _hf_template(ckpt.config, ckpt.where)
    return ckpt.config, hf_to_mca_config(ckpt.config, template), template.variant


def read_rank_state(hf_dir: str | Path, layout: ParallelLayout, tp_rank: int, pp_rank: int,
                    padded_vocab: int) -> dict[int, dict[str, torch.Tensor]]:
    """This rank's MCA tensors (local keys, per virtual chunk), read op by op from the HF checkpoint."""
    ckpt = HFCheckpoint(hf_dir)
    template = _hf_template(ckpt.config, ckpt.where)
    mca = hf_to_mca_config(ckpt.config, template)
    tied = mca["share_embeddings_and_output_weights"]
    states: dict[int, dict[str, torch.Tensor]] = {vp: {} for vp in range(layout.num_vp)}
    for claim, names in _group_claims(template, sorted(ckpt.where), "hf"):
        mca_names = [k for k in template.mca_keys(claim) if not (k == OUTPUT and tied)]
        if not any(p == pp_rank for k in mca_names for p, _, _ in layout.placements(k)):
            continue
        outputs = dict(zip(template.mca_keys(claim), claim.op.hf_to_mca([ckpt.where[n].get(n) for n in names], mca)))
        for key in mca_names:
            tensor = pad_vocab(outputs[key], padded_vocab) if key in VOCAB_KEYS else outputs[key]
            shards = split_tp(key, tensor, layout.tp, mca["num_query_groups"])
            mine = shards[tp_rank] if len(shards) > 1 else shards[0]
            for p, vp, local in layout.placements(key):
                if p == pp_rank:
                    states[vp][local] = mine.clone()
    return states


def write_rank_shards(out: str | Path, chunks: list[torch.nn.Module], layout: ParallelLayout, tp_rank: int,
                      pp_rank: int, write: bool = True) -> None:
    """Save this rank's model chunks as ``mp_rank_XX_YYY/model_chunk_V.safetensors`` (MCA local keys).

    Only data-parallel rank 0 of each (tp, pp) pair writes (``write``); tensors replicated over TP (vision tower,
    projector) are written by TP rank 0 only, as the converter lays them out."""
    if not write:
        return
    (Path(out) / rank_dir(tp_rank, pp_rank)).mkdir(parents=True, exist_ok=True)
    for vp, chunk in enumerate(chunks):
        state = {}
        for key, tensor in chunk.state_dict().items():
            if key.endswith("_extra_state") or tensor is None:
                continue
            if tp_rank > 0 and key.startswith(("vision_model.", "multi_modal_projector.")):
                continue
            state[key] = tensor.detach().to("cpu").contiguous().clone()
        save_file(state, Path(out) / chunk_file(tp_rank, pp_rank, vp), metadata={"format": "pt"})


def write_mca_meta(out: str | Path, hf_dir: str | Path, layout: ParallelLayout, padded_vocab: int,
                   vocab_divisor: int) -> None:
    """``mca_config.json`` + ``hf_files/`` beside the rank shards (rank 0), so ``mcore_to_hf`` can read them."""
    out, hf_dir = Path(out), Path(hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    template = _hf_template(ckpt.config, ckpt.where)
    mca = hf_to_mca_config(ckpt.config, template)
    lm_head = template.hf_keys(template.claim_mca(OUTPUT))[0]
    (out / "hf_files").mkdir(parents=True, exist_ok=True)
    for item in sorted(hf_dir.iterdir()):
        if item.is_file() and item.name not in ckpt.weight_files:
            shutil.copy2(item, out / "hf_files" / item.name)
    meta = {
        "format": FORMAT,
        "template": template.hf_model_type,
        "variant": template.variant,
        "mca_config": mca,
        "parallel": {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "vocab_divisor": vocab_divisor,
                     "padded_vocab_size": padded_vocab},
        "hf": {"tied_lm_head_saved": mca["share_embeddings_and_output_weights"] and lm_head in ckpt.where},
    }
    (out / "mca_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_rank_state(chunks: list[torch.nn.Module], states: dict[int, dict[str, torch.Tensor]]) -> None:
    """Copy ``states`` into the chunks; every parameter must be covered and nothing left over."""
    for vp, chunk in enumerate(chunks):
        result = chunk.load_state_dict(states[vp], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"model chunk {vp}: weights missing from the checkpoint {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
