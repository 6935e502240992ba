"""Start-up cost of the dataset: per-start index vs the shared index (first start, restart), and its memory.

    PYTHONPATH=. python scripts/bench_data_index.py --workdir /tmp/mix --size issue --n 200000 [--train_step]
    git worktree add /tmp/before <older commit>    # then, to compare with that code:
    PYTHONPATH=. python scripts/bench_data_index.py --workdir /tmp/mix --n 20000 --before_src /tmp/before --rounds 3
    PYTHONPATH=. python scripts/bench_data_index.py --workdir /tmp/mix --n 3200000 --sources 4 \
        --modes first_start,restart,edit_one --train_step         # a 4-source mixture YAML (issue #23's scale bar)

Uses the mix and model of ``python -m llava.demo.synthetic_mix`` (made on first use), and writes
``<workdir>/records-<n>.jsonl``: the mix's records repeated (fresh ids) up to ``--n``. Modes, each in a fresh
process, in order: ``before`` (only with ``--before_src``: ``per_start`` run with the code of that checkout),
``per_start`` (``--index_cache_dir none --index_workers 1``: records parsed into Python objects and indexed in this
process, every start), ``first_start`` (an empty cache directory: converted to Arrow and indexed by
``--index_workers`` processes, then cached) and ``restart`` (the same cache directory). Each reports the wall and
CPU seconds (its worker processes included) to build the training dataset (``LazySupervisedDataset.from_args``, as
``llava train`` does) and the process's resident memory growth across it: total, anonymous (private to the rank)
and file-backed (the memory-mapped Arrow pages, shared by the ranks of a node). ``--train_step`` also times a whole
1-step ``python -m llava.train.train`` run per mode (process start to exit, wall and CPU seconds; process start to
the end of the first step; the training process's peak RSS over the run and over everything before its first step --
the step's own memory depends on the batch drawn, the rest does not; the first start's
run starts from an empty cache too, the restart's from the warm one). ``--rounds N`` repeats the modes interleaved
(the machine's noise hits each alike) and reports medians. Prints one JSON line per mode and round, then the ratios
to ``before`` (or ``per_start``).

``--sources K`` splits the ``--n`` records into K JSONL files (fresh ids per file) and trains on a dataset-mixture
YAML listing them (``sampling_strategy: all``); mode ``edit_one`` appends one record to the last source, then starts
like ``restart`` (only that source is indexed again: ``sources_from_cache`` says which were read from the cache).

Measured (2026-12-07, ``--size issue --sources 4 --modes first_start,restart``, 2 index workers on this 2-core
machine while other jobs ran on it: load 2-7, so CPU seconds are the figure to read; the index with the word cache
of ``llava/data/word_cache.py`` and the sources' Arrow conversions side by side):

| records | first start: wall / CPU (per record) | load before/after | restart dataset build | RSS growth (first start) |
|---|---|---|---|---|
| 200,000 | 36.2 s / 33.1 s (166 us); again 46.1 s / 32.2 s | 3.3/3.5; 3.2/4.0 | 0.04 s | 12.0 MiB |
| 800,000 | 158.9 s / 125.6 s (157 us) | 4.1/3.6 | 0.05 s | 30.8 MiB |
| 3,200,000 | 457.5 s / 463.3 s (145 us) | 2.1/5.3 | 0.51 s / 0.36 s CPU | 134.4 MiB (anonymous 113.8) |
| 200,000 (with ``Route``) | 32.5 s / 32.4 s (162 us) | 3.0/3.6 | 0.04 s | 13.5 MiB |
| 800,000 (with ``Route``) | 125.5 s / 126.5 s (158 us) | 3.5/3.9 | 0.06 s | 31.2 MiB |
| 3,200,000 (with ``Route``) | 470.6 s / 509.4 s (159 us) | 2.7/3.7 | 0.58 s / 0.40 s CPU | 135.3 MiB (anonymous 114.5) |

``edit_one`` after that run (one record appended to the 4th source): 159.7 s / 138.2 s CPU, only that source
indexed again (``cccb``), 3,200,001 samples.

Before (same fixture, previous session): 122.7 CPU s per 200,000 records (~600 us each). In the 3.2M run the 4
conversions took 25 s (2 at a time) and the first 800,000-record source was indexed in 64 s while the load was
about 2; the next three took 120 s each as other jobs started. 463 CPU s is under the 600 CPU s that 5 minutes of 2
cores give, and 64 s x 4 + 25 s ~ 280 s, but the 5-minute wall bar was not measured on free cores.
The fixture repeats 400 records, so after the first few hundred records every word and space-delimited chunk is
found in the word cache; the cost with every word a miss (nothing cached) is 498 CPU us per text against 235 us for
``encode_batch_fast`` and 39 us warm (2,000 rendered texts, load 2). Each batch goes the cheaper way at its last
measure (``index_batch.Route``): 10,240 texts of unique words cost 374 us each routed vs 329 us through the Rust call
alone; the benchmark's texts 52 vs 260 us (load 3). The first three rows predate the routing (which sends every
64th batch through the Rust call to measure it); the last three are the code as it is.
Restart, whole 1-step run (``--train_step --train_step_modes restart``, process start to exit): 37.9 s wall /
25.9 s CPU at 3.2M records (load 5.3), 32.2 s / 17.6 s at 400 records (load 6.9); peak RSS 2024.8 vs 1257.6 MiB.
With ``--group_by_modality_length``: 35.5 s / 19.6 s, peak 1518.1 MiB at 3.2M; 29.1 s / 23.4 s, peak 1942.3 MiB at
400. The step's memory depends on the batch drawn, so these peaks do not measure the data's share; the restart's
dataset build grows RSS by 113.9-117.0 MiB at 3.2M records (anonymous 92.5-97.8), 3.7 MiB at 400.

With the machine quiet (load 0.6-1.9, nothing else running; ``--size issue --sources 4 --group_by_modality_length``,
the code as it is): first start of 3.2M records 211.1 s wall / 414.5 CPU s; restart, process start to the end of
the first step 9.9 / 11.6 s at 3.2M and 11.9 / 11.4 s at 400; the training process's peak RSS before its first step
733.3 / 743.7 MiB at 3.2M and 600.4 / 601.6 MiB at 400 (growth 132-143 MiB). ``docs/performance.md`` has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
from llava.data.chat_templates import set_chat_template
from llava.data.dataset import LazySupervisedDataset
from llava.data.templates import get_template
from llava.model.builder import build_llava_model
from llava.train.args import parse_args
model_args, data_args, training_args = parse_args(json.loads(sys.argv[1]))
built = build_llava_model(model_args)
template = get_template(model_args.version, image_front=data_args.image_placement == "front")
set_chat_template(built.processor, template, model_args.mm_use_im_start_end)  # as llava train: part of the index key
before = rss()
def cpu():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
c0, t0 = cpu(), time.perf_counter()
ds = LazySupervisedDataset.from_args(data_args.data_path, model_args, data_args, training_args, built, template)
seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
after = rss()
print(json.dumps({"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "samples": len(ds), "from_cache": ds.index_from_cache,
                  "sources_from_cache": "".join("c" if c else "b" for c in ds.sources_from_cache),
                  **{f"{k}_growth_mib": round(after[k] - before[k], 1) for k in after}}))
"""

