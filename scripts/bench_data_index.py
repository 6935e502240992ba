"""Start-up cost of the dataset: today's per-start index vs the shared index (first start, restart), and its memory.

    PYTHONPATH=. python scripts/bench_data_index.py --workdir /tmp/mix --size issue --n 200000 [--train_step]

Uses the mix and model of ``python -m llava.demo.synthetic_mix`` (made on first use), and writes
``<workdir>/records-<n>.jsonl``: the mix's records repeated (fresh ids) up to ``--n``. Three modes, each in a fresh
process, in order: ``per_start`` (``--index_cache_dir none --index_workers 1``: records parsed into Python objects and
indexed one at a time, every start, as before the shared index), ``first_start`` (an empty cache directory: converted
to Arrow and indexed by ``--index_workers`` processes, then cached) and ``restart`` (the same cache directory). Each
reports the wall and CPU seconds (its worker processes included) to build the training dataset (``LazySupervisedDataset.from_args``, as ``llava train`` does)
and the process's resident memory growth across it: total, anonymous (private to the rank) and file-backed (the
memory-mapped Arrow pages, shared by the ranks of a node). ``--train_step`` also times a whole 1-step
``python -m llava.train.train`` run per mode (process start to exit; wall and CPU seconds). Prints one JSON line per mode and the ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import datasets, transformers.trainer  # imported by every training run anyway: not counted
def rss():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024
    return out
from llava.data.dataset import LazySupervisedDataset
from llava.data.templates import get_template
from llava.model.builder import build_llava_model
from llava.train.args import parse_args
model_args, data_args, training_args = parse_args(json.loads(sys.argv[1]))
built = build_llava_model(model_args)
before = rss()
def cpu():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
c0, t0 = cpu(), time.perf_counter()
ds = LazySupervisedDataset.from_args(data_args.data_path, model_args, data_args, training_args, built,
                                     get_template(model_args.version))
seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
after = rss()
print(json.dumps({"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "samples": len(ds), "from_cache": ds.index_from_cache,
                  **{f"{k}_growth_mib": round(after[k] - before[k], 1) for k in after}}))
"""

MODES = {"per_start": ["--index_cache_dir", "none", "--index_workers", "1"], "first_start": [], "restart": []}


def make_records(workdir: Path, n: int) -> Path:
    out = workdir / f"records-{n}.jsonl"
    if not out.is_file():
        base = [json.loads(x) for x in (workdir / "mix.jsonl").read_text().splitlines()]
        with out.open("w") as f:
            for i in range(n):
                f.write(json.dumps({**base[i % len(base)], "id": f"r{i:07d}"}) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--size", choices=("small", "issue", "tiny"), default="issue")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--workers", type=int, default=0, help="--index_workers of the first start (0: one per CPU)")
    p.add_argument("--modes", default="per_start,first_start,restart")
    p.add_argument("--train_step", action="store_true", help="also time a whole 1-step training run per mode")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import ensure_workdir

    workdir = Path(args.workdir)
    paths = ensure_workdir(workdir, args.size, 400)
    data = make_records(workdir, args.n)
    cache = workdir / f"index-cache-{args.n}"
    if "first_start" in args.modes.split(","):
        shutil.rmtree(cache, ignore_errors=True)
    flags = ["--model_name_or_path", str(paths["llm"]), "--vision_tower", str(paths["vision_tower"]), "--version",
             "vicuna_v1", "--data_path", str(data), "--image_folder", str(paths["image_folder"]), "--output_dir",
             str(workdir / "out-index"), "--model_max_length", "1024", "--use_cpu", "True", "--report_to", "none",
             "--on_bad_sample", "skip", "--index_cache_dir", str(cache), "--index_workers", str(args.workers),
             "--per_device_train_batch_size", "4", "--max_steps", "1", "--save_strategy", "no"]
    results = {}
    for mode in args.modes.split(","):
        argv_mode = flags + MODES[mode]
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv_mode)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{mode}: {out.stderr[-3000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        if args.train_step:
            import resource

            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "llava.train.train", *argv_mode], check=True, capture_output=True)
            results[mode]["one_step_run_s"] = round(time.perf_counter() - t0, 1)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            results[mode]["one_step_run_cpu_s"] = round(after.ru_utime + after.ru_stime - kids.ru_utime - kids.ru_stime, 1)
        print(json.dumps({"mode": mode, "n": args.n, **results[mode]}), flush=True)
    if "per_start" in results:
        for mode in ("first_start", "restart"):
            if mode in results:
                print(f"{mode}: dataset {results['per_start']['seconds'] / results[mode]['seconds']:.1f}x faster than "
                      f"per_start (CPU {results['per_start']['cpu_seconds'] / results[mode]['cpu_seconds']:.1f}x); RSS growth {results[mode]['VmRSS_growth_mib']} MiB (anonymous "
                      f"{results[mode]['RssAnon_growth_mib']}) vs {results['per_start']['VmRSS_growth_mib']} MiB")
    return results


if __name__ == "__main__":
    main()
