"""The ``llava`` command.

    llava demo [--workdir DIR]                              # the whole pipeline on the embedded tiny default
    llava demo --anyres True [--workdir DIR]                # high resolution: pad vs anyres where detail matters
    llava train --model_name_or_path ... (LLaVA flags)      # = python -m llava.train.train
    llava data check --data_path ... (the same flags)       # validate data + statistics before training; --json
    llava predict --model DIR --image X.png --prompt "..."
    llava eval --model DIR --data heldout.json --image_folder DIR [--blank_images]
    llava convert hf2mcore|mcore2hf ...                     # optional Megatron path (pip install .[megatron])
    llava merge --adapter RUN_DIR --out DIR [--dtype bfloat16] [--max_shard_size 2GB]   # LoRA -> native Llava
    llava import-llava --src ORIGINAL_LLAVA_DIR --out DIR   # original LLaVA checkpoint -> native Llava
"""

from __future__ import annotations

import argparse
import sys


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="answer a question about an image")
    p.add_argument("--model", required=True, help="a Llava checkpoint directory written by `llava train`")
    p.add_argument("--image", default=None, help="image file (omit for a text-only question)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--version", default=None, help="template override (for checkpoints without llava_args.json)")
    p.add_argument("--max_new_tokens", type=int, default=64)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="exact-match accuracy on held-out records, per question type")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="LLaVA JSON/JSONL; the last gpt turn of each record is the gold")
    p.add_argument("--image_folder", default=None)
    p.add_argument("--version", default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--blank_images", action="store_true", help="also score with every image blanked")
    p.add_argument("--json", action="store_true", help="also print the accuracies as JSON")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from llava.train.train import train

        train(argv[1:])
        return 0
    if argv[0:2] == ["data", "check"]:
        from llava.data.check import check_main

        return check_main(argv[2:])
    if argv and argv[0] == "convert":
        from llava.megatron.cli import main as convert_main

        return convert_main(argv[1:])

    from llava.demo.run import add_demo_arguments

    parser = argparse.ArgumentParser(prog="llava", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train (stage 1 or 2); takes the original LLaVA flags")
    sub.add_parser("data", help="data check: validate a dataset with the training flags")
    sub.add_parser("convert", help="Megatron-Core conversion: hf2mcore | mcore2hf")
    add_demo_arguments(sub.add_parser("demo", help="run the tiny end-to-end demo"))
    _predict_parser(sub)
    _eval_parser(sub)
    from llava.export.import_llava import add_import_arguments
    from llava.export.merge import add_merge_arguments

    add_merge_arguments(sub.add_parser("merge", help="merge a LoRA/QLoRA run into a native Llava checkpoint"))
    add_import_arguments(sub.add_parser("import-llava", help="convert an original LLaVA checkpoint"))
    args = parser.parse_args(argv)
    if args.command == "merge":
        from llava.export.merge import merge_main

        return merge_main(args)
    if args.command == "import-llava":
        from llava.export.import_llava import import_main

        return import_main(args)
    if args.command == "demo":
        from llava.demo.run import demo_main

        return demo_main(args)
    if args.command == "predict":
        from llava.serve.predict import predict_main

        return predict_main(args)
    from llava.serve.eval import eval_main

    return eval_main(args)


if __name__ == "__main__":
    sys.exit(main())
