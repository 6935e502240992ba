"""Export: merge LoRA into a native Llava checkpoint; import original LLaVA checkpoints."""
