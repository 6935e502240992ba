"""Megatron-Core training backend (``llava train --backend megatron``; needs megatron-core, launched with torchrun).

``megatron_train`` is the recipe; ``megatron_args`` (its flags), ``init_checkpoint`` (the starting HF checkpoint),
``rank_weights`` (each rank's shard through the converter's templates), ``megatron_model`` (``LlavaGPTModel``),
``packed_thd`` (``--packing``), ``megatron_data`` (dataset and micro-batches), ``megatron_steps`` (schedule, optimizer
step, eval), ``megatron_checkpoint`` (``checkpoint-N/``), ``megatron_export`` (the run directory), ``rank_memory``
(per-rank bytes) and ``cpu_compat`` (CUDA shims without a GPU); see ``docs/architecture.md``.
"""
