"""Two processes on CPU (gloo): DeepSpeed ZeRO-2/3 and torchrun, the launcher scripts, exact resume, invariance.

Each test launches real processes (``deepspeed --num_gpus 2``, ``torchrun --nproc_per_node 2`` or a
``scripts/*.sh`` launcher) on the tiny models; ``tests/train/distributed_probe.py`` is the entry point where a test
needs to see inside the ranks. Losses are read from ``trainer_state.json`` (every step logged).

    .venv/bin/pytest tests/train/test_distributed.py          # ~4 min on 2 cores
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava.train.train import train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROBE = str(REPO / "tests" / "train" / "distributed_probe.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], *, env: dict | None = None, timeout: int = 300) -> str:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
                "PYTHON": sys.executable, **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd[:4])}... exited {proc.returncode}:\n{out[-6000:]}"
    return out


def deepspeed(entry: list[str], flags: list[str], *, processes: int = 2, **kw) -> str:
    port = free_port()
    out = launch([str(BIN / "deepspeed"), "--num_gpus", str(processes), "--master_port", str(port), *entry, *flags],
                 **kw)
    # DeepSpeed's CPU all-reduce makes one /dev/shm segment per rank, named by the port; the run released them
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "shm segments left behind"
    return out


def torchrun(entry: list[str], flags: list[str], **kw) -> str:
    return launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *entry, *flags],
                  **kw)


def script(name: str, out_root: Path, tiny_models, shapes_data, **env) -> str:
    base = {"LLM": str(tiny_models["llm"]), "VISION_TOWER": str(tiny_models["vision_tower"]),
            "DATA_DIR": str(shapes_data["image_folder"]), "OUT_ROOT": str(out_root), "REPORT_TO": "none",
            "MASTER_PORT": str(free_port())}
    return launch(["bash", f"scripts/{name}.sh"], env={**base, **{k: str(v) for k, v in env.items()}})


def step_losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def probes(run_dir: Path, processes: int = 2) -> list[dict]:
    return [json.loads((run_dir / f"probe_rank{r}.json").read_text()) for r in range(processes)]


def assert_resumes_exactly(run_dir: Path, rerun, steps: int = 4) -> None:
    """Delete the last checkpoint, resume from the one at steps/2, compare the later losses (fp32: <= 1e-6)."""
    full = step_losses(run_dir)
    assert sorted(full) == list(range(1, steps + 1)), full
    assert (run_dir / f"checkpoint-{steps // 2}").is_dir()
    shutil.rmtree(run_dir / f"checkpoint-{steps}", ignore_errors=True)
    rerun()
    resumed = step_losses(run_dir)
    for step in range(steps // 2 + 1, steps + 1):
        assert abs(resumed[step] - full[step]) <= 1e-6, (step, resumed[step], full[step])


def assert_no_zero_size_tensors(root: Path) -> None:
    files = list(root.rglob("*.safetensors"))
    assert files
    for f in files:
        empty = [k for k, v in load_file(f).items() if v.numel() == 0]
        assert not empty, f"{f}: zero-size tensors {empty[:5]}"


def common(shapes_data, out: Path, *, steps: int = 4, batch: int = 2) -> list[str]:
    return ["--image_folder", str(shapes_data["image_folder"]), "--output_dir", str(out), "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_steps", str(steps // 2), "--report_to", "none", "--model_max_length", "256", "--seed", "0"]


@pytest.fixture(scope="module")
def mixed_qa(shapes_data, tmp_path_factory) -> Path:
    """24 image records and 8 text-only ones (the images' question turns without the image)."""
    records = [r for r in json.loads(Path(shapes_data["stage2_qa"]).read_text()) if "image" in r]
    text_only = []
    for r in records[24:32]:
        turns = [{**t, "value": t["value"].replace("<image>\n", "").replace("\n<image>", "")} for t in r["conversations"]]
        text_only.append({"id": f"text-{r['id']}", "conversations": turns})
    path = tmp_path_factory.mktemp("mixed") / "mixed_qa.json"
    path.write_text(json.dumps(records[:24] + text_only))
    return path


def test_zero3_stage1_partitions_shards_and_resumes(tiny_models, shapes_data, tmp_path):
    """ZeRO-3, stage 1: every rank knows its rank; large weights are empty shards outside a gather; the saved
    projector equals the gathered weights; ranks see disjoint data; 2 x batch 2 = 1 x batch 4; exact resume."""
    out = tmp_path / "zero3_stage1"
    flags = ["--deepspeed", str(REPO / "zero_configs" / "zero3.json"), "--model_name_or_path", str(tiny_models["llm"]),
             "--vision_tower", str(tiny_models["vision_tower"]), "--version", "plain",
             "--data_path", str(shapes_data["stage1_captions"]), "--tune_mm_mlp_adapter", "True",
             *common(shapes_data, out)]
    deepspeed([PROBE], flags)
    p0, p1 = probes(out)
    for r, p in enumerate((p0, p1)):
        assert (p["rank"], p["world_size"]) == (r, 2) == (p["env_rank"], p["env_world_size"])
        for name, sizes in p["partitioned"].items():
            assert sizes["local_numel"] == 0 and sizes["full_numel"] > 0, (r, name, sizes)
    assert p0["projector_equals_saved"] is True
    assert all(n > 0 for n in p0["gathered_numel"].values())
    b = p0["per_device_batch"]
    for step in range(4):  # each step: two disjoint micro-batches
        mine, theirs = set(p0["seen"][step * b:(step + 1) * b]), set(p1["seen"][step * b:(step + 1) * b])
        assert len(mine) == len(theirs) == b and not mine & theirs, step
    assert_no_zero_size_tensors(out)
    stage1_files = load_file(out / "checkpoint-2" / "mm_projector.safetensors")
    assert set(stage1_files) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}

    # the same data order in one process with batch 4 gives the same per-step losses (fp32 reduction order: 1e-5)
    single = train([*flags[2:-len(common(shapes_data, out))], *common(shapes_data, tmp_path / "single", batch=4),
                    "--use_cpu", "True"])
    reference = {e["step"]: e["loss"] for e in single.state.log_history if "loss" in e}
    for step, loss in step_losses(out).items():
        assert abs(loss - reference[step]) <= 1e-5, (step, loss, reference[step])

    assert_resumes_exactly(out, lambda: deepspeed([PROBE], [*flags, "--resume_from_checkpoint", "True"]))


