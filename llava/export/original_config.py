"""What an original LLaVA / LLaVA-NeXT / LLaVA-OneVision ``config.json`` says, checked and translated for the native
classes (used by ``llava import-llava``, see ``import_llava.py``).

    settings = read_original_settings(src)     # OriginalSettings: LLM family, aspect-ratio mode, anyres_max N, ...
    pinpoints = native_grid_pinpoints(settings, tower_size=336)     # [[height, width], ...] as the native config wants
    tower = trim_original_tower(vision_config, settings, embedded_layers)   # LLaVA-NeXT's SigLIP wrapper, made native

Facts of the original code (LLaVA-NeXT's ``mm_utils.py`` and ``model/llava_arch.py``) that matter here:

- ``image_grid_pinpoints`` lists ``[width, height]`` pairs (``select_best_resolution`` unpacks ``for width, height in
  possible_resolutions``), and a range ``"(1x1),...,(3x3)"`` expands to ``(i, j)`` = (width, height) in tower units;
  the native configs list ``[height, width]``. The released sets (1.6's five grids, OneVision's (1x1)..(6x6)) are
  symmetric, so only an asymmetric set shows the difference.
- Image sizes are PIL's ``(width, height)`` there, ``(height, width)`` in transformers.
- ``mm_patch_merge_type spatial_unpad`` is the merge the native LlavaNext / LlavaOnevision compute (base view, then
  the grid unpadded to the image's aspect ratio with one ``image_newline`` per row; ``anyres_max_N`` shrinks a grid
  above 1.1x N crops' worth bilinearly). ``spatial``, ``flat``, ``*_nobase``, ``maxpool2x2`` have no native class.
- LLaVA-NeXT's ``SigLipVisionTower`` deletes the tower's last encoder layer and its pooling head and returns
  ``hidden_states[-1]`` of what is left, whatever ``mm_vision_select_layer`` says: natively that is a SigLIP config
  with one layer less, ``vision_use_head False`` and ``vision_feature_layer -1`` (as transformers' own OneVision
  conversion writes it). CLIP towers use ``hidden_states[mm_vision_select_layer]``, minus CLS for ``patch``.
- ``mm_newline_position`` and ``mm_spatial_pool_*`` act on video frames only (the native OneVision pools frames
  bilinearly and appends one newline), so they do not change an image's features.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from llava.data.anyres import parse_grid_pinpoints, parse_image_aspect_ratio
from llava.errors import UsagePathError, UsageValueError

logger = logging.getLogger(__name__)

# The LLM family: from ``architectures`` when it names one (OneVision configs may say model_type "llava"), else from
# model_type.
TEXT_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral",
                      "LlavaQwenForCausalLM": "qwen2"}
TEXT_MODEL_TYPES = {"llava_llama": "llama", "llava": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
SELECT_FEATURES = ("patch", "cls_patch")


@dataclass(frozen=True)
class OriginalSettings:
    """The facts of an original checkpoint's ``config.json`` that decide the native class and config."""

    config_path: Path
    raw: dict
    text_model_type: str  # llama | mistral | qwen2
    aspect_ratio: str  # pad | square | anyres | anyres_max_N, as written
    max_num_patches: int | None  # N of anyres_max_N

    @property
    def anyres(self) -> bool:
        return self.aspect_ratio.startswith("anyres")

    @property
    def select_feature(self) -> str:
        return self.raw.get("mm_vision_select_feature") or "patch"

    def error(self, key: str, why: str) -> UsageValueError:
        """One line naming the config file, the key and its value."""
        return UsageValueError(f"{self.config_path}: {key} {self.raw.get(key)!r}: {why}")


