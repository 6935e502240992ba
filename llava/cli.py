"""The ``llava`` command.

    llava demo [--workdir DIR]                              # the whole pipeline on the embedded tiny default
    llava demo --anyres True [--workdir DIR]                # high resolution: pad vs anyres where detail matters
    llava train --model_name_or_path ... (LLaVA flags)      # = python -m llava.train.train; --help lists them grouped
    llava dpo --model_name_or_path SFT_RUN --data_path pairs.json ... # = llava train --training_stage dpo (DPO / IPO)
    llava data check --data_path ... (the same flags)       # validate data + statistics before training; --json
                                                            # --report DIR: the same as an HTML page
    llava predict --model DIR --image X.png --prompt "..."
    llava eval --model DIR --data heldout.json --image_folder DIR [--blank_images] [--report DIR]
                                                            # --data: JSON/JSONL/Parquet; --video_folder DIR: videos
    llava convert hf2mcore|mcore2hf|mcore2mcore ...         # optional Megatron path (pip install .[megatron])
    llava merge --adapter RUN_DIR --out DIR [--dtype bfloat16] [--max_shard_size 2GB]   # LoRA -> native Llava
    llava import-llava --src ORIGINAL_LLAVA_DIR --out DIR   # original LLaVA-1.5/1.6/OneVision -> native checkpoint
    llava plot RUN_DIR [RUN_DIR ...] [--out curves.png]     # training curves of several runs on one figure

A mistake in the input (a missing path, flag or value, bad data) is one line on stderr, `llava CMD: error: ...`,
with exit code 2; `llava --debug CMD ...` or LLAVA_DEBUG=1 shows its traceback. Help never imports torch.
"""

from __future__ import annotations

import argparse
import sys

from llava.errors import ArgumentParser, UsageError, debug_requested, report_usage_errors

COMMANDS = ("train", "dpo", "data", "convert", "demo", "predict", "eval", "merge", "import-llava", "plot")
CONVERT_COMMANDS = ("hf2mcore", "mcore2hf", "mcore2mcore")


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def shard_size(text: str) -> str:
    """argparse type: a shard size as ``save_pretrained`` takes it (2GB, 500MB, 1GiB, bytes); kept as given."""
    from llava.safetensors_io import parse_size  # when the command runs (argparse converts after --help exits)

    try:
        ok = parse_size(text) > 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or 1GiB, got {text!r}")
    return text


def _demo_parser(sub) -> None:
    from llava.demo.run import add_demo_arguments  # the DemoConfig fields; torch is imported only to run

    add_demo_arguments(sub.add_parser("demo", help="run the tiny end-to-end demo (a few minutes on a CPU)"))


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="answer a question about an image")
    p.add_argument("--model", required=True, help="a Llava checkpoint directory written by `llava train`")
    p.add_argument("--image", default=None, help="image file (omit for a text-only question)")
    p.add_argument("--video", default=None, help="video file or directory of frames (LlavaOnevision / "
                                                 "LlavaNextVideo checkpoints; frames sampled as the run sampled them)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--version", default=None, help="template override (for checkpoints without llava_args.json)")
    p.add_argument("--max_new_tokens", type=positive_int, default=64)
    _video_sampling_arguments(p)


