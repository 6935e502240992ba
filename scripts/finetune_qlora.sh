#!/usr/bin/env bash
# Stage 2 with QLoRA: the LLM's linear layers quantized to 4 bit (bitsandbytes nf4; vision tower, projector and
# lm_head kept unquantized), LoRA adapters trained on top; ZeRO-2 (quantized weights are not partitioned).
#   bash scripts/finetune_qlora.sh                             # tiny demo models + shapes Q&A, 2 CPU processes
#   llava merge --adapter runs/finetune_qlora --out runs/merged  # dequantize, merge, native Llava checkpoint
set -euo pipefail
export ZERO="${ZERO:-zero2}" OUT="${OUT:-${OUT_ROOT:-runs}/finetune_qlora}" QLORA_ARGS="${QLORA_ARGS:---bits 4}"
exec bash "$(dirname "$0")/finetune_lora.sh"