def test_torchrun_modality_grouped_steps_match_one_process(tiny_models, shapes_data, mixed_qa, tmp_path):
    """torchrun (DDP on gloo), stage 2 with --group_by_modality_length: every optimizer step holds one modality
    across both ranks, the ranks' micro-batches are disjoint, and the losses equal one process with batch 4.
    Stage 1 under torchrun runs to completion too."""
    out = tmp_path / "torchrun"
    flags = ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
             "--version", "chatml", "--data_path", str(mixed_qa), "--group_by_modality_length", "True",
             *common(shapes_data, out, steps=6)]
    torchrun([PROBE], flags)
    p0, p1 = probes(out)
    assert [(p["rank"], p["world_size"]) for p in (p0, p1)] == [(0, 2), (1, 2)]
    records = json.loads(mixed_qa.read_text())
    has_image = ["image" in r for r in records]
    b = p0["per_device_batch"]
    modalities = []
    for step in range(6):
        mine, theirs = p0["seen"][step * b:(step + 1) * b], p1["seen"][step * b:(step + 1) * b]
        assert not set(mine) & set(theirs), step
        kinds = {has_image[i] for i in mine + theirs}
        assert len(kinds) == 1, f"step {step + 1} mixes modalities: {mine} {theirs}"
        modalities.append(kinds.pop())
    assert True in modalities and False in modalities, modalities  # both kinds of steps were exercised

    # stage 1 under torchrun too: both ranks train, rank 0 writes the projector
    stage1 = tmp_path / "torchrun_stage1"
    torchrun([PROBE], ["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
                       "--version", "plain", "--data_path", str(shapes_data["stage1_captions"]),
                       "--tune_mm_mlp_adapter", "True", *common(shapes_data, stage1, steps=2)])
    assert [p["rank"] for p in probes(stage1)] == [0, 1] and probes(stage1)[0]["projector_equals_saved"] is True

    single = train([*flags[:-len(common(shapes_data, out, steps=6))],
                    *common(shapes_data, tmp_path / "single", steps=6, batch=4), "--use_cpu", "True"])
    reference = {e["step"]: e["loss"] for e in single.state.log_history if "loss" in e}
    for step, loss in step_losses(out).items():
        assert abs(loss - reference[step]) <= 1e-5, (step, loss, reference[step])


def test_pretrain_script_zero2_resumes_stage1(tiny_models, shapes_data, tmp_path):
    """scripts/pretrain.sh (ZeRO-2): projector-only checkpoints (no frozen weights in the engine state) resume."""
    run = lambda extra: script("pretrain", tmp_path, tiny_models, shapes_data, MAX_STEPS=4,  # noqa: E731
                               EXTRA_ARGS=f"--save_steps 2 --save_total_limit 3 --per_device_train_batch_size 4 {extra}")
    run("")
    out = tmp_path / "pretrain"
    module_states = torch.load(out / "checkpoint-2" / "global_step2" / "mp_rank_00_model_states.pt",
                               map_location="cpu", weights_only=False)["module"]
    assert module_states and all("multi_modal_projector" in k for k in module_states), sorted(module_states)[:5]
    assert (out / "checkpoint-2" / "rng_state_1.pth").is_file()  # rank 1 saved its own RNG: it knew its rank
    assert_no_zero_size_tensors(out)
    assert_resumes_exactly(out, lambda: run("--resume_from_checkpoint True"))


