#!/usr/bin/env bash
# Stage 1 at high resolution (LLaVA-NeXT / OneVision pretrain): train the projector and image_newline on captions,
# each image tiled into a grid of tower-sized crops + a base view; vision tower and LLM frozen.
#   bash scripts/pretrain_anyres.sh                            # tiny demo models + shapes captions, 2 CPU processes
#   NUM_GPUS=8 BF16=True LLM=vicuna-7b-v1.5 VISION_TOWER=clip-vit-large-patch14-336 DATA_DIR=LLaVA-Pretrain \
#     DATA=LLaVA-Pretrain/blip_laion_cc_sbu_558k.json BATCH=32 PINPOINTS="(1x1),...,(3x3)" bash scripts/pretrain_anyres.sh
#   ASPECT=anyres_max_9 PINPOINTS="(1x1),...,(6x6)" bash scripts/pretrain_anyres.sh   # the OneVision layout
# Writes $OUT_ROOT/pretrain_anyres/mm_projector.safetensors (projector + image_newline); finetune_anyres.sh reads it.
set -euo pipefail
source "$(dirname "$0")/launch_defaults.sh"
DATA="${DATA:-$DATA_DIR/stage1_captions.json}"
ZERO="${ZERO:-zero2}"
BATCH="${BATCH:-8}"
ACCUM="${ACCUM:-1}"
LR="${LR:-1e-3}"
ASPECT="${ASPECT:-anyres}"                 # anyres -> LlavaNext; anyres_max_N -> LlavaOnevision
PINPOINTS="${PINPOINTS:-(1x1),...,(3x3)}"  # in units of the tower's input size, or "[[336, 672], ...]" pixels
OUT="${OUT:-$OUT_ROOT/pretrain_anyres}"

launch --deepspeed "$REPO/zero_configs/$ZERO.json" \
  --model_name_or_path "$LLM" --vision_tower "$VISION_TOWER" --version plain \
  --data_path "$DATA" --image_folder "$DATA_DIR" \
  --mm_projector_type mlp2x_gelu --mm_tunable_parts mm_mlp_adapter \
  --image_aspect_ratio "$ASPECT" --image_grid_pinpoints "$PINPOINTS" --mm_patch_merge_type spatial_unpad \
  --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False \
  --bf16 "$BF16" --output_dir "$OUT" --num_train_epochs 1 --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" \
  --save_strategy steps --save_steps 24000 --save_total_limit 1 \
  --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
  --model_max_length 4096 --gradient_checkpointing True --dataloader_num_workers "$WORKERS" --report_to "$REPORT_TO"
