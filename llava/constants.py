"""Constants shared across the package (the run directory's file names are in ``llava/run_dir.py``)."""

IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_VIDEO_TOKEN = "<video>"  # the native LlavaOnevision / LlavaNextVideo processors' video token
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
# vision towers (config ``model_type``) whose features start with a CLS token: one more feature per view, and
# LLaVA's ``patch`` select feature drops it ("default" strategy); every token count follows from this set
HAS_CLS_TOKEN = frozenset({"clip_vision_model"})