def _true_false(text: str) -> bool:
    """argparse type: True/False as the training flags write them (also 1/0, yes/no)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value


def _video_sampling_arguments(p) -> None:
    """The run's frame sampling flags, read from the checkpoint's llava_args.json; given here, they replace it."""
    g = p.add_argument_group("video frame sampling (default: the checkpoint's run)")
    g.add_argument("--frames_upbound", type=int, default=None, help="at most this many frames (0: no cap)")
    g.add_argument("--video_fps", type=float, default=None, help="frames per second sampled before the cap")
    g.add_argument("--force_sample", type=_true_false, default=None, help="always --frames_upbound frames, evenly")
    g.add_argument("--add_time_instruction", type=_true_false, default=None, help="state the frame times in the prompt")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="exact-match accuracy on held-out records, per question type")
    p.add_argument("--model", required=True, help="a Llava checkpoint directory written by `llava train`")
    p.add_argument("--data", required=True, help="LLaVA JSON/JSONL; the last gpt turn of each record is the gold")
    p.add_argument("--image_folder", default=None)
    p.add_argument("--video_folder", default=None, help="the directory the records' video paths are relative to "
                   "(LlavaOnevision / LlavaNextVideo checkpoints)")
    p.add_argument("--version", default=None)
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--blank_images", action="store_true", help="also score with every image blanked")
    p.add_argument("--json", action="store_true", help="also print the accuracies as JSON")
    p.add_argument("--report", default=None, metavar="DIR", help="also write an HTML page of every sample: images, "
                   "question, reference, answers (DIR/index.html, thumbnails beside it)")
    _video_sampling_arguments(p)


def _merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA/QLoRA run into a native Llava checkpoint")
    p.add_argument("--adapter", required=True, help="output directory of a --lora_enable run")
    p.add_argument("--out", required=True, help="where to write the merged Llava checkpoint")
    p.add_argument("--dtype", default="float32", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--max_shard_size", type=shard_size, default="2GB")
    p.add_argument("--model_base", default=None, help="override the base LLM / Llava path recorded in the run")
    p.add_argument("--in_memory", action="store_true", help="merge the whole model in memory instead of streaming")


def _import_parser(sub) -> None:
    p = sub.add_parser("import-llava", help="convert an original LLaVA / LLaVA-NeXT / OneVision checkpoint")
    p.add_argument("--src", required=True, help="original LLaVA / LLaVA-NeXT / OneVision checkpoint directory "
                   "(llava_llama, llava_mistral, llava_qwen)")
    p.add_argument("--out", required=True)
    p.add_argument("--version", default=None, help="conversation template the model was trained with (default: "
                   "chatml for a Qwen2 LLM, else vicuna_v1)")
    p.add_argument("--vision_tower", default=None, help="override config.json's mm_vision_tower (a local directory)")
    p.add_argument("--max_shard_size", type=shard_size, default="5GB")


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="loss, learning rate and grad norm of one or more runs on one figure")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--output_dir of `llava train` runs")
    p.add_argument("--out", default="curves.png", help="the picture to write (PNG; default: curves.png)")


def build_parser() -> ArgumentParser:
    """The top-level parser; ``train``, ``data`` and ``convert`` only appear here (they parse their own flags)."""
    parser = ArgumentParser(prog="llava", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors too (or LLAVA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="train (stage 1 or 2); takes the original LLaVA flags", add_help=False)
    sub.add_parser("dpo", help="preference tuning (DPO / IPO) with LLaVA-NeXT's flags: llava train --training_stage dpo",
                   add_help=False)
    sub.add_parser("data", help="data check: validate a dataset with the training flags", add_help=False)
    sub.add_parser("convert", help="Megatron-Core conversion: hf2mcore | mcore2hf | mcore2mcore", add_help=False)
    _demo_parser(sub)
    _predict_parser(sub)
    _eval_parser(sub)
    _merge_parser(sub)
    _import_parser(sub)
    _plot_parser(sub)
    return parser


def command_name(argv: list[str]) -> str:
    """``train``, ``data check``, ``convert hf2mcore``, ... as the error line names it ("" before a command)."""
    if not argv or argv[0] not in COMMANDS:
        return ""
    if argv[0] == "data" and argv[1:2] == ["check"]:
        return "data check"
    if argv[0] == "convert" and argv[1:2] and argv[1] in CONVERT_COMMANDS:
        return f"convert {argv[1]}"
    return argv[0]


def run_command(argv: list[str]) -> int:
    """Dispatch to the subcommand; imports its module only now (so ``--help`` and argument errors stay fast)."""
    head, rest = (argv[0], argv[1:]) if argv else (None, [])
    if head in ("train", "dpo"):
        if "-h" in rest or "--help" in rest:
            # the stored table: `llava train --help` imports no torch
            from llava.train.flag_help import train_help

            print(train_help(), end="")
            return 0
        # imported when the command runs: `llava --help` and argument errors stay free of torch
        from llava.train.distributed import finish_distributed_process
        from llava.train.train import train

        if head == "dpo":
            from llava.train.train_dpo import dpo_argv  # imports torch: only when the command runs

            rest = dpo_argv(rest)
        train(rest)
        finish_distributed_process()
        return 0
    if head == "data":
        if rest[:1] in (["-h"], ["--help"]):
            print("usage: llava data check --data_path FILE --model_name_or_path DIR [flags]  (see --help of it)")
            return 0
        if rest[:1] != ["check"]:
            raise UsageError(f"unknown data command {' '.join(rest[:1]) or '(none)'}: use `llava data check ...`")
        if any(arg == "--report" or arg.startswith("--report=") for arg in rest[1:]):
            # imported when the command runs: `llava --help` and argument errors stay free of torch
            from llava.report.check_page import check_report_main

            return check_report_main(rest[1:])
        # imported when the command runs: `llava --help` and argument errors stay free of torch
        from llava.data_check import check_main

        return check_main(rest[1:])
    if head == "convert":
        # imported when the command runs: `llava --help` and argument errors stay free of torch
        from llava.megatron.converter.convert_cli import main as convert_main

        return convert_main(rest)

    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (`llava {args.command} --help` lists the flags)")
    if args.command == "merge":
        # imported when the command runs: `llava --help` and argument errors stay free of torch
        from llava.export.merge import merge_main

        return merge_main(args)
    if args.command == "import-llava":
        # imported when the command runs: `llava --help` and argument errors stay free of torch
        from llava.export.import_llava import import_main

        return import_main(args)
    if args.command == "demo":
        # imported when the command runs: `llava --help` and argument errors stay free of torch
        from llava.demo.run import demo_main

        return demo_main(args)
    if args.command == "plot":
        # imported when the command runs: `llava --help` and argument errors stay free of matplotlib
        from llava.curves import plot_main

        return plot_main(args)
    if args.command == "predict":
        # imported when the command runs: `llava --help` and argument errors stay free of torch
        from llava.serve.predict import predict_main

        return predict_main(args)
    if args.report:
        # imported when the command runs: `llava --help` and argument errors stay free of torch
        from llava.report.eval_page import eval_report_main

        return eval_report_main(args)
    # imported when the command runs: `llava --help` and argument errors stay free of torch
    from llava.serve.eval import eval_main

    return eval_main(args)


def main(argv: list[str] | None = None) -> int:
    """Run ``llava ARGV``; an input error is printed as one line and returns 2 (raised under --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested()
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    return report_usage_errors(command_name(argv), lambda: run_command(argv), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