def read_original_settings(src: Path) -> OriginalSettings:
    """Read ``src/config.json`` and refuse every setting the native classes cannot express (one line each)."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise UsagePathError(f"--src {src}: {'no config.json in it' if src.is_dir() else 'no such directory'}; give "
                             f"the directory of an original LLaVA checkpoint (config.json with mm_vision_tower + weights)")
    raw = json.loads(config_path.read_text())
    architecture = (raw.get("architectures") or [None])[0]
    text_type = TEXT_ARCHITECTURES.get(architecture) or TEXT_MODEL_TYPES.get(raw.get("model_type"))
    if text_type is None:
        raise UsageValueError(f"--src {src}: model_type {raw.get('model_type')!r} is not one of "
                              f"{sorted(TEXT_MODEL_TYPES)} (architectures {raw.get('architectures')!r})")
    aspect = raw.get("image_aspect_ratio") or "square"
    settings = OriginalSettings(config_path, raw, text_type, aspect, None)
    try:
        mode, max_n = parse_image_aspect_ratio(aspect)
    except UsageValueError:
        raise settings.error("image_aspect_ratio", "the native classes take pad, square (Llava), anyres (LlavaNext) "
                                                   "or anyres_max_N (LlavaOnevision)") from None
    settings = OriginalSettings(config_path, raw, text_type, aspect, max_n)
    check_original_settings(settings, mode)
    return settings


def check_original_settings(settings: OriginalSettings, mode: str) -> None:
    raw = settings.raw
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise settings.error("mm_projector_type", "only mlp2x_gelu maps to transformers' LlavaMultiModalProjector")
    if raw.get("mm_resampler_type"):
        raise settings.error("mm_resampler_type", "a vision resampler has no place in the native Llava classes")
    if settings.select_feature not in SELECT_FEATURES:
        raise settings.error("mm_vision_select_feature", f"the native classes select {' or '.join(SELECT_FEATURES)} "
                                                         f"features (vision_feature_select_strategy default / full)")
    if mode != "anyres":
        return
    merge = raw.get("mm_patch_merge_type") or "flat"
    if merge != "spatial_unpad":
        raise settings.error("mm_patch_merge_type", f"with image_aspect_ratio {settings.aspect_ratio} the native "
                                                    f"LlavaNext / LlavaOnevision compute only spatial_unpad (the "
                                                    f"unpadded grid after the base view, one image_newline per row)")
    if raw.get("image_grid_pinpoints") in (None, "", []):
        raise settings.error("image_grid_pinpoints", f"image_aspect_ratio {settings.aspect_ratio} needs the grids "
                                                     f"the model was trained with")
    if raw.get("mm_newline_position") not in (None, "one_token"):
        logger.warning("%s: mm_newline_position %r acts on video frames only; the native model appends one newline "
                       "per video (one_token); images are not affected", settings.config_path,
                       raw["mm_newline_position"])


def native_grid_pinpoints(settings: OriginalSettings, tower_size: int) -> list[list[int]]:
    """``image_grid_pinpoints`` of the original config (``[width, height]`` pixels, or a ``"(1x1),...,(3x3)"`` range
    of (width x height) tower units) -> the native ``[[height, width], ...]``, in the original order (ties between
    equally good grids go to the first, in both codes)."""
    try:
        return parse_grid_pinpoints(settings.raw["image_grid_pinpoints"], tower_size)  # the flag reads them alike
    except UsageValueError as err:
        raise settings.error("image_grid_pinpoints", str(err).split(": ", 1)[-1]) from None


def check_select_feature(settings: OriginalSettings, has_cls: bool) -> None:
    """``cls_patch`` keeps CLIP's CLS token: a tower view is then no square grid, so anyres cannot use it (the
    original asserts on it too)."""
    if settings.anyres and has_cls and settings.select_feature == "cls_patch":
        raise settings.error("mm_vision_select_feature", f"with image_aspect_ratio {settings.aspect_ratio} each view's "
                                                         f"features must form a square grid (use patch)")


def trim_siglip_tower(vision_config, embedded_layers: int | None):
    """LLaVA-NeXT's SigLIP wrapper as a native vision config: one layer less (or as many as the checkpoint holds),
    no pooling head; the features are then ``hidden_states[-1]``. Returns ``(vision_config, vision_feature_layer)``."""
    config = vision_config.__class__.from_dict(vision_config.to_dict())
    config.num_hidden_layers = embedded_layers if embedded_layers is not None else vision_config.num_hidden_layers - 1
    config.vision_use_head = False
    return config, -1
