"""LLaVA-NeXT's published training scripts: their flag sets parse verbatim and take effect; three of them run.

    pytest tests/train/test_llava_next_scripts.py            # the runs (stage 1 + the 1.6 stage 2; finetune_ov.sh with
                                                             # its onevision.yaml, 2 ZeRO-3 processes) are marked slow

The flags below are those of LLaVA-VL/LLaVA-NeXT (commit df17966) ``LLaVA-NeXT/scripts/train/pretrain_clip.sh``,
``pretrain_siglip.sh``, ``direct_finetune_clip.sh`` (the LLaVA-NeXT 1.6 recipe, the README's ``finetune_clip.sh``),
``direct_finetune_siglip_a4.sh``, ``finetune_si.sh`` and ``finetune_ov.sh`` (the OneVision stages), and
``LLaVA-NeXT/scripts/archived/finetune_mixtral_1.6_336px_anyres.sh`` (the older 1.6 form with
``--unfreeze_mm_vision_tower``),
written as the scripts pass them (``--flag=value`` forms included). Only these change: model, data and output paths
(tiny models; a CLIP tower at 336 px and a SigLIP at 384 px so the scripts' pixel pinpoints fit them; the OneVision
data YAML is the ``onevision.yaml`` of LLaVA-NeXT's training scripts with its paths changed, in ``tests/train/data/``),
the run name
(``direct_finetune_*.sh`` pass ``--run_name $MID_RUN_NAME``, which those scripts never set), and on CPU ``--bf16`` and
``--tf32`` False, as ``tests/train/test_llava15_scripts.py`` does for LLaVA-1.5; the two runs also leave out
``--torch_compile True --torch_compile_backend inductor`` (parsed and checked, but inductor compiles for minutes on
this CPU) and use 2 DataLoader workers instead of 16.
Expected values are written out from the scripts' meaning, not read from our parser.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from llava.data.templates import get_template
from llava.errors import UsageValueError
from llava.train.args import parse_args
from tests.train.test_llava15_scripts import run_in_one_process  # the same in-process driver

REPO = Path(__file__).resolve().parents[2]
COMMON = ("--mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False "
          "--mm_use_im_patch_token False --bf16 True --per_device_eval_batch_size 4 "
          "--evaluation_strategy no --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine "
          "--logging_steps 1 --tf32 True --gradient_checkpointing True --lazy_preprocess True "
          "--report_to wandb").split()
PRETRAIN = shlex.split(
    "--deepspeed scripts/zero3.json --model_name_or_path {LLM} --version plain --data_path {CAPTIONS} "
    "--image_folder {CAPTION_IMAGES} --vision_tower {TOWER} --mm_tunable_parts=mm_mlp_adapter "
    "--output_dir {OUT}/pretrain --num_train_epochs 1 --per_device_train_batch_size 16 "
    "--gradient_accumulation_steps 1 --save_strategy no --save_steps 50000 --learning_rate 1e-3 "
    "--model_max_length 8192 --dataloader_num_workers 16 --run_name pretrain --attn_implementation sdpa")
NEXT_STAGE2 = shlex.split(
    "--deepspeed scripts/zero3.json --model_name_or_path {LLM} --version qwen_1_5 --data_path={QA} "
    "--image_folder {IMAGES} --pretrain_mm_mlp_adapter={OUT}/pretrain/mm_projector.safetensors "
    "--mm_tunable_parts=mm_vision_tower,mm_mlp_adapter,mm_language_model --mm_vision_tower_lr=2e-6 "
    "--vision_tower {TOWER} --group_by_modality_length True --image_aspect_ratio anyres "
    "--image_grid_pinpoints '[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]' "
    "--mm_patch_merge_type spatial_unpad --run_name next --output_dir {OUT}/finetune --num_train_epochs 1 "
    "--per_device_train_batch_size 4 --gradient_accumulation_steps 1 --save_strategy steps --save_steps 3000 "
    "--save_total_limit 1 --learning_rate 1e-5 --model_max_length 32768 --dataloader_num_workers 16 "
    "--torch_compile True --torch_compile_backend inductor --dataloader_drop_last True --attn_implementation sdpa")
OV_STAGE = shlex.split(
    "--deepspeed scripts/zero3.json --model_name_or_path {LLM} --version qwen_1_5 --data_path {QA} "
    "--image_folder {IMAGES} --video_folder {IMAGES} "
    "--mm_tunable_parts=mm_vision_tower,mm_mlp_adapter,mm_language_model --mm_vision_tower_lr=2e-6 "
    "--vision_tower {SIGLIP} --group_by_modality_length True --image_aspect_ratio anyres_max_9 "
    "--image_grid_pinpoints '(1x1),...,(6x6)' --mm_patch_merge_type spatial_unpad --run_name ov "
    "--output_dir {OUT}/ov --num_train_epochs 1 --per_device_train_batch_size 1 --gradient_accumulation_steps 2 "
    "--save_strategy steps --save_steps 1000 --save_total_limit 1 --learning_rate 1e-5 --model_max_length 32768 "
    "--dataloader_num_workers 4 --torch_compile True --torch_compile_backend inductor --dataloader_drop_last True "
    "--frames_upbound 32")
MIXTRAL_16 = shlex.split(
    "--deepspeed ./scripts/zero3.json --model_name_or_path {LLM} --version mistral_instruct --data_path {QA} "
    "--image_folder {IMAGES} --vision_tower {TOWER} --pretrain_mm_mlp_adapter {OUT}/pretrain/mm_projector.safetensors "
    "--group_by_modality_length True --unfreeze_mm_vision_tower True --mm_vision_tower_lr 2e-6 "
    "--image_aspect_ratio anyres "
    "--image_grid_pinpoints '[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]' "
    "--mm_patch_merge_type spatial_unpad --output_dir {OUT}/mixtral --num_train_epochs 9 "
    "--per_device_train_batch_size 8 --gradient_accumulation_steps 1 --save_strategy epoch --save_steps 1500 "
    "--learning_rate 5e-6 --model_max_length 4096 --dataloader_num_workers 8")
SCRIPTS = {  # name -> (flags beyond COMMON, tower placeholder)
    "pretrain_clip": (PRETRAIN, "TOWER"),
    "pretrain_siglip": ([a.replace("{TOWER}", "{SIGLIP}") for a in PRETRAIN], "SIGLIP"),
    "direct_finetune_clip": (NEXT_STAGE2, "TOWER"),
    "direct_finetune_siglip_a4": ([a.replace("{TOWER}", "{SIGLIP}").replace("336", "384").replace("672", "768")
                                   .replace("1008", "1152") for a in NEXT_STAGE2], "SIGLIP"),
    "finetune_si": (OV_STAGE, "SIGLIP"),
    "finetune_ov": (OV_STAGE, "SIGLIP"),
    "finetune_mixtral_1.6_336px_anyres": (MIXTRAL_16, "TOWER"),
}
CPU_SUBSTITUTIONS = {"--bf16": "False", "--tf32": "False"}
NOT_RUN_ON_CPU = ("--torch_compile", "--torch_compile_backend")  # inductor compiles for minutes here: dropped to run
RUN_ON_CPU = {"--dataloader_num_workers": "2"}  # not 16 worker processes on a 2-core CI machine
FULL = {"tune_mm_mlp_adapter": False, "freeze_backbone": False, "freeze_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": True}
EXPECTED = {  # what each script asks for, per argument: (model, data, training) attributes
    "pretrain_clip": ({"tune_mm_mlp_adapter": True, "unfreeze_mm_vision_tower": False, "version": "plain",
                       "attn_implementation": "sdpa"},
                      {"image_aspect_ratio": "square"},
                      {"learning_rate": 1e-3, "per_device_train_batch_size": 16, "model_max_length": 8192,
                       "save_strategy": "no", "dataloader_num_workers": 16, "run_name": "pretrain"}),
    "direct_finetune_clip": ({**FULL, "version": "qwen_1_5", "mm_patch_merge_type": "spatial_unpad"},
                             {"image_aspect_ratio": "anyres"},
                             {"mm_vision_tower_lr": 2e-6, "learning_rate": 1e-5, "per_device_train_batch_size": 4,
                              "group_by_modality_length": True, "dataloader_drop_last": True, "save_total_limit": 1,
                              "model_max_length": 32768, "save_steps": 3000}),
    "finetune_ov": ({**FULL, "version": "qwen_1_5"}, {"image_aspect_ratio": "anyres_max_9", "frames_upbound": 32},
                    {"mm_vision_tower_lr": 2e-6, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2,
                     "group_by_modality_length": True, "dataloader_drop_last": True}),
    "finetune_mixtral_1.6_336px_anyres": (
        {"unfreeze_mm_vision_tower": True, "tune_mm_mlp_adapter": False, "freeze_backbone": False,
         "version": "mistral_instruct"},
        {"image_aspect_ratio": "anyres"},
        {"mm_vision_tower_lr": 2e-6, "learning_rate": 5e-6, "num_train_epochs": 9, "save_strategy": "epoch",
         "per_device_train_batch_size": 8, "model_max_length": 4096}),
}
EXPECTED["pretrain_siglip"] = EXPECTED["pretrain_clip"]
EXPECTED["direct_finetune_siglip_a4"] = EXPECTED["direct_finetune_clip"]
EXPECTED["finetune_si"] = EXPECTED["finetune_ov"]
# (height, width) grids in pixels, as each script's --image_grid_pinpoints means them, and anyres_max's N
NEXT_336 = [(672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336)]  # their [width, height] pairs, swapped
LAYOUTS = {"direct_finetune_clip": (NEXT_336, None),
           "direct_finetune_siglip_a4": ([(768, 384), (384, 768), (768, 768), (384, 1152), (1152, 384)], None),
           # "(1x1),...,(6x6)" is (width x height) in tower units, width outermost, as LLaVA-NeXT expands it
           "finetune_ov": ([(384 * h, 384 * w) for w in range(1, 7) for h in range(1, 7)], 9),
           "finetune_mixtral_1.6_336px_anyres": (NEXT_336, None)}
LAYOUTS["finetune_si"] = LAYOUTS["finetune_ov"]


def script_argv(name: str, paths: dict[str, str], max_steps: int | None = None) -> list[str]:
    """The script's flags with the paths filled in and CPU substitutions; to run (``max_steps``), no torch.compile."""
    argv = [a.format(**paths) for a in SCRIPTS[name][0]] + COMMON
    for i, arg in enumerate(argv[:-1]):
        if arg in CPU_SUBSTITUTIONS:
            argv[i + 1] = CPU_SUBSTITUTIONS[arg]
    if not max_steps:
        return argv
    for i, arg in enumerate(argv[:-1]):
        if arg in RUN_ON_CPU:
            argv[i + 1] = RUN_ON_CPU[arg]
    drop = {i + k for i, arg in enumerate(argv) if arg in NOT_RUN_ON_CPU for k in (0, 1)}
    return [a for i, a in enumerate(argv) if i not in drop] + ["--max_steps", str(max_steps)]


