"""The TRL peer of ``scripts/bench_train.py``: TRL's ``SFTTrainer`` (vision-language path) on the same model, data,
batch and settings, stepped by the same driver.

    pip install -c constraints.txt -e ".[bench]"         # trl, pinned; never a runtime dependency
    PYTHONPATH=. python scripts/bench_train.py --workdir /tmp/mix --variants trl,padded,packed --batch_size 4

What is the same on both sides: the Llava model (built by ``llava.model.builder`` from the same directories and seed,
the same freezing: vision tower frozen, projector and LM train), fp32, the records (the mix's JSONL), batch size,
learning rate and schedule, max length, DataLoader workers, seed, gradient clipping, and gradient checkpointing off
(TRL's ``SFTConfig`` turns it on by default). The vicuna_v1 conversation is rendered by a chat template with
``{% generation %}`` markers, so TRL's ``assistant_only_loss`` supervises the tokens our template does (assistant
replies and their ``</s>``); images are decoded by ``datasets``' ``Image`` feature and processed by the processor in
TRL's collator, the way a TRL user trains a VLM. TRL keeps its own defaults elsewhere (its fused log-prob head and
the entropy/accuracy metrics it computes every step are part of its step). Not the same: TRL cannot pack
vision datasets, so it is the peer of both the padded and the packed variants.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers

from llava.data.templates import VICUNA_SYSTEM

VICUNA_CHAT_TEMPLATE = (
    "{{- bos_token + '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- for c in m.content -%}{%- if c.type == 'image' -%}{{- '<image>\\n' -}}{%- else -%}{{- c.text -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ' ASSISTANT:' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- generation -%}{{- ' ' + m.content[0].text + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def trl_dataset(data_path: str | Path, image_folder: str | Path):
    """The LLaVA JSONL as TRL's conversational VLM format: ``messages`` (``<image>`` removed from the text; TRL puts
    the image first in the first user turn, where the mix has it) and ``images`` (decoded on access)."""
    import datasets

    roles = {"human": "user", "gpt": "assistant"}
    rows = {"messages": [], "images": []}
    for line in Path(data_path).read_text().splitlines():
        record = json.loads(line)
        rows["messages"].append([{"role": roles[t["from"]], "content": t["value"].replace("<image>\n", "")}
                                 for t in record["conversations"]])
        image = record.get("image")
        rows["images"].append([str(Path(image_folder) / image)] if image else [])
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "images": datasets.Sequence(datasets.Image()),
    })
    return datasets.Dataset.from_dict(rows, features=features)


def build_trl_trainer(model_args, data_args, training_args):
    """An ``SFTTrainer`` with the project's model and settings; returns ``(trainer, built)`` like ``build_trainer``."""
    from trl import SFTConfig, SFTTrainer

    from llava.model.builder import apply_freezing, build_llava_model, set_use_cache

    built = build_llava_model(model_args)
    apply_freezing(built.model, model_args, added_tokens=built.added_tokens)
    set_use_cache(built.model, False)
    built.processor.chat_template = VICUNA_CHAT_TEMPLATE
    t = training_args
    config = SFTConfig(
        output_dir=t.output_dir, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, max_steps=t.max_steps, max_grad_norm=t.max_grad_norm,
        optim=t.optim, weight_decay=t.weight_decay, seed=t.seed, use_cpu=t.use_cpu, report_to="none",
        save_strategy="no", dataloader_num_workers=t.dataloader_num_workers, bf16=t.bf16, fp16=t.fp16,
        gradient_checkpointing=False, max_length=t.model_max_length, assistant_only_loss=True,
    )
    transformers.set_seed(t.seed)
    trainer = SFTTrainer(model=built.model, args=config, processing_class=built.processor,
                         train_dataset=trl_dataset(data_args.data_path, data_args.image_folder))
    return trainer, built
