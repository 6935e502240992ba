"""Answer questions about images with a trained Llava checkpoint.

    llava predict --model out/finetune --image cat.png --prompt "What colour is the shape?"

The checkpoint directory is enough: the model and processor load with ``from_pretrained`` and the template,
aspect-ratio mode and image-token count come from its ``llava_args.json`` (``--version`` overrides, for
checkpoints not written by us). Generation is greedy and batched with left padding. A video (LlavaOnevision /
LlavaNextVideo checkpoints) is sampled and prompted with the run's frame flags (``--frames_upbound``,
``--video_fps``, ``--force_sample``, ``--add_time_instruction``), each overridable here:

    predictor = Predictor.load("out/video_run")
    clip = predictor.load_video("videos/", "clip0.mp4")          # SampledVideo: frame indices, pixels
    predictor.generate([messages], [[]], videos=[clip])           # batched: the videos share a frame count
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, LlavaForConditionalGeneration

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from llava.data.anyres import AnyresLayout, process_anyres_images
from llava.data.collator import collate_images
from llava.data.dataset import process_images
from llava.data.images import expand2square, open_image_rgb
from llava.data.records import Message
from llava.data.templates import ConversationTemplate, get_template
from llava.data.tokenize import build_generation_prompt
from llava.data.video import (
    VideoInfo,
    VideoLayout,
    VideoSampling,
    decode_video_frames,
    frames_to_pixel_values,
    probe_video,
    sample_frame_indices,
    video_messages,
)
from llava.errors import UsagePathError, UsageValueError, require_model_path, require_path
from llava.model.anyres_model import layout_from_config, load_processor
from llava.model.builder import LLAVA_CLASSES, num_image_tokens
from llava.model.video_model import video_layout_from_config
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


VIDEO_SAMPLING_FLAGS = ("frames_upbound", "video_fps", "force_sample", "add_time_instruction")


@dataclass(frozen=True)
class SampledVideo:
    """A video as the checkpoint's run samples it: its path, metadata, sampled frame indices and ``pixels``
    ``[frames, 3, S, S]`` (blank white frames with ``blank``)."""

    path: str
    info: VideoInfo
    indices: list[int]
    pixels: torch.Tensor

    @property
    def times(self) -> list[float]:
        """Each sampled frame's time in seconds (``index / fps``), as the eval page shows it. The
        ``--add_time_instruction`` sentence uses LLaVA-NeXT's ``frame_times`` (the same when the sampling was capped)."""
        return [round(i / self.info.fps, 2) for i in self.indices]