# `python -m llava.train.train ARGS`; written at exit to $PEAK_RSS_FILE (JSON): the training process's own peak
# resident memory (KiB) over the run and over what came before its first training step (model, dataset, sampler,
# DataLoader: everything but the step, whose memory depends on the batch drawn), and the wall-clock time (epoch
# seconds) at which the first step returned
TRAIN_CHILD = r"""
import atexit, json, os, resource, runpy, sys, time
import transformers
seen = {}
step = transformers.Trainer.training_step
def first_step(self, *args, **kwargs):
    if not seen:
        seen["pre_step_peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = step(self, *args, **kwargs)
    seen.setdefault("first_step_done", time.time())
    return out
transformers.Trainer.training_step = first_step
atexit.register(lambda: open(os.environ["PEAK_RSS_FILE"], "w").write(json.dumps(
    {**seen, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})))
sys.argv = ["llava.train.train", *sys.argv[1:]]
runpy.run_module("llava.train.train", run_name="__main__", alter_sys=True)
"""

MODES = {"before": ["--index_cache_dir", "none", "--index_workers", "1"],
         "per_start": ["--index_cache_dir", "none", "--index_workers", "1"], "first_start": [], "restart": [],
         "edit_one": []}


def make_records(workdir: Path, n: int) -> Path:
    out = workdir / f"records-{n}.jsonl"
    if not out.is_file():
        base = [json.loads(x) for x in (workdir / "mix.jsonl").read_text().splitlines()]
        with out.open("w") as f:
            for i in range(n):
                f.write(json.dumps({**base[i % len(base)], "id": f"r{i:07d}"}) + "\n")
    return out