@pytest.fixture(scope="module")
def next_paths(tiny_models, shapes_data, anyres_data, tmp_path_factory) -> dict[str, str]:
    """Tiny towers at the scripts' resolutions (patch 48: 7x7 / 8x8 features per view) and the data."""
    from llava.demo.tiny_models import write_tiny_vision_tower

    out = tmp_path_factory.mktemp("llava_next_scripts")
    captions = out / "captions_16.json"  # one batch of 16: stage 1's single step sees every record once
    captions.write_text(json.dumps(json.loads(Path(shapes_data["stage1_captions"]).read_text())[:16]))
    return {"LLM": str(tiny_models["llm"]), "OUT": str(out), "CAPTIONS": str(captions),
            "CAPTION_IMAGES": str(shapes_data["image_folder"]), "QA": str(anyres_data["train"]),
            "IMAGES": str(anyres_data["image_folder"]),
            "TOWER": str(write_tiny_vision_tower(out / "clip336", image_size=336, patch_size=48, hidden_size=32)),
            "SIGLIP": str(write_tiny_vision_tower(out / "siglip384", kind="siglip", image_size=384, patch_size=48,
                                                  hidden_size=32))}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_flag_set_parses_and_takes_effect(next_paths, name, caplog):
    from transformers import AutoConfig

    from llava.model.anyres_model import anyres_layout

    argv = script_argv(name, next_paths)
    if "--video_folder" in SCRIPTS[name][0]:  # LLaVA-NeXT's default --mm_newline_position grid: refused for video
        with pytest.raises(UsageValueError, match=r"--mm_newline_position grid: .* no native class.* use one_token"):
            parse_args(argv)
        argv += ["--mm_newline_position", "one_token"]  # the one-line change: OneVision's native video layout
    with caplog.at_level("WARNING"):
        model_args, data_args, training_args = parse_args(argv)
    for args, expected in zip((model_args, data_args, training_args), EXPECTED[name]):
        assert {k: getattr(args, k) for k in expected} == expected, name
    assert (model_args.mm_vision_select_layer, model_args.mm_projector_type) == (-2, "mlp2x_gelu")
    assert training_args.deepspeed == str(REPO / "zero_configs" / "zero3.json")  # the scripts' zero3.json, bundled
    assert (training_args.eval_strategy, training_args.lr_scheduler_type, training_args.weight_decay) == (
        "no", "cosine", 0)
    assert training_args.warmup_steps == 0.03 and training_args.gradient_checkpointing
    assert training_args.report_to == ["wandb"] and not training_args.bf16
    compiled = "--torch_compile" in SCRIPTS[name][0]
    assert (training_args.torch_compile, training_args.torch_compile_backend) == (
        (True, "inductor") if compiled else (False, None))
    vision_config = AutoConfig.from_pretrained(model_args.vision_tower)
    layout = anyres_layout(data_args, getattr(vision_config, "vision_config", vision_config), "default")
    if name not in LAYOUTS:
        assert layout is None
        return
    pinpoints, max_n = LAYOUTS[name]
    assert [tuple(p) for p in layout.grid_pinpoints] == pinpoints and layout.max_num_patches == max_n
    template = get_template(model_args.version)
    assert template.name == {"qwen_1_5": "chatml", "mistral_instruct": "mistral_instruct"}[model_args.version]
    if "--video_folder" in SCRIPTS[name][0]:
        assert data_args.video_folder == next_paths["IMAGES"] and model_args.mm_newline_position == "one_token"


