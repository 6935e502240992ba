"""The processor files of the native video-capable classes, written without the processor object.

    files = OnevisionProcessorFiles(image_processor, tokenizer, chat_template, settings)   # llava/model/anyres_model.py
    files.save_pretrained("out/run")    # tokenizer, chat_template.jinja, processor_config.json

transformers builds ``LlavaOnevisionProcessor`` and ``LlavaNextVideoProcessor`` only with torchvision (their video
halves need it), which cannot run here; :class:`ProcessorFiles` writes the files their ``save_pretrained`` writes, so
``AutoProcessor`` reads them where torchvision exists. Its subclasses (OneVision in ``anyres_model.py``, LlavaNextVideo
in ``video_model.py``) name the classes and give the video processor's entry.
"""

from __future__ import annotations

import json
import os


class ProcessorFiles:
    """Stands in for a native processor that transformers cannot build without torchvision (its video half needs it):
    training reads ``tokenizer`` / ``image_processor``; ``save_pretrained`` writes the files the native class's
    ``save_pretrained`` writes (tokenizer, chat template, ``processor_config.json`` with the image processor, the video
    processor and the counting settings), which ``AutoProcessor`` reads where torchvision exists. A subclass names
    the classes and gives its video processor's entry."""

    processor_class = ""  # the native processor class written into processor_config.json
    image_processor_type = ""
    fixed_settings: dict = {}  # written after the counting settings (they win over them)

    def __init__(self, image_processor, tokenizer, chat_template: str | None, settings: dict):
        self.image_processor, self.tokenizer, self.chat_template, self.settings = (image_processor, tokenizer,
                                                                                   chat_template, settings)

    def video_processor_dict(self, image_processor: dict) -> dict:
        raise NotImplementedError

    def save_pretrained(self, save_directory, **kwargs) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        image_processor = json.loads(json.dumps(self.image_processor.to_dict(), default=int))  # resample: an enum
        image_processor["image_processor_type"] = self.image_processor_type
        config = {"image_processor": image_processor, "video_processor": self.video_processor_dict(image_processor),
                  **self.settings, **self.fixed_settings, "processor_class": self.processor_class}
        with open(os.path.join(save_directory, "processor_config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if self.chat_template:
            with open(os.path.join(save_directory, "chat_template.jinja"), "w") as f:
                f.write(self.chat_template)