def make_mixture(workdir: Path, n: int, sources: int, repeat: int = 1) -> Path:
    """``sources`` JSONL files of ``n // sources`` records each (the mix repeated, fresh ids) and a YAML listing them
    (``repeat: R`` per entry when ``repeat`` > 1: ``n * R`` samples from ``n`` indexed records)."""
    out = workdir / f"mixture-{n}-{sources}.yaml"
    if repeat > 1:
        lines = make_mixture(workdir, n, sources).read_text().splitlines()
        rep = workdir / f"mixture-{n}-{sources}-x{repeat}.yaml"
        rep.write_text("\n".join(lines + [""]).replace("sampling_strategy: all\n",
                                                         f"sampling_strategy: all\n    repeat: {repeat}\n"))
        return rep
    if not out.is_file():
        base = [json.loads(x) for x in (workdir / "mix.jsonl").read_text().splitlines()]
        lines = ["datasets:"]
        for k in range(sources):
            path = workdir / f"records-{n}-source{k}.jsonl"
            with path.open("w") as f:
                for i in range(n // sources):
                    f.write(json.dumps({**base[(i + k) % len(base)], "id": f"s{k}r{i:07d}"}) + "\n")
            lines += [f"  - json_path: {path.name}", "    sampling_strategy: all"]
        out.write_text("\n".join(lines) + "\n")
    return out


def append_one_record(mixture: Path) -> None:
    """Edit the mixture's last source: one more record (a fresh id)."""
    import yaml

    last = mixture.parent / yaml.safe_load(mixture.read_text())["datasets"][-1]["json_path"]
    first = json.loads(last.open().readline())
    with last.open("a") as f:
        f.write(json.dumps({**first, "id": f"edit{time.time_ns()}"}) + "\n")


def run_mode(mode: str, argv_mode: list[str], env: dict, train_step: bool, cache: Path) -> dict:
    import resource

    load_before = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").is_file() else "?"
    if mode == "first_start":
        shutil.rmtree(cache, ignore_errors=True)
    if mode == "edit_one":
        append_one_record(Path(argv_mode[argv_mode.index("--data_path") + 1]))
    # run from the work directory: `-c` and `-m` put the current directory first on sys.path, and the code a mode runs
    # must be the one its PYTHONPATH names
    where = cache.parent
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv_mode)], capture_output=True, text=True, env=env,
                         cwd=where)
    if out.returncode != 0:
        raise RuntimeError(f"{mode}: {out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["loadavg_before_after"] = f"{load_before}/{Path('/proc/loadavg').read_text().split()[0]}"
    if train_step:
        if mode == "first_start":
            shutil.rmtree(cache, ignore_errors=True)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0, started = time.perf_counter(), time.time()
        peak = cache.parent / f"peak-rss-{mode}.json"
        done = subprocess.run([sys.executable, "-c", TRAIN_CHILD, *argv_mode], capture_output=True, text=True,
                              env={**env, "PEAK_RSS_FILE": str(peak)}, cwd=where)
        if done.returncode != 0:
            raise RuntimeError(f"{mode} training run: {done.stderr[-3000:]}")
        result["one_step_run_s"] = round(time.perf_counter() - t0, 1)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result["one_step_run_cpu_s"] = round(after.ru_utime + after.ru_stime - kids.ru_utime - kids.ru_stime, 1)
        seen = json.loads(peak.read_text())
        result["one_step_run_peak_rss_mib"] = round(seen["peak_kib"] / 1024, 1)
        # process start (interpreter and imports included) to the end of the first training step
        result["start_to_first_step_s"] = round(seen["first_step_done"] - started, 1)
        result["pre_step_peak_rss_mib"] = round(seen["pre_step_peak_kib"] / 1024, 1)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--size", choices=("small", "issue", "tiny"), default="issue")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--workers", type=int, default=0, help="--index_workers of the first start (0: one per CPU)")
    p.add_argument("--modes", default=None, help="comma-separated, from before, per_start, first_start, restart "
                                                 "(default: all, before only with --before_src)")
    p.add_argument("--before_src", default=None, help="a checkout of older code: mode `before` runs it (PYTHONPATH)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the modes, interleaved; medians are reported")
    p.add_argument("--train_step", action="store_true", help="also time a whole 1-step training run per mode")
    p.add_argument("--sources", type=int, default=1, help="K > 1: a mixture YAML of K JSONL sources (n/K records each)")
    p.add_argument("--repeat", type=int, default=1, help="with --sources: each entry `repeat: R` (n * R samples "
                   "from the n records' index; the same cache directory as without it)")
    p.add_argument("--train_step_modes", default=None,
                   help="with --train_step, only these modes (comma-separated) run the 1-step training (e.g. restart)")
    p.add_argument("--group_by_modality_length", action="store_true",
                   help="train with --group_by_modality_length True (the OneVision recipe's sampler)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import ensure_workdir

    workdir = Path(args.workdir).resolve()
    paths = ensure_workdir(workdir, args.size, 400)
    data = make_records(workdir, args.n) if args.sources == 1 else make_mixture(workdir, args.n, args.sources,
                                                                                args.repeat)
    cache = workdir / (f"index-cache-{args.n}" + ("" if args.sources == 1 else f"-{args.sources}"))
    modes = (args.modes or ("before," if args.before_src else "") + "per_start,first_start,restart").split(",")
    if "before" in modes and not args.before_src:
        p.error("mode before needs --before_src")
    flags = ["--model_name_or_path", str(paths["llm"]), "--vision_tower", str(paths["vision_tower"]), "--version",
             "vicuna_v1", "--data_path", str(data), "--image_folder", str(paths["image_folder"]), "--output_dir",
             str(workdir / "out-index"), "--model_max_length", "1024", "--use_cpu", "True", "--report_to", "none",
             "--on_bad_sample", "skip", "--index_cache_dir", str(cache), "--index_workers", str(args.workers),
             "--per_device_train_batch_size", "4", "--max_steps", "1", "--save_strategy", "no"]
    if args.group_by_modality_length:
        flags += ["--group_by_modality_length", "True"]
    step_modes = set(args.train_step_modes.split(",")) if args.train_step_modes else set(modes)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for round_ in range(args.rounds):
        for mode in modes:
            code = Path(args.before_src) if mode == "before" else Path(__file__).parent.parent  # whose llava runs
            env = {**os.environ, "PYTHONPATH": str(code.resolve())}
            result = run_mode(mode, flags + MODES[mode], env, args.train_step and mode in step_modes, cache)
            runs[mode].append(result)
            print(json.dumps({"mode": mode, "round": round_, "n": args.n, **result}), flush=True)
    results = {m: {k: round(statistics.median(r[k] for r in rs), 2)
                   if isinstance(rs[0][k], (int, float)) and not isinstance(rs[0][k], bool) else rs[0][k]
                   for k in rs[0]} for m, rs in runs.items()}
    base = "before" if "before" in results else "per_start"
    if base in results:
        b = results[base]
        print(f"medians of {args.rounds} round(s), ratios to {base}:")
        for mode, r in results.items():
            line = (f"  {mode:11s} dataset {r['seconds']:7.2f} s wall, {r['cpu_seconds']:7.2f} s CPU "
                    f"({b['seconds'] / r['seconds']:.2f}x, CPU {b['cpu_seconds'] / r['cpu_seconds']:.2f}x); RSS growth "
                    f"{r['VmRSS_growth_mib']} MiB (anonymous {r['RssAnon_growth_mib']})")
            if "one_step_run_s" in r and "one_step_run_s" in b:
                line += (f"; 1-step run {r['one_step_run_s']} s wall ({b['one_step_run_s'] / r['one_step_run_s']:.2f}x),"
                         f" {r['one_step_run_cpu_s']} s CPU")
            print(line)
    return results


if __name__ == "__main__":
    main()
