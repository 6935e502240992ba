"""`llava demo`: the whole pipeline on the embedded tiny default, in a few minutes on a 2-core CPU.

    llava demo --workdir demo_workdir

1. draw the synthetic shapes dataset (stage-1 captions, stage-2 multi-turn Q&A, held-out questions);
2. write a tiny CLIP vision tower and a tiny Llama + tokenizer as ordinary Hugging Face directories;
3. stage 1: train the projector only on captions (``--tune_mm_mlp_adapter``);
4. stage 2: full fine-tune (vision tower frozen) on the Q&A, starting from the stage-1 projector;
5. evaluate held-out accuracy per question type, with real images and with every image blanked, and write the
   evaluation page (``WORKDIR/report/index.html``: every question with its image, the reference and both answers).

The training steps call ``llava.train.train.train`` with the same flags a user passes on the command line.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from llava.errors import UsagePathError, UsageValueError
from llava.run_dir import PROJECTOR_FILE


@dataclass
class DemoConfig:
    n_caption: int = 1000
    n_qa: int = 2000
    n_heldout: int = 400
    stage1_epochs: float = 1
    stage2_epochs: float = 8
    batch_size: int = 16
    stage1_lr: float = 1e-3
    stage2_lr: float = 1e-3
    seed: int = 0
    report_to: str = "none"
    lora: bool = False  # stage 2 with LoRA on every LM linear, then `llava merge`
    lora_r: int = 64
    lora_alpha: int = 16
    lora_lr: float = 2e-3  # the adapters' learning rate; the projector trains at stage2_lr

    def __post_init__(self):
        positive = [n for n in ("n_caption", "n_qa", "n_heldout", "stage1_epochs", "stage2_epochs", "batch_size",
                                "stage1_lr", "stage2_lr", "lora_r", "lora_alpha", "lora_lr") if not getattr(self, n) > 0]
        if positive:
            raise UsageValueError(", ".join(f"--{n} {getattr(self, n)}" for n in positive) + ": must be > 0")
        if self.report_to not in ("none", "wandb", "tensorboard"):
            raise UsageValueError(f"--report_to {self.report_to}: use none, wandb or tensorboard")


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(workdir: str | Path, cfg: DemoConfig | None = None) -> dict[str, dict[str, float]]:
    # `llava --help` builds this module's parser: torch loads only when the demo runs
    from llava.demo.shapes import generate_shapes_dataset
    from llava.demo.tiny_models import write_demo_models
    from llava.report.eval_page import write_eval_report
    from llava.serve.eval import evaluate, format_table
    from llava.serve.predict import Predictor
    from llava.train.train import train

    cfg = cfg or DemoConfig()
    workdir = Path(workdir)
    t0 = time.time()
    _banner("1/5 drawing the synthetic shapes dataset")
    data = generate_shapes_dataset(workdir / "data", n_caption=cfg.n_caption, n_qa=cfg.n_qa,
                                   n_heldout=cfg.n_heldout, seed=cfg.seed)
    _banner("2/5 writing a tiny CLIP vision tower and a tiny Llama with a tokenizer trained on the corpus")
    models = write_demo_models(workdir, data, seed=cfg.seed)
    common = [
        "--model_name_or_path", str(models["llm"]), "--vision_tower", str(models["vision_tower"]),
        "--image_folder", str(data["image_folder"]), "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2", "--model_max_length", "256",
        "--per_device_train_batch_size", str(cfg.batch_size), "--logging_steps", "20", "--save_strategy", "no",
        "--report_to", cfg.report_to, "--seed", str(cfg.seed), "--use_cpu", "True", "--dataloader_num_workers", "0",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "0.03",
    ]
    _banner("3/5 stage 1: projector alignment on captions (--tune_mm_mlp_adapter True)")
    stage1 = workdir / "out" / "pretrain"
    train(common + ["--version", "plain", "--data_path", str(data["stage1_captions"]), "--tune_mm_mlp_adapter",
                    "True", "--num_train_epochs", str(cfg.stage1_epochs), "--learning_rate", str(cfg.stage1_lr),
                    "--output_dir", str(stage1)])
    kind = "LoRA (projector trained fully, then merged)" if cfg.lora else "full fine-tune"
    _banner(f"4/5 stage 2: {kind} on multi-turn Q&A (vision tower frozen)")
    stage2 = workdir / "out" / ("finetune_lora" if cfg.lora else "finetune")
    lora = ["--lora_enable", "True", "--lora_r", str(cfg.lora_r), "--lora_alpha", str(cfg.lora_alpha),
            "--lora_dropout", "0", "--mm_projector_lr", str(cfg.stage2_lr)] if cfg.lora else []
    train(common + lora + ["--version", "vicuna_v1", "--data_path", str(data["stage2_qa"]),
                           "--pretrain_mm_mlp_adapter", str(stage1 / PROJECTOR_FILE),
                           "--image_aspect_ratio", "pad", "--group_by_modality_length", "True",
                           "--num_train_epochs", str(cfg.stage2_epochs),
                           "--learning_rate", str(cfg.lora_lr if cfg.lora else cfg.stage2_lr),
                           "--output_dir", str(stage2)])
    if cfg.lora:
        # `llava --help` imports this module: torch loads only when the demo runs
        from llava.export.merge import merge_lora

        stage2 = merge_lora(stage2, workdir / "out" / "merged")
    _banner("5/5 held-out accuracy (exact match), real images vs blank images")
    predictor = Predictor.load(stage2)
    results = {
        "real images": evaluate(predictor, str(data["heldout_qa"]), str(data["image_folder"])),
        "blank images": evaluate(predictor, str(data["heldout_qa"]), str(data["image_folder"]), blank_images=True),
    }
    rows = {name: result.accuracy() for name, result in results.items()}
    print(format_table(rows))
    print(f"chance: colour 25%, shape 33%, position 25%, count 33%; total time {time.time() - t0:.0f} s")
    page = write_eval_report(workdir / "report", results, image_folder=str(data["image_folder"]), model=stage2,
                             data=data["heldout_qa"], title="llava demo: held-out questions")
    print(f"evaluation page (open it in a browser): {page}")
    (workdir / "demo_results.json").write_text(json.dumps({"accuracy": rows, "seconds": time.time() - t0}, indent=2))
    return rows


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    parser.add_argument("--workdir", default="demo_workdir", help="where data, models and outputs go")
    parser.add_argument("--anyres", type=_bool, default=False, metavar="BOOL",
                        help="the high-resolution demo instead (llava/demo/fine_detail.py): pad vs anyres")
    parser.add_argument("--dpo", type=_bool, default=False, metavar="BOOL",
                        help="the preference-tuning demo instead (llava/demo/preference_demo.py): SFT vs DPO")
    parser.add_argument("--video", type=_bool, default=False, metavar="BOOL",
                        help="the video demo instead (llava/demo/time_order.py): clips vs single frames")
    for name, value in vars(defaults).items():
        kind = _bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name}", type=kind, default=value, metavar=kind.__name__.strip("_").upper())


def _bool(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def demo_main(args: argparse.Namespace) -> int:
    if Path(args.workdir).is_file():
        raise UsagePathError(f"--workdir {args.workdir} is a file; give a directory (created if missing)")
    try:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsagePathError(f"--workdir {args.workdir}: cannot create it ({err.strerror}); give a writable "
                             f"directory") from err
    if getattr(args, "dpo", False):
        from llava.demo.preference_demo import run_dpo_demo  # imports torch: only when the demo runs

        run_dpo_demo(args.workdir, seed=args.seed)
        return 0
    if getattr(args, "video", False):
        from llava.demo.time_order import VideoDemoConfig, run_video_demo  # imports torch: only when it runs

        run_video_demo(args.workdir, VideoDemoConfig(seed=args.seed))
        return 0
    if args.anyres:
        # `llava --help` imports this module: torch loads only when the demo runs
        from llava.demo.fine_detail import run_anyres_demo

        run_anyres_demo(args.workdir)
        return 0
    cfg = DemoConfig(**{k: getattr(args, k) for k in vars(DemoConfig())})
    run_demo(args.workdir, cfg)
    return 0