def test_finetune_script_zero3_resumes_stage2(tiny_models, shapes_data, tmp_path):
    """scripts/finetune.sh (ZeRO-3, full fine-tuning): the final model loads natively; exact resume."""
    from transformers import LlavaForConditionalGeneration

    run = lambda extra: script("finetune", tmp_path, tiny_models, shapes_data, MAX_STEPS=4,  # noqa: E731
                               EXTRA_ARGS=f"--save_steps 2 --save_total_limit 3 --per_device_train_batch_size 2 --learning_rate 1e-3 {extra}")
    run("")
    out = tmp_path / "finetune"
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.numel() > 0
    assert_no_zero_size_tensors(out)
    assert_resumes_exactly(out, lambda: run("--resume_from_checkpoint True"))


def test_finetune_qlora_script_runs(tiny_models, shapes_data, tmp_path):
    """scripts/finetune_qlora.sh (4-bit LM linears, LoRA, ZeRO-2) writes an adapter that `llava merge` reads."""
    from llava.export.merge import merge_lora

    script("finetune_qlora", tmp_path, tiny_models, shapes_data, MAX_STEPS=2, LORA_R=8, LORA_ALPHA=16,
           EXTRA_ARGS="--per_device_train_batch_size 2")
    out = tmp_path / "finetune_qlora"
    run_args = json.loads((out / "llava_args.json").read_text())
    assert run_args["training_args"]["bits"] == 4 and run_args["training_args"]["lora_enable"] is True
    assert_no_zero_size_tensors(out)
    merged = merge_lora(out, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()


def test_finetune_lora_script_zero3_resumes_and_merges(tiny_models, shapes_data, tmp_path):
    """scripts/finetune_lora.sh under 2-process ZeRO-3: the saved adapter and non-LoRA trainables equal DeepSpeed's
    own consolidation of the partitions; exact resume; `llava merge` of the run (and of a checkpoint directory)
    reloads natively with the adapter model's logits (fp32, <= 1e-5)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from llava.export.merge import build_adapter_model, merge_lora

    run = lambda extra: script("finetune_lora", tmp_path, tiny_models, shapes_data, MAX_STEPS=4,  # noqa: E731
                               LORA_R=8, LORA_ALPHA=16, LR="1e-3",
                               EXTRA_ARGS=f"--save_steps 2 --save_total_limit 3 --per_device_train_batch_size 2 {extra}")
    run("")
    out = tmp_path / "finetune_lora"
    checkpoint = out / "checkpoint-2"
    consolidated = {k.replace(".default.", "."): v for k, v in get_fp32_state_dict_from_zero_checkpoint(checkpoint).items()}
    saved = {**load_file(checkpoint / "adapter_model.safetensors"),
             **{f"base_model.model.{k}": v for k, v in load_file(checkpoint / "non_lora_trainables.safetensors").items()}}
    assert set(saved) == set(consolidated)
    for key, value in saved.items():
        torch.testing.assert_close(value, consolidated[key], rtol=0, atol=0)
    assert_no_zero_size_tensors(out)
    assert_resumes_exactly(out, lambda: run("--resume_from_checkpoint True"))

    records = json.loads(Path(shapes_data["stage2_qa"]).read_text())[:2]
    for source in (out, checkpoint):
        peft_model, processor, _ = build_adapter_model(source)
        images = [Image.open(Path(shapes_data["image_folder"]) / r["image"]).convert("RGB") for r in records]
        inputs = processor(text=["<image>\nWhat colour is it?", "<image>\nHow many?"], images=images,
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = peft_model(**inputs).logits
            with peft_model.disable_adapter():
                assert (peft_model(**inputs).logits - expected).abs().max() > 1e-4  # the adapter matters
        merged_dir = merge_lora(source, tmp_path / f"merged-{source.name}")
        merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-5)
        assert_no_zero_size_tensors(merged_dir)


def test_kill_mid_save_on_two_ranks_keeps_the_previous_checkpoint(tiny_models, shapes_data, tmp_path):
    """Stage 2 full fine-tuning under ZeRO-2: SIGKILL of both ranks while checkpoint-4 is half written leaves
    checkpoint-2 the latest complete one, and --resume_from_checkpoint True continues from it."""
    import signal
    import time

    out = tmp_path / "killed"
    flags = ["--deepspeed", str(REPO / "zero_configs" / "zero2.json"), "--model_name_or_path", str(tiny_models["llm"]),
             "--vision_tower", str(tiny_models["vision_tower"]), "--version", "chatml",
             "--data_path", str(shapes_data["stage2_qa"]), *common(shapes_data, out)]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "pause_in_save", "--pause_in_save", "4:120", *flags]  # tests/train/pause_in_save.py: pause mid-save
    pythonpath = [str(REPO), str(REPO / "tests" / "train"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(pythonpath)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = out / "checkpoint-4.tmp" / "checkpoint-4" / "PAUSED"
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert marker.exists(), f"never paused in the save of checkpoint-4 (exit code {proc.poll()})"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "checkpoint-2" / "model.safetensors").is_file()

    deepspeed(["--module", "llava.train.train"], [*flags, "--resume_from_checkpoint", "True"])
    assert sorted(step_losses(out)) == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / "trainer_state.json").is_file() and not (out / "checkpoint-4.tmp").exists()