def test_dataset_mixture_yaml_is_read_and_video_records_parse(next_paths, tmp_path):
    mixture = tmp_path / "next_ov_stage_july21.yaml"
    mixture.write_text(f"datasets:\n  - json_path: {next_paths['QA']}\n    sampling_strategy: all\n")
    argv = script_argv("finetune_ov", {**next_paths, "QA": str(mixture)}) + ["--mm_newline_position", "one_token"]
    assert parse_args(argv)[1].data_path == str(mixture)  # read by llava/data/sources.py (tests/data/test_sources.py)
    from llava.data.records import parse_record

    video = {"id": "v1", "video": "clip.mp4", "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                                                                 {"from": "gpt", "value": "A dog runs."}]}
    record = parse_record(video)  # LLaVA-NeXT's <image> of a video record is its <video> (llava/data/video.py)
    assert (record.video, record.images, record.messages[0].content) == ("clip.mp4", [], "<video>\nWhat happens?")


@pytest.fixture(scope="module")
def next_runs(next_paths):
    """pretrain_clip.sh (1 step, square, as the script) then direct_finetune_clip.sh (2 steps) from its projector, in
    one DeepSpeed ZeRO-3 process."""
    out = Path(next_paths["OUT"])
    argvs = [script_argv("pretrain_clip", next_paths, 1), script_argv("direct_finetune_clip", next_paths, 2)]
    log = run_in_one_process(argvs, out)
    return {"dir": out, "log": log}


@pytest.mark.slow
def test_next_recipe_runs_and_saves_native_llava_next(next_runs, next_paths):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoProcessor, CLIPVisionModel, LlavaNextForConditionalGeneration

    out = next_runs["dir"]
    assert set(load_file(out / "pretrain" / "mm_projector.safetensors")) == {  # square stage 1: no image_newline
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert "has no image_newline (stage 1 ran without anyres" in next_runs["log"]
    finetune = out / "finetune"
    config = json.loads((finetune / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["image_grid_pinpoints"] == [list(p) for p in LAYOUTS["direct_finetune_clip"][0]]
    assert config["vision_feature_layer"] == -2
    args = json.loads((finetune / "llava_args.json").read_text())["training_args"]
    assert args["dataloader_drop_last"] and args["group_by_modality_length"] and args["mm_vision_tower_lr"] == 2e-6
    assert type(AutoProcessor.from_pretrained(finetune)).__name__ == "LlavaNextProcessor"
    model = LlavaNextForConditionalGeneration.from_pretrained(finetune)

    def largest_change(trained: torch.nn.Module, initial: torch.nn.Module) -> float:
        before = dict(initial.named_parameters())  # the embeddings grew by the added <image> token: rows in both
        return max((p.detach()[:len(before[n])] - before[n].detach()).abs().max().item()
                   for n, p in trained.named_parameters())

    # warmup_ratio 0.03 of 2 steps is 1 warmup step at lr 0, then one at the peak; Adam's step-2 update is at most
    # ~1.0014 x lr per weight. So the tower moved by <= its 2e-6 (its own group), the LM by up to the 1e-5.
    tower = largest_change(model.model.vision_tower, CLIPVisionModel.from_pretrained(next_paths["TOWER"]))
    lm = largest_change(model.model.language_model, AutoModelForCausalLM.from_pretrained(next_paths["LLM"]).model)
    assert 0 < tower <= 2e-6 * 1.1, tower
    assert 4e-6 < lm <= 1e-5 * 1.1, lm


# --- finetune_ov.sh with its data: LLaVA-NeXT's onevision.yaml, paths changed (tests/train/data/onevision.yaml)
OV_YAML = Path(__file__).parent / "data" / "onevision.yaml"
VIDEO_FILES = ("academic_source_30s_v1_all.json", "0718_0_30_s_academic_mc_v0_1_all.json", "sharegpt4video_255000.json")


def _ov_entries() -> list[dict]:
    import yaml

    return yaml.safe_load(OV_YAML.read_text())["datasets"]


def write_ov_mixture(root: Path, next_paths: dict[str, str], *, video: bool) -> Path:
    """The YAML beside tiny files at each of its paths: the anyres records (images only) in every image entry (JSONL
    where the YAML names .jsonl), video records in its three video entries; ``video=False`` leaves those entries out."""
    records = [r for r in json.loads(Path(next_paths["QA"]).read_text()) if "image" in r or "images" in r]
    text = OV_YAML.read_text()
    for entry in _ov_entries():
        path = root / entry["json_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = records
        if path.name in VIDEO_FILES:
            rows = [{"id": f"{path.stem}-v{i}", "video": f"v{i}.mp4", "conversations": [
                {"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "A dog runs."}]}
                for i in range(2)]
        path.write_text("\n".join(json.dumps(r) for r in rows) if path.suffix == ".jsonl" else json.dumps(rows))
    if not video:
        lines = text.splitlines()
        drop = {i + k for i, line in enumerate(lines) if any(v in line for v in VIDEO_FILES) for k in (0, 1)}
        text = "\n".join(line for i, line in enumerate(lines) if i not in drop) + "\n"
    out = root / ("onevision.yaml" if video else "onevision_images.yaml")
    out.write_text(text)
    return out


def test_onevision_yaml_video_entries_are_read_and_missing_videos_name_the_entry(next_paths, tmp_path):
    """The YAML's three video entries parse as video records (no refusal since video landed); their clips are not in
    the tiny test data, so each taken video record is reported as ``video_missing``, its message naming the entry."""
    from transformers import AutoConfig, AutoTokenizer

    from llava.data.dataset import LazySupervisedDataset
    from llava.data.validate import DataError
    from llava.data.video_flags import video_layout_from_flags
    from llava.model.builder import add_multimodal_tokens

    mixture = write_ov_mixture(tmp_path, next_paths, video=True)
    argv = script_argv("finetune_ov", {**next_paths, "QA": str(mixture)}) + ["--mm_newline_position", "one_token"]
    model_args, data_args, _ = parse_args(argv)
    assert data_args.data_path == str(mixture) and data_args.video_folder == next_paths["IMAGES"]
    tower = AutoConfig.from_pretrained(model_args.vision_tower)
    layout = video_layout_from_flags(model_args, data_args, getattr(tower, "vision_config", tower))
    tok = AutoTokenizer.from_pretrained(next_paths["LLM"])
    add_multimodal_tokens(tok, False, video=True)
    kwargs = dict(template=get_template("qwen_1_5"), image_processor=None, image_folder=next_paths["IMAGES"],
                  image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=64, model_max_length=32768,
                  show_progress=False, index_cache_dir=None, video=layout, video_folder=data_args.video_folder,
                  video_token_id=tok.convert_tokens_to_ids("<video>"))
    entries = {Path(e["json_path"]).name: k for k, e in enumerate(_ov_entries(), 1)}
    with pytest.raises(DataError) as info:
        LazySupervisedDataset(mixture, tok, **kwargs)
    first = VIDEO_FILES[0]
    assert (f"entry {entries[first]} (llava_instruct/real_vision_flan/{first}): record "
            f"'{Path(first).stem}-v0': ") in str(info.value) and "video_missing" in str(info.value)
    ds = LazySupervisedDataset(mixture, tok, on_bad_sample="skip", **kwargs)
    assert dict(ds.problems.counts) == {"video_missing": 2 * len(VIDEO_FILES)}  # every video entry is "all"
    assert not any(ds.record(i).video for i in range(len(ds)))
    assert all("v0.mp4" in m or "v1.mp4" in m for m in ds.problems.examples["video_missing"])


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_ov_runs_with_its_yaml_two_processes_zero3(next_paths, tmp_path):
    """finetune_ov.sh's flags and YAML (its video entries left out: the tiny test data has no clips for them), 2 steps in 2 DeepSpeed ZeRO-3
    processes; the mixture's size is the sum of LLaVA-NeXT's per-entry counts, computed here."""
    import math

    from tests.train.test_distributed import PROBE, deepspeed, step_losses

    mixture = write_ov_mixture(tmp_path, next_paths, video=False)
    out = tmp_path / "ov"
    argv = script_argv("finetune_ov", {**next_paths, "QA": str(mixture), "OUT": str(tmp_path)}, max_steps=2)
    argv += ["--mm_newline_position", "one_token"]  # LLaVA-NeXT's default grid is refused with --video_folder
    log = deepspeed([PROBE], argv, timeout=900)
    assert sorted(step_losses(out)) == [1, 2]
    n = len([r for r in json.loads(Path(next_paths["QA"]).read_text()) if "image" in r or "images" in r])
    expected = 0
    for entry in _ov_entries():
        if Path(entry["json_path"]).name in VIDEO_FILES:
            continue
        strategy = str(entry.get("sampling_strategy", "all"))
        amount = strategy.partition(":")[2]
        expected += n if strategy == "all" else min(n, math.ceil(int(amount[:-1]) * n / 100) if amount.endswith("%")
                                                   else int(amount))
    total = next(line.split() for line in log.splitlines() if line.startswith("total "))
    assert total[2] == f"{expected:,}" and total[3] == f"{expected:,}", total  # taken, trainable
    assert json.loads((out / "llava_args.json").read_text())["data_args"]["data_path"] == str(mixture)
    assert (out / "config.json").is_file()