@dataclass
class Predictor:
    model: LlavaForConditionalGeneration  # or LlavaNext / LlavaOnevision (anyres)
    processor: object
    template: ConversationTemplate
    image_aspect_ratio: str = "square"
    mm_use_im_start_end: bool = False
    video_args: dict = field(default_factory=dict)  # the run's frame sampling flags (llava_args.json data_args)

    @classmethod
    def load(cls, model_dir: str | Path, *, version: str | None = None, dtype=torch.float32,
             video_overrides: dict | None = None) -> Predictor:
        """``video_overrides``: frame sampling flags (:data:`VIDEO_SAMPLING_FLAGS`) that replace the run's; None
        values keep the run's."""
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
                   bool(model_args.get("mm_use_im_start_end", False)),
                   {**{k: data_args[k] for k in VIDEO_SAMPLING_FLAGS if k in data_args},
                    **{k: v for k, v in (video_overrides or {}).items() if v is not None}})

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

    def prompt_ids(self, messages: list[Message], images: list[Image.Image] | None = None,
                   video: SampledVideo | None = None) -> list[int]:
        """The generation prompt: each ``<image>`` expanded to its tokens, ``<video>`` to the sampled video's (and
        with ``--add_time_instruction`` the run's time sentence), as training tokenized the record."""
        n_tokens: int | list[int] = self.num_image_tokens
        if self.layout is not None and images:
            n_tokens = self.layout.record_image_tokens([(im.height, im.width) for im in images])
        video_kwargs = {}
        if video is not None:
            layout = self.video_layout
            messages = video_messages(messages, video.info, video.indices, layout)
            video_kwargs = {"video_token_id": self.model.config.video_token_id,
                            "num_video_tokens": layout.video_tokens(len(video.indices))}
        return build_generation_prompt(
            messages,
            self.template,
            self.processor.tokenizer,
            image_token_id=self.model.config.image_token_id,
            num_image_tokens=n_tokens,
            mm_use_im_start_end=self.mm_use_im_start_end,
            **video_kwargs,
        )

    @property
    def has_video(self) -> bool:
        """LlavaOnevision / LlavaNextVideo checkpoints trained with video: the config names a video token."""
        return getattr(self.model.config, "video_token_id", None) is not None

    @property
    def video_layout(self) -> VideoLayout:
        d = self.video_args
        return video_layout_from_config(
            self.model.config, VideoSampling(int(d.get("frames_upbound") or 0), float(d.get("video_fps") or 1.0),
                                             bool(d.get("force_sample", False))), bool(d.get("add_time_instruction")))

    def load_video(self, video_folder: str | Path | None, rel: str, *, blank: bool = False) -> SampledVideo:
        """``rel`` (a file or a directory of frames, inside ``video_folder``) sampled and decoded as the run did; with
        ``blank`` the frames are white (``--blank_images``). Errors are ``VideoLoadError`` naming the path."""
        layout = self.video_layout
        info = probe_video(video_folder, rel)
        indices = sample_frame_indices(info.frames, info.fps, layout.sampling)
        frames = decode_video_frames(video_folder, rel, indices, size=layout.frame_size, info=info)
        if blank:
            frames = [Image.new("RGB", f.size, (255, 255, 255)) for f in frames]
        pixels = frames_to_pixel_values(frames, self.processor.image_processor).to(self.model.dtype)
        return SampledVideo(rel, info, indices, pixels)

    @torch.no_grad()
    def generate(self, conversations: list[list[Message]], images: list[list[Image.Image]],
                 max_new_tokens: int = 16, videos: list[SampledVideo | None] | None = None) -> list[str]:
        """Greedy answers for a batch of conversations (each ending in a user turn), their images and (``videos``)
        each sample's video or None. The videos of one batch share a frame count (one ``pixel_values_videos``)."""
        tokenizer = self.processor.tokenizer
        videos = videos or [None] * len(conversations)
        prompts = [self.prompt_ids(m, ims, v) for m, ims, v in zip(conversations, images, videos)]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kwargs = {**self.image_inputs(images), **self.video_inputs(videos)}
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

    def video_inputs(self, videos: list[SampledVideo | None]) -> dict[str, torch.Tensor]:
        """``pixel_values_videos`` ``[videos, frames, 3, S, S]``, the batch's videos in sample order."""
        clips = [v.pixels for v in videos if v is not None]
        if not clips:
            return {}
        if not self.has_video:
            raise UsageValueError(f"video {next(v.path for v in videos if v is not None)!r}: a "
                                  f"{self.model.config.model_type} checkpoint has no video path (train with "
                                  f"--video_folder: LlavaOnevision / LlavaNextVideo)")
        counts = sorted({c.shape[0] for c in clips})
        if len(counts) > 1:
            raise ValueError(f"videos of {counts} frames in one generate batch: give each batch one frame count")
        return {"pixel_values_videos": torch.stack(clips)}

    def answer_video(self, video_folder: str | Path, video: str, prompt: str, max_new_tokens: int = 64) -> str:
        """Greedy answer about a video (a file or a directory of frames in ``video_folder``), its frames sampled and
        its prompt written (``--add_time_instruction``) as the run that trained the checkpoint did."""
        text = prompt if DEFAULT_VIDEO_TOKEN in prompt else f"{DEFAULT_VIDEO_TOKEN}\n{prompt}"
        clip = self.load_video(video_folder, video)
        return self.generate([[Message("user", text)]], [[]], max_new_tokens, videos=[clip])[0]

    def video_prompt(self, video_folder: str | Path, video: str, prompt: str) -> tuple[list[int], torch.Tensor]:
        """The prompt ids (``<video>`` expanded to the video's tokens) and ``pixel_values_videos`` ``[1, F, 3, S, S]``."""
        text = prompt if DEFAULT_VIDEO_TOKEN in prompt else f"{DEFAULT_VIDEO_TOKEN}\n{prompt}"
        clip = self.load_video(video_folder, video)
        return self.prompt_ids([Message("user", text)], [], clip), clip.pixels[None]

    def answer(self, image: Image.Image | None, prompt: str, max_new_tokens: int = 64) -> str:
        text = prompt if image is None or DEFAULT_IMAGE_TOKEN in prompt else f"{DEFAULT_IMAGE_TOKEN}\n{prompt}"
        return self.generate([[Message("user", text)]], [[image] if image is not None else []], max_new_tokens)[0]


def predict_main(args) -> int:
    check_checkpoint_dir(args.model)
    require_model_path("--model", args.model, hint=MODEL_HINT)
    if args.image:
        require_path("--image", args.image, kind="file", hint="give an image file (PNG, JPEG, ...)")
    video = getattr(args, "video", None)
    if video:
        require_path("--video", video, hint="give a video file or a directory of frames")
        if args.image:
            raise UsageValueError("--image and --video together: give one of them")
    predictor = Predictor.load(args.model, version=args.version, video_overrides=video_overrides(args))
    if video:
        if not predictor.has_video:
            raise UsageValueError(f"--video with --model {args.model}: a {predictor.model.config.model_type} checkpoint "
                                  f"has no video path (train with --video_folder: LlavaOnevision / LlavaNextVideo)")
        path = Path(video).resolve()
        print(predictor.answer_video(path.parent, path.name, args.prompt, max_new_tokens=args.max_new_tokens))
        return 0
    image = open_image_rgb(args.image)[0] if args.image else None
    print(predictor.answer(image, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def video_overrides(args) -> dict:
    """The frame sampling flags given on the command line (``llava predict`` / ``llava eval``), None where not given."""
    return {k: getattr(args, k, None) for k in VIDEO_SAMPLING_FLAGS}
