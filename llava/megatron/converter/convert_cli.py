"""Command line for the Megatron-Core converter (``llava convert ...`` calls ``main(argv)``).

    python -m llava.megatron.converter.convert_cli hf2mcore --tp 2 --pp 2 [--vpp N] [--vocab-divisor 128] SRC OUT
    python -m llava.megatron.converter.convert_cli mcore2hf SRC OUT
    python -m llava.megatron.converter.convert_cli mcore2mcore --tp 4 --pp 1 SRC OUT     # reshard
    add --report-memory to print the peak resident memory of the conversion above the post-import baseline
    (Linux /proc VmHWM, reset through /proc/self/clear_refs after imports)

Exit status 0 on success, 2 on a conversion error (message on stderr, naming the key, shape or model type).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llava.errors import ArgumentParser, report_usage_errors


def _rss_mib(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process in MiB, from /proc (Linux); -1 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return -1.0


def _reset_peak_rss() -> None:
    try:  # "5" resets VmHWM to the current RSS, so the peak excludes the imports
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="llava convert", description="Convert between Hugging Face and Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("hf2mcore", "HF checkpoint -> Megatron-Core TP x PP shards"),
        ("mcore2mcore", "reshard Megatron-Core shards to another TP/PP"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
        p.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
        p.add_argument("--vocab-divisor", type=int, default=None, help="pad vocab to a multiple of tp x this (128)")
    sub.add_parser("mcore2hf", help="Megatron-Core shards -> HF checkpoint")
    for p in sub.choices.values():
        p.add_argument("src", help="source directory")
        p.add_argument("out", help="output directory (created; must be empty)")
        p.add_argument("--report-memory", action="store_true", help="print peak resident memory and time")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from llava.megatron.converter import mcore_convert as convert  # torch is imported here, after argument errors

    start = time.perf_counter()
    _reset_peak_rss()
    baseline = _rss_mib("VmRSS")
    try:
        if args.command == "hf2mcore":
            convert.hf_to_mcore(args.src, args.out, args.tp, args.pp, args.vpp, args.vocab_divisor or 128)
        elif args.command == "mcore2mcore":
            convert.mcore_to_mcore(args.src, args.out, args.tp, args.pp, args.vpp, args.vocab_divisor)
        else:
            convert.mcore_to_hf(args.src, args.out)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"llava convert {args.command}: error: {err}", file=sys.stderr)
        return 2
    if args.report_memory:
        peak = _rss_mib("VmHWM")
        print(
            f"peak_rss_mib={peak:.1f} baseline_rss_mib={baseline:.1f} "
            f"conversion_rss_mib={peak - baseline:.1f} seconds={time.perf_counter() - start:.2f}"
        )
    print(f"llava convert {args.command}: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(report_usage_errors(" ".join(["convert", *sys.argv[1:2]]), main))
