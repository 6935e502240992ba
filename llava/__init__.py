"""llava: LLaVA-style multimodal fine-tuning on transformers LlavaForConditionalGeneration."""

__version__ = "0.1.0"
