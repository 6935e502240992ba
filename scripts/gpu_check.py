"""GPU check of issue #25, one command: bf16 step time and MFU of a realistic LLaVA shape, packed vs padded.

    PYTHONPATH=. python scripts/gpu_check.py                      # one GPU: 7B-shaped LoRA, ~5 minutes on an H100
    PYTHONPATH=. python scripts/gpu_check.py --device cpu --dry_run   # tiny shape, 1 step each: checks the script

Builds a Llava from configs (no download): ``--shape 7b`` is a Llama-2-7B-shaped language model (4096 wide, 32
layers, 32 heads, 11008 MLP, vocabulary 32000) with a CLIP-L/14-336 tower (576 image tokens per image), LoRA r=16 on
every language-model linear layer, projector trained, tower frozen; bf16 on the GPU. Each step is ``--batch``
samples of one image + text, lengths spread over [seq/4, seq] (``--seq``), forward + backward + AdamW. Variants:

- ``sdpa_padded`` / ``sdpa_packed``: SDPA on a right-padded batch vs one padding-free row (``llava_packed_sdpa``);
- ``fa2_padded`` / ``fa2_packed``: the same with ``flash_attention_2`` (when ``flash_attn`` is installed);
- ``liger_packed``: liger-kernel's fused linear cross-entropy instead of the project's supervised head (when
  ``liger_kernel`` is installed); every other variant uses the supervised head (``llava/model/supervised_head.py``);
- sequence parallelism on/off is not measured: it is not built in this branch (printed as skipped when >1 GPU).

Per variant: median step time, real tokens/s, MFU (useful FLOPs of ``llava/train/throughput.py``'s formula over the
step time, against ``--peak_tflops``: 989 = H100 SXM bf16 dense), peak GPU memory, loss. One JSON line each.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import torch

SHAPES = {  # language model, vision tower
    "7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000),
           dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14)),
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000),
           dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14)),
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=28, patch_size=14)),
}


def build(shape: str, attn: str, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text, vision = SHAPES[shape]
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    config = LlavaConfig(text_config=LlamaConfig(max_position_embeddings=16384, tie_word_embeddings=False,
                                                 **text).to_dict(),
                         vision_config=CLIPVisionConfig(**vision).to_dict(), image_token_index=text["vocab_size"] - 1,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=image_tokens)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.config.use_cache = model.config.text_config.use_cache = False
    model.model.language_model.set_attn_implementation(attn)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                      target_modules=r"^model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
    model = get_peft_model(model, lora)
    for p in model.parameters():  # trainable weights in fp32 (autocast computes in bf16)
        if p.requires_grad:
            p.data = p.data.float()
    return model, image_tokens


def batches(shape: str, seq: int, batch: int, image_tokens: int, steps: int, device):
    """``steps`` lists of ``batch`` samples: (input_ids, labels, pixel_values), lengths in [seq/4, seq]."""
    text, vision = SHAPES[shape]
    vocab, size = text["vocab_size"], vision["image_size"]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        samples = []
        for _ in range(batch):
            n = int(torch.randint(max(seq // 4, image_tokens + 8), seq + 1, (1,), generator=g))
            ids = torch.randint(1, vocab - 1, (n,), generator=g)
            ids[1 : 1 + image_tokens] = vocab - 1
            labels = torch.full_like(ids, -100)
            labels[n // 2 :] = ids[n // 2 :]  # the second half supervised (the reply)
            samples.append((ids, labels, torch.randn(1, 3, size, size, generator=g)))
        out.append(samples)
    return out


def collate(samples, packed: bool, device, dtype):
    from llava.data.collator import DataCollatorForSupervisedDataset, DataCollatorWithPacking

    items = [{"input_ids": i, "labels": lab, "pixel_values": px} for i, lab, px in samples]
    batch = (DataCollatorWithPacking(pad_token_id=0) if packed else DataCollatorForSupervisedDataset(pad_token_id=0))(items)
    return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in batch.items()}


def run_variant(name: str, args, device, dtype) -> dict:
    from llava.model.packed_attention import use_packed_sdpa
    from llava.model.supervised_head import supervised_head_loss
    from llava.train.throughput import FlopCounts

    attn = "flash_attention_2" if name.startswith("fa2") else "sdpa"
    packed = name.endswith("packed")
    model, image_tokens = build(args.shape, attn, device, dtype)
    if packed and attn == "sdpa":
        use_packed_sdpa(model)
    llava = model.get_base_model()
    liger = None
    if name.startswith("liger"):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    data = batches(args.shape, args.seq, args.batch, image_tokens, args.warmup + args.steps, device)
    flops = FlopCounts.of(model, image_tokens)
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step, samples in enumerate(data):
        batch = collate(samples, packed, device, dtype)
        labels = batch.pop("labels")
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            hidden = llava.model(**batch).last_hidden_state
            if liger is not None:
                targets = labels[:, 1:].reshape(-1)
                loss = liger(llava.lm_head.weight, hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets)
            else:
                loss = supervised_head_loss(hidden, llava.lm_head, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    lengths = [len(s[0]) for samples in data[args.warmup:] for s in samples]
    step_time = statistics.median(times)
    useful = flops.step_flops(lengths, len(lengths)) / len(times)
    result = {"variant": name, "shape": args.shape, "device": device.type, "dtype": str(dtype).split(".")[-1],
              "samples_per_step": args.batch, "seq": args.seq, "step_time_median_s": round(step_time, 4),
              "real_tokens_per_s": round(sum(lengths) / len(times) / step_time, 1),
              "mfu": round(useful / step_time / (args.peak_tflops * 1e12), 4), "mean_loss": round(statistics.mean(losses), 4)}
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model, optimizer, llava
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def variants(device) -> list[str]:
    names = ["sdpa_padded", "sdpa_packed"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        names += ["fa2_padded", "fa2_packed"]
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger_packed")
    return names


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dry_run", action="store_true", help="tiny shape, 1 measured step per variant")
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--seq", type=int, default=4096, help="longest sample (samples spread over [seq/4, seq])")
    p.add_argument("--batch", type=int, default=4, help="samples per step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    p.add_argument("--variants", default="", help="comma-separated subset (default: all available)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.shape, args.seq, args.steps, args.warmup = "tiny", 64, 1, 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = args.variants.split(",") if args.variants else variants(device)
    results = []
    for name in names:
        results.append(run_variant(name, args, device, dtype))
        print(json.dumps(results[-1]), flush=True)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        print(json.dumps({"variant": "sequence_parallel", "skipped": "not built in this branch (issue #25 item 1)"}))
    by = {r["variant"]: r for r in results}
    for a, b in (("sdpa_packed", "sdpa_padded"), ("fa2_packed", "fa2_padded"), ("liger_packed", "sdpa_packed")):
        if a in by and b in by:
            print(f"{a}/{b}: real tokens/s x{by[a]['real_tokens_per_s'] / by[b]['real_tokens_per_s']:.3f}")
    return results


if __name__ == "__main__":
    main()
