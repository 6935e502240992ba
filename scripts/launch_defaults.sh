# Sourced by scripts/{pretrain,finetune,finetune_lora,finetune_qlora}.sh: every setting comes from an environment
# variable; the defaults run the tiny demo models on the synthetic shapes data on 2 CPU processes (gloo), and are
# built into playground/ on first use (seconds, nothing downloaded).
#   LLM             language model dir (or a Llava checkpoint)       default playground/models/tiny-llama
#   VISION_TOWER    CLIP / SigLIP vision tower dir                   default playground/models/tiny-clip-vision
#   DATA_DIR        image folder + LLaVA JSON                         default playground/data/shapes
#   OUT_ROOT        where runs are written                           default runs
#   NUM_GPUS        processes per node                                default 2 (on CPU: processes, gloo)
#   HOSTFILE        DeepSpeed hostfile for several nodes (optional; see docs/training.md, "Distributed")
#   ZERO            zero1 | zero2 | zero3 | zero3_offload (zero_configs/*.json)
#   BF16            True on GPUs that support it; False on CPU        default False
#   MAX_STEPS       -1 = full epochs                                  default -1
#   MASTER_PORT     rendezvous port                                   default 29500
#   WORKERS         DataLoader workers per process (LLaVA uses 4)     default 0
#   REPORT_TO       wandb (offline unless WANDB_MODE=online) | none   default wandb
#   EXTRA_ARGS      appended to the training flags (e.g. "--save_steps 2 --resume_from_checkpoint True")
# Paths are taken as given (relative ones from where you run the script); the defaults live in the repository.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python)}"
DEEPSPEED="${DEEPSPEED:-$(dirname "$PYTHON")/deepspeed}"
[ -x "$DEEPSPEED" ] || DEEPSPEED=deepspeed
DATA_DIR="${DATA_DIR:-$REPO/playground/data/shapes}"
LLM="${LLM:-$REPO/playground/models/tiny-llama}"
VISION_TOWER="${VISION_TOWER:-$REPO/playground/models/tiny-clip-vision}"
OUT_ROOT="${OUT_ROOT:-runs}"
NUM_GPUS="${NUM_GPUS:-2}"
BF16="${BF16:-False}"
MAX_STEPS="${MAX_STEPS:--1}"
MASTER_PORT="${MASTER_PORT:-29500}"
WORKERS="${WORKERS:-0}"
REPORT_TO="${REPORT_TO:-wandb}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false

if [ "$DATA_DIR" = "$REPO/playground/data/shapes" ] && [ ! -f "$DATA_DIR/stage2_qa.json" ]; then
  "$PYTHON" "$REPO/playground/make_demo_data.py" --out "$DATA_DIR"
fi
if [ "$LLM" = "$REPO/playground/models/tiny-llama" ] && [ ! -f "$LLM/config.json" ]; then
  "$PYTHON" "$REPO/playground/make_tiny_models.py" --data "$DATA_DIR" --workdir "$REPO/playground"
fi

# deepspeed [--hostfile H] --num_gpus N --master_port P --module llava.train.train <flags>
launch() {
  local hosts=()
  [ -n "${HOSTFILE:-}" ] && hosts=(--hostfile "$HOSTFILE")
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
  "$DEEPSPEED" "${hosts[@]}" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module llava.train.train "$@" $EXTRA_ARGS
}
