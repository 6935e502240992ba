"""QLoRA's quantization: ``--bits 4|8`` as a bitsandbytes config for the language model's linear layers only.

    qconfig = quantization_config(training_args, torch.bfloat16)   # None for --bits 16
    built = build_llava_model(model_args, quantization_config=qconfig)

Used by training (``llava/train/train.py``) and by ``llava merge``, which rebuilds a QLoRA run's base quantized
exactly as training did before dequantizing it.
"""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

# bitsandbytes matches these as full module-name prefixes: a bare "vision_tower" or "multi_modal_projector" does not
# keep the tower and the projector out of the quantization (they would be quantized too).
QUANT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def quantization_config(training_args, compute_dtype: torch.dtype):
    """``--bits 4|8`` as a ``BitsAndBytesConfig`` that leaves the vision tower, projector and lm_head alone."""
    if training_args.bits == 16:
        return None

    return BitsAndBytesConfig(
        load_in_4bit=training_args.bits == 4,
        load_in_8bit=training_args.bits == 8,
        llm_int8_skip_modules=list(QUANT_SKIP_MODULES),
        llm_int8_threshold=6.0,
        llm_int8_has_fp16_weight=False,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=training_args.double_quant,
        bnb_4bit_quant_type=training_args.quant_type,
    )
