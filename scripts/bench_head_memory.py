"""Peak memory of one training step: the supervised-rows head vs the stock LM head + loss, each in a fresh process.

    PYTHONPATH=. python scripts/bench_head_memory.py --vocab 152064 --batch 4 --seq 2048 [--supervised 0.3]
    PYTHONPATH=. python scripts/bench_head_memory.py --variants head --seq 2048     # one side only
    PYTHONPATH=. python scripts/bench_head_memory.py --variants head,tiled --vocab 512 --batch 1 --seq 8192 \
        --intermediate 1024 --shards 8        # + the tiled MLP (--tiled_mlp_shards): long samples, MLP-dominated

A tiny LLaVA built from configs (Llama 2 layers of width 64, vocab ``--vocab``; CLIP 2 layers at 64 px / patch 8 ->
64 image tokens per sample), fp32, AdamW; one batch of ``--batch`` x ``--seq`` tokens, one image per row, labels on
``--supervised`` of the positions (answer spans spread over each row, as in LLaVA SFT). Each variant runs in its own
process: the step is forward + backward + optimizer step; "step peak" is the process's peak resident memory during
the step (``VmHWM``, reset through ``/proc/self/clear_refs`` just before) minus its resident memory just before (on a
GPU: ``torch.cuda.max_memory_allocated`` minus allocated before). Variant ``tiled`` is ``head`` plus the tiled MLP
(``llava/model/tiled_mlp.py``, ``--shards`` slices; ``--intermediate`` sets the MLP width). Prints one JSON line per variant, then the ratio.
The machine's memory is shared: a variant whose estimate does not fit in ``MemAvailable`` is skipped, not run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

LM_WIDTH, VISION_IMAGE, VISION_PATCH = 64, 64, 8


def build_model(vocab: int, intermediate: int = 4 * LM_WIDTH, layers: int = 2, width: int = LM_WIDTH, heads: int = 4,
                max_positions: int = 8192):
    """A tiny LLaVA (CLIP 64 px -> 64 image tokens) whose Llama has the given depth, width, heads and vocab."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=VISION_IMAGE, patch_size=VISION_PATCH)
    config = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=vocab - 1,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=(VISION_IMAGE // VISION_PATCH) ** 2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    return model


def build_batch(vocab: int, batch: int, seq: int, supervised: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n_image = (VISION_IMAGE // VISION_PATCH) ** 2
    input_ids = torch.randint(1, vocab - 1, (batch, seq), generator=g)
    input_ids[:, 1 : 1 + n_image] = vocab - 1
    labels = torch.full_like(input_ids, -100)
    span = 64  # answers of 64 tokens, evenly spread after the image, covering `supervised` of the row
    n_spans = max(1, round(supervised * seq / span))
    free = seq - 1 - n_image
    for k in range(n_spans):
        start = 1 + n_image + (k + 1) * free // (n_spans + 1) - span // 2
        labels[:, start : start + span] = input_ids[:, start : start + span]
    pixel_values = torch.randn(batch, 3, VISION_IMAGE, VISION_IMAGE, generator=g)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def run_variant(variant: str, vocab: int, batch: int, seq: int, supervised: float, intermediate: int = 4 * LM_WIDTH,
                shards: int = 4) -> dict:
    """One training step in this process; returns the step's peak memory above the memory held before it."""
    from llava.model.supervised_head import use_supervised_head

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(vocab, intermediate).to(device).train()
    if variant in ("head", "tiled"):
        assert use_supervised_head(model)
    if variant == "tiled":
        from llava.model.tiled_mlp import use_tiled_mlp

        assert use_tiled_mlp(model, shards)
    data = {k: v.to(device) for k, v in build_batch(vocab, batch, seq, supervised).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_supervised = int((data["labels"][:, 1:] != -100).sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    t0 = time.perf_counter()
    loss = model(**data, num_items_in_batch=torch.tensor(n_supervised)).loss
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return {"variant": variant, "device": device.type, "vocab": vocab, "tokens": f"{batch}x{seq}",
            "intermediate": intermediate, **({"shards": shards} if variant == "tiled" else {}),
            "supervised_tokens": n_supervised, "loss": round(float(loss), 6),
            "step_peak_mib": round((peak - before) / 2**20, 1), "held_before_mib": round(before / 2**20, 1),
            "step_seconds": round(seconds, 2)}


def estimate_stock_mib(vocab: int, batch: int, seq: int) -> float:
    """Estimate of the stock step: ~3 fp32 copies of the full logits (measured: 14,423 MiB at 4 x 2048 x 152064,
    3.03 copies), plus a margin."""
    return 3.2 * batch * seq * vocab * 4 / 2**20


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--supervised", type=float, default=0.3, help="fraction of positions with a label")
    p.add_argument("--variants", default="stock,head", help="stock, head, tiled (head + tiled MLP)")
    p.add_argument("--intermediate", type=int, default=4 * LM_WIDTH, help="the MLP's intermediate size")
    p.add_argument("--shards", type=int, default=4, help="tiled: MLP slices")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run this variant here, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_variant(args.one, args.vocab, args.batch, args.seq, args.supervised, args.intermediate,
                                     args.shards)))
        return []
    results = []
    for variant in args.variants.split(","):
        need = estimate_stock_mib(args.vocab, args.batch, args.seq) if variant == "stock" else 0
        if need > 0.8 * mem_available_mib() and not torch.cuda.is_available():
            print(json.dumps({"variant": variant, "skipped": f"needs ~{need:.0f} MiB, {mem_available_mib():.0f} "
                                                             f"MiB available"}), flush=True)
            continue
        out = subprocess.run([sys.executable, __file__, "--one", variant, "--vocab", str(args.vocab), "--batch",
                              str(args.batch), "--seq", str(args.seq), "--supervised", str(args.supervised),
                              "--intermediate", str(args.intermediate), "--shards", str(args.shards)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    by = {r["variant"]: r for r in results}
    if {"stock", "head"} <= set(by):
        print(f"step peak: stock {by['stock']['step_peak_mib']} MiB, head {by['head']['step_peak_mib']} MiB: "
              f"{by['stock']['step_peak_mib'] / by['head']['step_peak_mib']:.1f}x lower; loss "
              f"{by['stock']['loss']} vs {by['head']['loss']}")
    if {"head", "tiled"} <= set(by):
        print(f"step peak: head {by['head']['step_peak_mib']} MiB, head + tiled MLP {by['tiled']['step_peak_mib']} "
              f"MiB: {by['head']['step_peak_mib'] / by['tiled']['step_peak_mib']:.2f}x lower; loss "
              f"{by['head']['loss']} vs {by['tiled']['loss']}")
    return results


if __name__ == "__main__":
    main()
