"""Answer questions about images with a trained Llava checkpoint.

    llava predict --model out/finetune --image cat.png --prompt "What colour is the shape?"

The checkpoint directory is enough: the model and processor load with ``from_pretrained`` and the template,
aspect-ratio mode and image-token count come from its ``llava_args.json`` (``--version`` overrides, for
checkpoints not written by us). Generation is greedy and batched with left padding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, LlavaForConditionalGeneration

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.data.anyres import AnyresLayout, process_anyres_images
from llava.data.collator import collate_images
from llava.data.dataset import process_images
from llava.data.images import expand2square, open_image_rgb
from llava.data.records import Message
from llava.data.templates import ConversationTemplate, get_template
from llava.data.tokenize import build_generation_prompt
from llava.errors import UsagePathError, UsageValueError, require_model_path, require_path
from llava.model.anyres_model import layout_from_config, load_processor
from llava.model.builder import LLAVA_CLASSES, num_image_tokens
from llava.run_dir import ARGS_FILE, CONFIG_FILE, PROJECTOR_FILE, RunKind, read_run_args, run_kind

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>")
MODEL_HINT = "give a checkpoint directory written by `llava train` or `llava merge`"


def check_checkpoint_dir(model_dir: str | Path, flag: str = "--model") -> None:
    """A Llava checkpoint that ``Predictor.load`` can load: a one-line error (what to do) for a stage-1 run, a LoRA run,
    an incomplete run, a directory without ``config.json`` or a model that is not Llava / LlavaNext / LlavaOnevision.
    A Hub id is left to ``from_pretrained``."""
    model_dir = Path(model_dir)
    if (model_dir / ARGS_FILE).is_file():
        kind = run_kind(model_dir)  # names missing files of an interrupted save
        if kind is RunKind.STAGE1:
            raise UsageValueError(f"{flag} {model_dir} is a stage-1 run (the projector only): train stage 2 from it "
                                  f"(--pretrain_mm_mlp_adapter {model_dir / PROJECTOR_FILE}) and give that run")
        if kind in (RunKind.LORA, RunKind.QLORA):
            raise UsageValueError(f"{flag} {model_dir} is a {kind.value} run (an adapter): merge it first, `llava merge "
                                  f"--adapter {model_dir} --out MERGED_DIR`, then give {flag} MERGED_DIR")
    if model_dir.is_dir():
        if not (model_dir / CONFIG_FILE).is_file():
            raise UsagePathError(f"{flag} {model_dir} has no {CONFIG_FILE}; {MODEL_HINT}")
        model_type = json.loads((model_dir / CONFIG_FILE).read_text()).get("model_type")
        if model_type not in LLAVA_CLASSES:
            raise UsageValueError(f"{flag} {model_dir} is a {model_type!r} model, not a Llava checkpoint "
                                  f"({', '.join(LLAVA_CLASSES)}); {MODEL_HINT} (an original LLaVA checkpoint: "
                                  f"`llava import-llava` first)")


@dataclass
class Predictor:
    model: LlavaForConditionalGeneration  # or LlavaNext / LlavaOnevision (anyres)
    processor: object
    template: ConversationTemplate
    image_aspect_ratio: str = "square"
    mm_use_im_start_end: bool = False

    @classmethod
    def load(cls, model_dir: str | Path, *, version: str | None = None, dtype=torch.float32) -> Predictor:
        model_dir = Path(model_dir)
        check_checkpoint_dir(model_dir)
        run = read_run_args(model_dir) if (model_dir / ARGS_FILE).is_file() else {}
        model_args, data_args = run.get("model_args", {}), run.get("data_args", {})
        name = version or model_args.get("version")
        if name is None:
            raise UsageValueError(f"--model {model_dir} has no {ARGS_FILE}; pass --version to name its conversation "
                                  f"template")
        model_type = AutoConfig.from_pretrained(model_dir).model_type  # llava, llava_next or llava_onevision
        model = LLAVA_CLASSES[model_type].from_pretrained(model_dir, dtype=dtype).eval()
        processor = load_processor(model_dir)
        template = get_template(name, image_front=data_args.get("image_placement", "front") == "front")
        return cls(model, processor, template, data_args.get("image_aspect_ratio", "square"),
                   bool(model_args.get("mm_use_im_start_end", False)))

    @property
    def num_image_tokens(self) -> int:
        cfg = self.model.config
        return num_image_tokens(cfg.vision_config, cfg.vision_feature_select_strategy)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        image_processor = self.processor.image_processor
        if self.image_aspect_ratio == "pad":
            images = [expand2square(im, tuple(int(x * 255) for x in image_processor.image_mean)) for im in images]
        return process_images(image_processor, images, self.image_aspect_ratio)

    @property
    def layout(self) -> AnyresLayout | None:
        """anyres checkpoints (LlavaNext / LlavaOnevision): image tokens depend on each image's size."""
        return layout_from_config(self.model.config)

    def prompt_ids(self, messages: list[Message], images: list[Image.Image] | None = None) -> list[int]:
        n_tokens: int | list[int] = self.num_image_tokens
        if self.layout is not None and images:
            n_tokens = self.layout.record_image_tokens([(im.height, im.width) for im in images])
        return build_generation_prompt(
            messages,
            self.template,
            self.processor.tokenizer,
            image_token_id=self.model.config.image_token_id,
            num_image_tokens=n_tokens,
            mm_use_im_start_end=self.mm_use_im_start_end,
        )

    @torch.no_grad()
    def generate(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                 max_new_tokens: int = 16) -> list[str]:
        """Greedy answers for a batch of conversations (each ending in a user turn) and their images."""
        tokenizer = self.processor.tokenizer
        prompts = [self.prompt_ids(m, ims) for m, ims in zip(conversations, images)]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kwargs = self.image_inputs(images)
        stop = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS
                                           if t in tokenizer.get_vocab()]
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=pad, eos_token_id=stop, **kwargs)
        return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    def image_inputs(self, images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """``pixel_values`` (+ ``image_sizes`` and, for OneVision, ``batch_num_images`` under anyres) of a batch."""
        flat = [im for ims in images for im in ims]
        if not flat:
            return {}
        if self.layout is None:
            return {"pixel_values": self.pixel_values(flat).to(self.model.dtype)}
        per_sample = [process_anyres_images(self.processor.image_processor, ims) for ims in images if ims]
        inputs = collate_images(per_sample, batch_num_images=bool(self.layout.max_num_patches))
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def answer(self, image: Image.Image | None, prompt: str, max_new_tokens: int = 64) -> str:
        text = prompt if image is None or DEFAULT_IMAGE_TOKEN in prompt else f"{DEFAULT_IMAGE_TOKEN}\n{prompt}"
        return self.generate([[Message("user", text)]], [[image] if image is not None else []], max_new_tokens)[0]


def predict_main(args) -> int:
    check_checkpoint_dir(args.model)
    require_model_path("--model", args.model, hint=MODEL_HINT)
    if args.image:
        require_path("--image", args.image, kind="file", hint="give an image file (PNG, JPEG, ...)")
    predictor = Predictor.load(args.model, version=args.version)
    image = open_image_rgb(args.image)[0] if args.image else None
    print(predictor.answer(image, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0
