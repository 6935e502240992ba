"""Peak activation memory per rank of one long sample: sequence parallelism (--sequence_parallel_size) off vs on.

    PYTHONPATH=. python scripts/bench_sp_memory.py --seq 8192 --sp 2            # 1 process vs 2 ranks (gloo)
    PYTHONPATH=. python scripts/bench_sp_memory.py --seq 8192 --sp 2 --intermediate 1024 --tiled 8
    PYTHONPATH=. python scripts/bench_sp_memory.py --fit_budget 1024 --tiled 8 --vocab 32000 --layers 8 --width 128 \
        --intermediate 512                                    # longest sample within 1 GiB: stock vs tiled MLP + head

The tiny LLaVA of ``scripts/bench_head_memory.py`` (Llama ``--layers`` layers of width ``--width``, ``--heads`` heads,
vocab ``--vocab``; CLIP 64 px -> 64 image tokens), fp32, the supervised head on, one sample of ``--seq`` tokens with an image and answers on
30 % of the positions. ``sp1``: one process, no sequence parallelism. ``spN``: N processes (torch.distributed, gloo)
in one sequence-parallel group (``llava/model/sequence_parallel.py``), each rank holding the same sample and running
its 1/N of the sequence. Each rank measures its own peak of forward + backward: peak resident memory during the
step (``VmHWM``, reset through ``/proc/self/clear_refs`` just before) minus resident memory just before; weights,
the batch and the process group are held before, so the difference is the step's activations, gradients and
temporaries. ``--tiled K`` adds the tiled MLP (``--tiled_mlp_shards K``) to both sides. Prints one JSON line per
variant (the largest rank's peak for spN), then the ratio.

``--fit_budget MIB`` (one process each): the longest sample whose step peak stays within MIB, searched to
``--fit_step`` tokens (doubling, then bisection; every probe a fresh process), for the stock model (full-vocabulary
logits, stock MLP: ``--head stock --tiled 0``), for the supervised head (the tiled loss) alone, and for the tiled MLP
(``--tiled K``) with the supervised head; prints the three lengths and their ratios to the stock one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import bench_head_memory
import torch
import torch.distributed as dist
from bench_head_memory import _status_kib, build_batch


def build_model(vocab: int, intermediate: int, layers: int, width: int, heads: int):
    """``bench_head_memory.py``'s tiny LLaVA with the language model's depth, width and heads as given."""
    return bench_head_memory.build_model(vocab, intermediate, layers, width, heads, max_positions=32768)


def step_peak(model, data: dict) -> tuple[float, float, float]:
    """(loss, peak MiB above the memory held before, seconds) of one forward + backward."""
    before = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    t0 = time.perf_counter()
    loss = model(**data).loss
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    return loss.item(), (peak - before) / 2**20, seconds


def run_rank(sp: int, args) -> dict:
    """This process's step: without sequence parallelism (sp 1), or as one rank of a group of ``sp`` (env: RANK)."""
    from llava.model.sequence_parallel import use_sequence_parallel
    from llava.model.supervised_head import use_supervised_head
    from llava.model.tiled_mlp import use_tiled_mlp

    torch.set_num_threads(1)
    if sp > 1:
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=sp)
    model = build_model(args.vocab, args.intermediate, args.layers, args.width, args.heads).train()
    assert use_supervised_head(model, args.head == "supervised") == (args.head == "supervised")
    if args.tiled > 1:
        use_tiled_mlp(model, args.tiled)
    if sp > 1:
        assert use_sequence_parallel(model, sp)
    data = build_batch(args.vocab, 1, args.seq, 0.3)
    data.pop("attention_mask")  # one unpadded sample
    if sp > 1:  # a warm-up of the collectives (gloo's buffers), so the step measures the step
        dist.all_reduce(torch.zeros(1))
    loss, peak, seconds = step_peak(model, data)
    out = {"rank": dist.get_rank() if sp > 1 else 0, "loss": round(loss, 6), "step_peak_mib": round(peak, 1),
           "step_seconds": round(seconds, 2)}
    if sp > 1:
        dist.destroy_process_group()
    return out


