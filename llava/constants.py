"""Constants shared across the package."""

IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
ARGS_FILE = "llava_args.json"  # resolved run arguments, written beside every output
PROJECTOR_FILE = "mm_projector.safetensors"
