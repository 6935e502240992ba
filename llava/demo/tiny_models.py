"""Tiny real models, built from configs and saved as ordinary Hugging Face directories (no hub access).

- :func:`write_tiny_vision_tower`: a random-init ``CLIPVisionModel`` or ``SiglipVisionModel`` plus its image
  processor (the PIL-backed ``CLIPImageProcessorPil`` / ``SiglipImageProcessorPil``: no torchvision needed).
- :func:`train_tiny_tokenizer`: a byte-level BPE tokenizer trained on the demo corpus, with the chat-template
  markers of the common templates as single special tokens and a ChatML ``chat_template``. It never adds special
  tokens by itself (the training code adds bos per template) and returns exact character offsets. GPT-2's split by
  default; ``family="llama3"`` / ``"qwen2"`` gives Llama-3's / Qwen2's pipeline instead (the Llama-3 one, as the
  real one, puts BOS first when asked to add special tokens).
- :func:`write_tiny_llm`: that tokenizer plus a random-init ``LlamaForCausalLM`` (GQA, untied embeddings).
- :func:`write_demo_models`: both, under ``workdir/models/``.

Each directory loads with ``from_pretrained`` exactly like ``openai/clip-vit-large-patch14-336`` or a Vicuna
directory would.

Run:  python playground/make_tiny_models.py --data playground/data/shapes --workdir playground
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from llava.data.word_cache import LLAMA3_SPLIT, QWEN2_SPLIT

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
CHAT_MARKER_TOKENS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[INST]",
    "[/INST]",
)
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, UNK, PAD, *CHAT_MARKER_TOKENS)  # ids 0..11 in this order
# Words the conversation templates put around the data, so they get compact tokens too.
TEMPLATE_TEXTS: tuple[str, ...] = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful assistant.",
    "USER: ASSISTANT: Human: Assistant: ### system user assistant <<SYS>> <</SYS>> </s>",
)
# ChatML; a message's content is a string or a list of {"type": "text"|"image"} parts (an image renders "<image>").
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def write_tiny_vision_tower(
    out_dir: str | Path,
    *,
    kind: str = "clip",
    image_size: int = 64,
    patch_size: int = 16,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a random-init CLIP or SigLIP vision tower and its image processor to ``out_dir``.

    The tower yields ``(image_size // patch_size) ** 2`` patch features (+1 CLS token for CLIP).
    """
    if kind not in ("clip", "siglip"):
        raise ValueError(f"kind must be 'clip' or 'siglip', got {kind!r}")
    out_dir = Path(out_dir)
    sizes = dict(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
    )
    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**sizes))
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**sizes))
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def llava_json_texts(paths: Iterable[str | Path]) -> list[str]:
    """Every conversation string in the given LLaVA JSON/JSONL files, with the ``<image>`` placeholder removed
    (the model builder adds ``<image>`` as its own token)."""
    texts = []
    for path in paths:
        raw = Path(path).read_text()
        records = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(x) for x in raw.splitlines() if x]
        for record in records:
            for turn in record["conversations"]:
                text = turn["value"].replace("<image>\n", "").replace("<image>", "").strip()
                if text:
                    texts.append(text)
    return texts


def train_tiny_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 2048, model_max_length: int = 1024, family: str = "gpt2"
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (plus :data:`TEMPLATE_TEXTS`) and wrap it for transformers.

    Special tokens, single ids in this order from 0: ``<s> </s> <unk> <pad>`` and :data:`CHAT_MARKER_TOKENS`.
    ``chat_template`` is ChatML. ``family`` is the pipeline:

    - ``"gpt2"``: the ``ByteLevel`` pre-tokenizer (GPT-2's split); no post-processor: calling the tokenizer adds
      nothing.
    - ``"llama3"`` / ``"qwen2"``: as those models' tokenizer.json files have it, ``Split(their pattern, isolated)``
      then ``ByteLevel(use_regex=False)`` (``trim_offsets`` true for Llama-3, false for Qwen2). Qwen2: the NFC
      normaliser, a ``ByteLevel`` post-processor (adds nothing). Llama-3: a ``ByteLevel`` + ``TemplateProcessing``
      post-processor, which puts ``<s>`` first when special tokens are added.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    if family == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif family in ("llama3", "qwen2"):
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT if family == "llama3" else QWEN2_SPLIT), behavior="isolated",
                                     invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(
            add_prefix_space=False, trim_offsets=family == "llama3", use_regex=False)])
    else:
        raise ValueError(f"family {family!r}: one of gpt2, llama3, qwen2")
    if family == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Templates join turns with a space ("USER: What ...") or a newline, so train on both forms of every text;
    # template words appear once per sample at training time, so weight them to merge into compact tokens.
    texts = [*texts, *(list(TEMPLATE_TEXTS) * 100)]
    corpus = [*texts, *(" " + t for t in texts)]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if family == "llama3":
        tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])])
    elif family == "qwen2":
        tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=list(CHAT_MARKER_TOKENS),
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def write_tiny_llm(
    out_dir: str | Path,
    *,
    texts: Iterable[str],
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
    vocab_size: int = 2048,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on ``texts`` and save it with a random-init ``LlamaForCausalLM`` to ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = train_tiny_tokenizer(texts, vocab_size=vocab_size, model_max_length=max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_demo_models(
    workdir: str | Path,
    data_files: Iterable[str | Path] | Mapping[str, str | Path],
    *,
    vision_kind: str = "clip",
    image_size: int = 64,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the demo's vision tower and LLM under ``workdir/models/``; returns ``{"vision_tower", "llm"}``.

    ``data_files`` are the LLaVA JSON files whose conversations the tokenizer is trained on; the dict returned by
    :func:`llava.demo.shapes.generate_shapes_dataset` works as is (its non-JSON entries are skipped).
    """
    files = data_files.values() if isinstance(data_files, Mapping) else data_files
    files = [Path(f) for f in files if Path(f).suffix in (".json", ".jsonl")]
    models_dir = Path(workdir) / "models"
    vision_dir = models_dir / f"tiny-{vision_kind}-vision"
    write_tiny_vision_tower(vision_dir, kind=vision_kind, image_size=image_size, seed=seed)
    llm_dir = write_tiny_llm(models_dir / "tiny-llama", texts=llava_json_texts(files), seed=seed)
    return {"vision_tower": vision_dir, "llm": llm_dir}
