#!/usr/bin/env bash
# Stage 2 with LoRA (LLaVA-1.5 finetune_lora): adapters on every linear layer of the LLM (r 128, alpha 256), the
# projector trained fully at its own learning rate; the output directory alone is enough for `llava merge`.
#   bash scripts/finetune_lora.sh                              # tiny demo models + shapes Q&A, 2 CPU processes, ZeRO-3
#   NUM_GPUS=8 BF16=True LLM=vicuna-7b-v1.5 ... bash scripts/finetune_lora.sh
#   llava merge --adapter runs/finetune_lora --out runs/merged  # native Llava checkpoint
set -euo pipefail
source "$(dirname "$0")/launch_defaults.sh"
DATA="${DATA:-$DATA_DIR/stage2_qa.json}"
ZERO="${ZERO:-zero3}"
BATCH="${BATCH:-4}"            # per device; LLaVA-1.5: 16 x 8 GPUs = 128
ACCUM="${ACCUM:-1}"
LR="${LR:-2e-4}"
LORA_R="${LORA_R:-128}"
LORA_ALPHA="${LORA_ALPHA:-256}"
TEMPLATE="${TEMPLATE:-chatml}"
PROJECTOR="${PROJECTOR:-$OUT_ROOT/pretrain/mm_projector.safetensors}"
OUT="${OUT:-$OUT_ROOT/finetune_lora}"
QLORA_ARGS=(${QLORA_ARGS:-})    # finetune_qlora.sh: --bits 4
PROJECTOR_ARGS=()
if [ -f "$PROJECTOR" ]; then PROJECTOR_ARGS=(--pretrain_mm_mlp_adapter "$PROJECTOR")
else echo "note: no stage-1 projector at $PROJECTOR; the projector starts from random init" >&2; fi

launch --deepspeed "$REPO/zero_configs/$ZERO.json" \
  --lora_enable True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --mm_projector_lr 2e-5 "${QLORA_ARGS[@]}" \
  --model_name_or_path "$LLM" --vision_tower "$VISION_TOWER" --version "$TEMPLATE" "${PROJECTOR_ARGS[@]}" \
  --data_path "$DATA" --image_folder "$DATA_DIR" \
  --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False \
  --mm_use_im_patch_token False --image_aspect_ratio pad --group_by_modality_length True \
  --bf16 "$BF16" --output_dir "$OUT" --num_train_epochs 1 --max_steps "$MAX_STEPS" \
  --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" \
  --save_strategy steps --save_steps 50000 --save_total_limit 1 \
  --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
  --model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers "$WORKERS" --report_to "$REPORT_TO"
