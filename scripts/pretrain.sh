#!/usr/bin/env bash
# Stage 1 (LLaVA-1.5 pretrain): train only the projector on image-caption pairs; vision tower and LLM frozen.
#   bash scripts/pretrain.sh                                   # tiny demo models + shapes captions, 2 CPU processes
#   NUM_GPUS=8 BF16=True LLM=vicuna-7b-v1.5 VISION_TOWER=clip-vit-large-patch14-336 \
#     DATA_DIR=LLaVA-Pretrain DATA=LLaVA-Pretrain/blip_laion_cc_sbu_558k.json BATCH=32 bash scripts/pretrain.sh
# Writes $OUT_ROOT/pretrain/mm_projector.safetensors (+ llava_args.json); finetune.sh reads it.
set -euo pipefail
source "$(dirname "$0")/launch_defaults.sh"
DATA="${DATA:-$DATA_DIR/stage1_captions.json}"
ZERO="${ZERO:-zero2}"
BATCH="${BATCH:-8}"            # per device; LLaVA-1.5: 32 x 8 GPUs = 256
ACCUM="${ACCUM:-1}"
LR="${LR:-1e-3}"
OUT="${OUT:-$OUT_ROOT/pretrain}"

launch --deepspeed "$REPO/zero_configs/$ZERO.json" \
  --model_name_or_path "$LLM" --vision_tower "$VISION_TOWER" --version plain \
  --data_path "$DATA" --image_folder "$DATA_DIR" \
  --mm_projector_type mlp2x_gelu --tune_mm_mlp_adapter True \
  --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False \
  --bf16 "$BF16" --output_dir "$OUT" --num_train_epochs 1 --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" \
  --save_strategy steps --save_steps 24000 --save_total_limit 1 \
  --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
  --model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers "$WORKERS" --report_to "$REPORT_TO"
