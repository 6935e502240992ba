#!/usr/bin/env bash
# Video stage 2 (LLaVA-OneVision / LLaVA-Video recipe): video, image, image+video and text records in one run, saved
# as a native LlavaOnevisionForConditionalGeneration (bilinear 2x pooling per frame, one newline per video); with
# NEWLINE=no_token POOL=average ASPECT=anyres, a LlavaNextVideoForConditionalGeneration.
#   bash scripts/finetune_video.sh                  # tiny demo models + moving-dot clips, 2 CPU processes, ZeRO-3
#   DATA=video.json VIDEO_DIR=videos DATA_DIR=images FRAMES=32 TIME=True bash scripts/finetune_video.sh
# Writes the checkpoint + processor (with its video half) to $OUT_ROOT/finetune_video.
set -euo pipefail
source "$(dirname "$0")/launch_defaults.sh"
DOTS="$REPO/playground/data/dots"
if [ -z "${DATA:-}" ] && [ ! -f "$DOTS/train.json" ]; then
  "$PYTHON" "$REPO/playground/make_demo_videos.py" --out "$DOTS"   # seconds: PyAV encodes the clips
fi
DATA="${DATA:-$DOTS/train.json}"
VIDEO_DIR="${VIDEO_DIR:-$DOTS/videos}"
IMAGE_DIR="${IMAGE_DIR:-$DOTS/images}"
ZERO="${ZERO:-zero3}"
BATCH="${BATCH:-2}"
LR="${LR:-1e-4}"
TEMPLATE="${TEMPLATE:-chatml}"
FRAMES="${FRAMES:-4}"                     # --frames_upbound (LLaVA-Video: 64)
TIME="${TIME:-False}"                     # --add_time_instruction (LLaVA-Video: True)
NEWLINE="${NEWLINE:-one_token}"           # one_token -> LlavaOnevision; no_token -> LlavaNextVideo
POOL="${POOL:-bilinear}"                  # bilinear with one_token; average or max with no_token
ASPECT="${ASPECT:-anyres_max_9}"          # images: anyres_max_N with one_token, anyres with no_token
PINPOINTS="${PINPOINTS:-(1x1),...,(3x3)}"
TUNABLE="${TUNABLE:-mm_mlp_adapter,mm_language_model}"
OUT="${OUT:-$OUT_ROOT/finetune_video}"

launch --deepspeed "$REPO/zero_configs/$ZERO.json" \
  --model_name_or_path "$LLM" --vision_tower "$VISION_TOWER" --version "$TEMPLATE" \
  --data_path "$DATA" --image_folder "$IMAGE_DIR" --video_folder "$VIDEO_DIR" --mm_tunable_parts "$TUNABLE" \
  --image_aspect_ratio "$ASPECT" --image_grid_pinpoints "$PINPOINTS" --mm_patch_merge_type spatial_unpad \
  --mm_newline_position "$NEWLINE" --mm_spatial_pool_mode "$POOL" --mm_spatial_pool_stride 2 \
  --frames_upbound "$FRAMES" --force_sample True --add_time_instruction "$TIME" \
  --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --group_by_modality_length True \
  --bf16 "$BF16" --output_dir "$OUT" --num_train_epochs 1 --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps 1 \
  --save_strategy steps --save_steps 50000 --save_total_limit 1 \
  --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
  --model_max_length 4096 --dataloader_num_workers "$WORKERS" --report_to "$REPORT_TO"
