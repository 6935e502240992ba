"""Test support: run megatron-core's own GPTModel (local layer spec) on CPU with gloo, loading our MCA shards.

The CPU shims live here, never in the converter:
- ``torch.cuda.current_device`` returns the CPU device (rotary embeddings and TP buffers ask for it);
- ``Tensor.cuda`` is the identity (tied embeddings are moved with ``.cuda()`` before their PP all-reduce);
- the RNG tracker is created with ``tensor_parallel.random.initialize_rng_tracker`` (no
  ``model_parallel_cuda_manual_seed``) and its ``fork`` is a no-op (dropout is off in eval);
- the causal mask is passed explicitly;
- PP stages are driven by hand: stage s runs its layers, ``send``s the hidden states to stage s+1, which
  ``recv``s them and calls ``set_input_tensor`` (the pipeline schedules hard-code CUDA).

``run_gpt_logits(jobs, input_ids)`` spawns one group of processes (megatron-core takes ~5 s to import, so
it is imported once) and returns, for each job (tp, pp, MCA checkpoint dirs) and directory, the full-vocab
logits [batch, seq, padded_vocab] computed by megatron-core.
Used by ``test_megatron_parity.py``; needs megatron-core (``pip install .[megatron]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_gpt(ckpt_dir: Path, tp: int, pp: int):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from safetensors.torch import load_file

    from llava.megatron.backend.megatron_model import transformer_config

    meta = json.loads((ckpt_dir / "mca_config.json").read_text())
    mca, par = meta["mca_config"], meta["parallel"]
    assert (par["tp"], par["pp"]) == (tp, pp), f"{ckpt_dir} was written for tp={par['tp']} pp={par['pp']}"
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = GPTModel(
        transformer_config(mca, tp=tp, pp=pp, vpp=None, sequence_parallel=False),
        get_gpt_layer_local_spec(qk_layernorm=mca["qk_layernorm"], normalization=mca["normalization"]),
        vocab_size=par["padded_vocab_size"],
        max_sequence_length=mca["max_sequence_length"],
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        parallel_output=False,  # gather the vocab shards: full logits on every TP rank
        share_embeddings_and_output_weights=mca["share_embeddings_and_output_weights"],
        position_embedding_type=mca["position_embedding_type"],
        rotary_base=mca["rotary_base"],
        rope_scaling=mca.get("rope_scaling", False),
        rope_scaling_factor=mca.get("rope_scaling_factor", 8.0),
        seq_len_interpolation_factor=mca.get("seq_len_interpolation_factor"),
    )
    state = load_file(ckpt_dir / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}" / "model_chunk_0.safetensors")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    return model.eval()


def _worker(rank: int, world: int, port: int, jobs: list[tuple[int, int, list[str]]], ids_path: str, out_dir: str):
    torch.cuda.current_device = lambda: torch.device("cpu")  # shim: rotary embeddings / TP buffers ask for it
    torch.Tensor.cuda = lambda self, *a, **k: self  # shim: tied embeddings are all-reduced after a .cuda() (PP > 1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state, tensor_parallel

    input_ids = torch.load(ids_path)
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq).expand(batch, seq)
    causal_mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)  # True = masked
    for j, (tp, pp, ckpt_dirs) in enumerate(jobs):  # world > tp*pp: the extra ranks are data-parallel replicas
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        tensor_parallel.random.initialize_rng_tracker(force_reset=True)
        tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()  # dropout is off
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        writer = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
        for i, ckpt_dir in enumerate(ckpt_dirs):
            model = _load_gpt(Path(ckpt_dir), tp, pp)
            with torch.no_grad():
                if pp_rank > 0:
                    hidden = torch.empty(seq, batch, model.config.hidden_size)
                    torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                    model.set_input_tensor(hidden)
                output = model(input_ids, position_ids, causal_mask)
                if pp_rank < pp - 1:
                    next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
                    torch.distributed.send(output.contiguous(), dst=next_rank)
                elif writer:
                    torch.save(output, Path(out_dir) / f"logits_{j}_{i}.pt")
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def run_gpt_logits(
    jobs: list[tuple[int, int, list[str | os.PathLike]]], input_ids: torch.Tensor, world: int | None = None
) -> list[list[torch.Tensor]]:
    """megatron-core GPTModel logits for each (tp, pp, [MCA checkpoint dirs]) job, all in one spawn of ``world``
    processes (default: the largest tp*pp; smaller jobs run data-parallel), so megatron-core is imported once."""
    world = world or max(tp * pp for tp, pp, _ in jobs)
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "ids.pt")
        torch.save(input_ids, ids_path)
        plain_jobs = [(tp, pp, [str(d) for d in dirs]) for tp, pp, dirs in jobs]
        mp.spawn(_worker, args=(world, _free_port(), plain_jobs, ids_path, tmp), nprocs=world, join=True)
        return [
            [torch.load(os.path.join(tmp, f"logits_{j}_{i}.pt")) for i in range(len(dirs))]
            for j, (_, _, dirs) in enumerate(jobs)
        ]
