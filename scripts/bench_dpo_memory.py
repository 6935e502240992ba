"""Peak memory of DPO training by reference path: frozen copy vs precomputed log-probs vs LoRA (adapters disabled).

    PYTHONPATH=. python scripts/bench_dpo_memory.py --workdir /tmp/bench_dpo [--size small] [--steps 3]

Builds once under ``--workdir``: the benchmark model of ``llava.demo.synthetic_mix`` (``--size small``: Llama 6L/512,
CLIP 6L/384 at 224 px; ``tiny`` for a quick check) composed into a native Llava checkpoint (the starting point, as an
SFT run's output is), and 32 preference pairs over the shapes demo's images. Then each variant trains ``--steps``
DPO steps (batch 2 pairs, fp32, AdamW) through the real path (``llava.train.train.build_dpo_trainer`` + ``Trainer.train``)
in its own fresh process, and reports the process's peak resident memory (``ru_maxrss``), its resident memory once
the trainer is built, the reference's own parameter bytes, and the wall time. Variants:

- ``copy``: full fine-tuning, the reference a frozen copy (``dpo_ov7b.sh``'s default);
- ``precompute``: full fine-tuning, ``--precompute_ref_log_probs True`` (one pass first, no reference held);
- ``lora``: ``--lora_enable True --freeze_mm_mlp_adapter True``, the reference the adapter-disabled base;
- ``lora_copy``: the same LoRA run with a frozen copy as its reference (what LoRA saves).

Prints one JSON line per variant and the ratios to ``copy``. Memory figures on a shared machine are noisy in the
small digits only (the model's bytes dominate); say the load with them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "copy": [],
    "precompute": ["--precompute_ref_log_probs", "True"],
    "lora": ["--lora_enable", "True", "--freeze_mm_mlp_adapter", "True", "--lora_r", "16", "--lora_alpha", "32"],
    "lora_copy": ["--lora_enable", "True", "--freeze_mm_mlp_adapter", "True", "--lora_r", "16", "--lora_alpha", "32"],
}


def prepare(workdir: Path, size: str) -> dict:
    """The starting Llava checkpoint and the pairs (made once)."""
    paths_file = workdir / "paths.json"
    if paths_file.is_file():
        return json.loads(paths_file.read_text())
    from llava.demo.shapes import generate_shapes_dataset
    from llava.demo.synthetic_mix import write_bench_models
    from llava.model.builder import build_llava_model
    from llava.model.model_args import ModelArguments

    shapes = generate_shapes_dataset(workdir / "shapes", n_caption=8, n_qa=64, n_heldout=8, seed=0)
    models = write_bench_models(workdir, shapes["stage2_qa"], size=size)
    built = build_llava_model(ModelArguments(model_name_or_path=str(models["llm"]),
                                             vision_tower=str(models["vision_tower"])))
    start = workdir / "start"
    built.model.save_pretrained(start)
    built.processor.save_pretrained(start)
    pairs = []
    for r in [r for r in json.loads(Path(shapes["stage2_qa"]).read_text()) if "image" in r][:32]:
        answer = r["conversations"][1]["value"]
        pairs.append({"id": r["id"], "image": r["image"], "prompt": r["conversations"][0]["value"],
                      "chosen": answer, "rejected": answer.upper() if answer.upper() != answer else answer + " no"})
    (workdir / "pairs.json").write_text(json.dumps(pairs))
    paths = {"start": str(start), "pairs": str(workdir / "pairs.json"), "images": str(shapes["image_folder"])}
    paths_file.write_text(json.dumps(paths))
    return paths


def run_variant(name: str, paths: dict, workdir: Path, steps: int) -> dict:
    """One variant in this process (called in a fresh subprocess)."""
    import torch
    import transformers

    from llava.train.args import parse_args
    from llava.train.train import build_dpo_trainer, frozen_reference_copy

    argv = ["--model_name_or_path", paths["start"], "--version", "vicuna_v1", "--data_path", paths["pairs"],
            "--image_folder", paths["images"], "--training_stage", "dpo", "--beta", "0.1", "--gamma", "0",
            "--output_dir", str(workdir / f"run_{name}"), "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "2", "--max_steps", str(steps), "--learning_rate", "1e-5",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--seed", "0",
            "--dataloader_num_workers", "0", "--lora_dropout", "0", *VARIANTS[name]]
    model_args, data_args, training_args = parse_args(argv)
    transformers.set_seed(0)
    start = time.perf_counter()
    trainer, _ = build_dpo_trainer(model_args, data_args, training_args)
    if name == "lora_copy":
        trainer.ref_model = frozen_reference_copy(trainer.model)
    built_rss = _rss_mib()
    trainer.train()
    ref = trainer.ref_model
    ref_bytes = sum(p.numel() * p.element_size() for p in ref.parameters()) if ref is not None else 0
    return {"variant": name, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_build_mib": round(built_rss, 1), "reference_param_mib": round(ref_bytes / 2**20, 1),
            "policy_param_mib": round(sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / 2**20, 1),
            "seconds": round(time.perf_counter() - start, 1), "steps": steps,
            "final_loss": trainer.state.log_history[-1].get("train_loss"),
            "torch_threads": torch.get_num_threads()}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this variant here and print its JSON
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir, args.size)
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, paths, workdir, args.steps)), flush=True)
        return
    results = []
    for name in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--size", args.size,
                               "--steps", str(args.steps), "--one", name], capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"variant {name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    base = next((r for r in results if r["variant"] == "copy"), None)
    if base:
        for r in results:
            print(f"{r['variant']:>11}: peak RSS {r['peak_rss_mib']:8.1f} MiB ({r['peak_rss_mib'] / base['peak_rss_mib']:.2f}"
                  f" x copy), reference params {r['reference_param_mib']:7.1f} MiB, {r['seconds']:6.1f} s")


if __name__ == "__main__":
    main()
