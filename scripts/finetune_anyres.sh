#!/usr/bin/env bash
# Stage 2 at high resolution: LLaVA-NeXT (anyres -> LlavaNextForConditionalGeneration) or, with ASPECT=anyres_max_N,
# the OneVision recipe (LlavaOnevisionForConditionalGeneration; vision tower trained at its own learning rate).
#   bash scripts/finetune_anyres.sh                            # tiny demo models + shapes Q&A, 2 CPU processes, ZeRO-3
#   ASPECT=anyres_max_9 PINPOINTS="(1x1),...,(6x6)" TUNABLE=mm_vision_tower,mm_mlp_adapter,mm_language_model \
#     VISION_LR=2e-6 PROJECTOR=runs/pretrain_anyres/mm_projector.safetensors bash scripts/finetune_anyres.sh
# Writes a native LlavaNext / LlavaOnevision checkpoint + processor to $OUT_ROOT/finetune_anyres.
set -euo pipefail
source "$(dirname "$0")/launch_defaults.sh"
DATA="${DATA:-$DATA_DIR/stage2_qa.json}"
ZERO="${ZERO:-zero3}"
BATCH="${BATCH:-4}"
ACCUM="${ACCUM:-1}"
LR="${LR:-2e-5}"
TEMPLATE="${TEMPLATE:-chatml}"
ASPECT="${ASPECT:-anyres}"
PINPOINTS="${PINPOINTS:-(1x1),...,(3x3)}"
TUNABLE="${TUNABLE:-mm_mlp_adapter,mm_language_model}"  # OneVision: mm_vision_tower,mm_mlp_adapter,mm_language_model
VISION_LR="${VISION_LR:-}"                               # OneVision: 2e-6 (needs mm_vision_tower in TUNABLE)
VISION_LR_DECAY="${VISION_LR_DECAY:-}"                   # e.g. 0.9: tower layer k of L at VISION_LR * 0.9^(L-k)
PROJECTOR="${PROJECTOR:-$OUT_ROOT/pretrain_anyres/mm_projector.safetensors}"
OUT="${OUT:-$OUT_ROOT/finetune_anyres}"
OPTIONAL=()
if [ -f "$PROJECTOR" ]; then OPTIONAL+=(--pretrain_mm_mlp_adapter "$PROJECTOR")
else echo "note: no stage-1 projector at $PROJECTOR; projector and image_newline start from random init" >&2; fi
[ -n "$VISION_LR" ] && OPTIONAL+=(--mm_vision_tower_lr "$VISION_LR")
[ -n "$VISION_LR_DECAY" ] && OPTIONAL+=(--mm_vision_tower_lr_decay "$VISION_LR_DECAY")

launch --deepspeed "$REPO/zero_configs/$ZERO.json" \
  --model_name_or_path "$LLM" --vision_tower "$VISION_TOWER" --version "$TEMPLATE" "${OPTIONAL[@]}" \
  --data_path "$DATA" --image_folder "$DATA_DIR" --mm_tunable_parts "$TUNABLE" \
  --image_aspect_ratio "$ASPECT" --image_grid_pinpoints "$PINPOINTS" --mm_patch_merge_type spatial_unpad \
  --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False \
  --mm_use_im_patch_token False --group_by_modality_length True \
  --bf16 "$BF16" --output_dir "$OUT" --num_train_epochs 1 --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" \
  --save_strategy steps --save_steps 50000 --save_total_limit 1 \
  --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
  --model_max_length 4096 --gradient_checkpointing True --dataloader_num_workers "$WORKERS" --report_to "$REPORT_TO"
