#!/usr/bin/env bash
# Stage 2 (LLaVA-1.5 finetune): instruction-tune the LLM and the projector (vision tower frozen) on multi-turn Q&A,
# starting from stage 1's projector; image and text-only samples never share an optimizer step.
#   bash scripts/finetune.sh                                   # tiny demo models + shapes Q&A, 2 CPU processes, ZeRO-3
#   NUM_GPUS=8 BF16=True LLM=vicuna-7b-v1.5 VISION_TOWER=clip-vit-large-patch14-336 DATA_DIR=data \
#     DATA=data/llava_v1_5_mix665k.json BATCH=16 PROJECTOR=runs/pretrain/mm_projector.safetensors bash scripts/finetune.sh
# Writes a native Llava checkpoint + processor to $OUT_ROOT/finetune (loads with LlavaForConditionalGeneration).
set -euo pipefail
source "$(dirname "$0")/launch_defaults.sh"
DATA="${DATA:-$DATA_DIR/stage2_qa.json}"
ZERO="${ZERO:-zero3}"
BATCH="${BATCH:-4}"            # per device; LLaVA-1.5: 16 x 8 GPUs = 128
ACCUM="${ACCUM:-1}"
LR="${LR:-2e-5}"
TEMPLATE="${TEMPLATE:-chatml}"  # vicuna_v1 for Vicuna; chatml for the tiny demo LLM; auto = the tokenizer's template
PROJECTOR="${PROJECTOR:-$OUT_ROOT/pretrain/mm_projector.safetensors}"
OUT="${OUT:-$OUT_ROOT/finetune}"
PROJECTOR_ARGS=()
if [ -f "$PROJECTOR" ]; then PROJECTOR_ARGS=(--pretrain_mm_mlp_adapter "$PROJECTOR")
else echo "note: no stage-1 projector at $PROJECTOR; the projector starts from random init" >&2; fi

launch --deepspeed "$REPO/zero_configs/$ZERO.json" \
  --model_name_or_path "$LLM" --vision_tower "$VISION_TOWER" --version "$TEMPLATE" "${PROJECTOR_ARGS[@]}" \
  --data_path "$DATA" --image_folder "$DATA_DIR" \
  --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False \
  --mm_use_im_patch_token False --image_aspect_ratio pad --group_by_modality_length True \
  --bf16 "$BF16" --output_dir "$OUT" --num_train_epochs 1 --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" \
  --save_strategy steps --save_steps 50000 --save_total_limit 1 \
  --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
  --model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers "$WORKERS" --report_to "$REPORT_TO"