def launch(sp: int, args) -> dict:
    """Run ``sp`` processes of this script (``--rank-of sp``); returns the variant's line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(sp):
        env = {**os.environ, "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--rank-of", str(sp), "--seq", str(args.seq), "--vocab", str(args.vocab),
               "--intermediate", str(args.intermediate), "--tiled", str(args.tiled), "--layers", str(args.layers),
               "--width", str(args.width), "--heads", str(args.heads), "--head", args.head]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    ranks = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"rank exited {proc.returncode}")
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    worst = max(ranks, key=lambda r: r["step_peak_mib"])
    return {"variant": f"sp{sp}", "tokens": args.seq, "vocab": args.vocab, "layers": args.layers, "width": args.width,
            "heads": args.heads, "intermediate": args.intermediate, "head": args.head,
            "tiled_mlp_shards": args.tiled, "loss": ranks[0]["loss"] if sp == 1 else sum(r["loss"] for r in ranks) / sp,
            "step_peak_mib_per_rank": [r["step_peak_mib"] for r in ranks], "step_peak_mib": worst["step_peak_mib"],
            "step_seconds": max(r["step_seconds"] for r in ranks)}


def longest_within(budget_mib: float, step: int, args) -> tuple[int, list[dict]]:
    """The longest ``--seq`` (a multiple of ``step``) whose one-process step peak is <= ``budget_mib``; the probes."""
    probes = []

    def fits(seq: int) -> bool:
        line = launch(1, argparse.Namespace(**{**vars(args), "seq": seq}))
        probes.append(line)
        print(json.dumps(line), flush=True)
        return line["step_peak_mib"] <= budget_mib

    low, high = 0, step
    while fits(high):  # doubling: low fits, high does not
        low, high = high, high * 2
    while high - low > step:
        mid = (low + high) // 2 // step * step
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low, probes


def fit_budget(args) -> dict:
    longest = {}
    for name, tiled, head in (("stock", 0, "stock"), ("supervised_head", 0, "supervised"),
                              ("tiled_mlp_and_head", args.tiled, "supervised")):
        variant = argparse.Namespace(**{**vars(args), "tiled": tiled, "head": head})
        longest[name], _ = longest_within(args.fit_budget, args.fit_step, variant)
    ratios = {name: round(n / max(longest["stock"], 1), 2) for name, n in longest.items()}
    result = {"budget_mib": args.fit_budget, "fit_step": args.fit_step, "vocab": args.vocab, "layers": args.layers,
              "width": args.width, "intermediate": args.intermediate, "tiled_mlp_shards": args.tiled,
              "longest": longest, "vs_stock": ratios}
    print(json.dumps(result), flush=True)
    print(f"longest sample within {args.fit_budget} MiB: stock {longest['stock']} tokens, supervised head "
          f"{longest['supervised_head']} ({ratios['supervised_head']}x), tiled MLP ({args.tiled} shards) + supervised "
          f"head {longest['tiled_mlp_and_head']} ({ratios['tiled_mlp_and_head']}x)")
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--sp", type=int, default=2, help="sequence-parallel size of the second variant")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the language model")
    p.add_argument("--width", type=int, default=64, help="hidden size of the language model")
    p.add_argument("--heads", type=int, default=4, help="attention heads (= key/value heads)")
    p.add_argument("--intermediate", type=int, default=256, help="the MLP's intermediate size")
    p.add_argument("--tiled", type=int, default=0, help="tiled MLP shards on both sides (0: off)")
    p.add_argument("--head", choices=("supervised", "stock"), default="supervised",
                   help="the loss: the supervised head (tiled linear + cross-entropy) or the stock full logits")
    p.add_argument("--fit_budget", type=float, default=0, help="MiB: find the longest sample within it (see above)")
    p.add_argument("--fit_step", type=int, default=512, help="token granularity of --fit_budget's search")
    p.add_argument("--rank-of", type=int, default=0, help=argparse.SUPPRESS)  # internal: one rank, print JSON
    args = p.parse_args(argv)
    if args.rank_of:
        print(json.dumps(run_rank(args.rank_of, args)), flush=True)
        return []
    if args.fit_budget:
        if args.tiled <= 1:
            p.error("--fit_budget compares against the tiled MLP: give --tiled K (K >= 2)")
        return [fit_budget(args)]
    results = [launch(1, args), launch(args.sp, args)]
    for r in results:
        print(json.dumps(r), flush=True)
    one, many = results
    print(f"peak per rank at {args.seq} tokens: sp1 {one['step_peak_mib']} MiB, sp{args.sp} {many['step_peak_mib']} "
          f"MiB: {many['step_peak_mib'] / one['step_peak_mib']:.2f}x; loss {one['loss']} vs {many['loss']:.6f}")
    return results


if __name__ == "__main__":
    main()
