"""LLaVA-NeXT "anyres" and LLaVA-OneVision "anyres_max_N": flags, grid pinpoints, exact image-token counts, pixels.

    mode, max_n = parse_image_aspect_ratio("anyres_max_9")                     # ("anyres", 9)
    pinpoints = parse_grid_pinpoints("(1x1),...,(3x3)", tower_size=336)        # [[336, 336], [672, 336], ...] (h, w)
    layout = AnyresLayout.from_vision_config(vision_config, "default", pinpoints, max_num_patches=None)
    layout.image_tokens(height=480, width=640)                                # what the native model's forward yields
    processor = build_anyres_image_processor(layout, tower_image_processor)  # LlavaNext/OnevisionImageProcessorPil

An image of (height, width) is resized into the best grid of tower-sized crops (``image_grid_pinpoints``, chosen as
the native processor does), each crop and a downscaled base view go through the tower; the grid's features are
unpadded back to the image's aspect ratio, one ``image_newline`` is appended per feature row, and (OneVision) a grid
larger than 1.1x ``N`` crops' worth of features is bilinearly shrunk. ``AnyresLayout.image_tokens`` computes that
count from the size alone (the native ``LlavaNextProcessor`` / ``LlavaOnevisionProcessor`` are the oracle the tests
compare it with). In a OneVision sample with several images each image is its base view plus one newline, as the
native processor and model do.

Pinpoints are given as LLaVA-NeXT accepts them: ``"(1x1),...,(3x3)"`` in units of the tower's input size (every grid
from the first to the last, as LLaVA-NeXT expands it), or an explicit list of ``[height, width]`` pixels
(``"[[336, 672], [672, 336]]"``), each a multiple of the tower size.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from pathlib import Path

from llava.constants import HAS_CLS_TOKEN
from llava.data.images import image_ref_size
from llava.errors import UsageValueError

ASPECT_RATIOS = ("pad", "square", "anyres", "anyres_max_N")
# Defaults when --image_grid_pinpoints is not given: LLaVA-NeXT 1.6's five grids, OneVision's (1x1)..(6x6), written as
# LLaVA-NeXT writes them: (width, height) in units of the tower's input size.
DEFAULT_NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
DEFAULT_ONEVISION_RANGE = "(1x1),...,(6x6)"
_MAX_RE = re.compile(r"^anyres_max_(\d+)$")
_GRID_RE = re.compile(r"\((\d+)\s*x\s*(\d+)\)")


def parse_image_aspect_ratio(value: str) -> tuple[str, int | None]:
    """``pad`` | ``square`` | ``anyres`` | ``anyres_max_N`` -> (mode, N or None); anything else raises, naming the flag."""
    if value in ("pad", "square", "anyres"):
        return value, None
    match = _MAX_RE.match(value or "")
    if match and int(match.group(1)) >= 1:
        return "anyres", int(match.group(1))
    raise UsageValueError(f"--image_aspect_ratio {value!r}: expected one of pad, square, anyres, anyres_max_N (N >= 1, "
                     f"e.g. anyres_max_9)")


def parse_grid_pinpoints(value: str | list | None, tower_size: int, *, max_num_patches: int | None = None
                         ) -> list[list[int]]:
    """``--image_grid_pinpoints`` as LLaVA-NeXT reads it -> the native ``[[height, width], ...]`` pixels, same order.

    LLaVA-NeXT's ``mm_utils`` lists ``[width, height]`` pairs (``select_best_resolution`` unpacks ``for width, height
    in possible_resolutions``) and expands a range ``"(1x1),...,(2x3)"`` to ``(i, j)`` = (width, height) in tower
    units, width outermost; the native LlavaNext / LlavaOnevision configs list ``[height, width]``. So an asymmetric
    set from a LLaVA-NeXT script picks the grids it picked there, and ties go to the same (first) grid.
    ``None`` gives the default set (LLaVA-NeXT's five grids; OneVision's (1x1)..(6x6) when ``max_num_patches``).
    Each side must be a positive multiple of ``tower_size``."""
    flag = f"--image_grid_pinpoints {value!r}"
    if value is None:
        value = DEFAULT_ONEVISION_RANGE if max_num_patches else [[w * tower_size, h * tower_size]
                                                                 for w, h in DEFAULT_NEXT_GRIDS]
    if isinstance(value, str) and "x" in value:
        grids = [(int(a), int(b)) for a, b in _GRID_RE.findall(value)]
        if not grids:
            raise UsageValueError(f"{flag}: expected grids like (1x1),...,(3x3)")
        (w0, h0), (w1, h1) = grids[0], grids[-1]
        if w0 < 1 or h0 < 1 or w1 < w0 or h1 < h0:
            raise UsageValueError(f"{flag}: the grid range must run from a smaller to a larger grid, each side >= 1")
        width_height = [[w * tower_size, h * tower_size] for w in range(w0, w1 + 1) for h in range(h0, h1 + 1)]
    else:
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as err:
                raise UsageValueError(f"{flag}: neither a grid range like (1x1),...,(3x3) nor a list of [width, height] "
                                 f"pixels") from err
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value)):
            raise UsageValueError(f"{flag}: expected a non-empty list of [width, height] pairs")
        width_height = [[int(w), int(h)] for w, h in value]
    bad = [p for p in width_height if p[0] <= 0 or p[1] <= 0 or p[0] % tower_size or p[1] % tower_size]
    if bad:
        raise UsageValueError(f"{flag}: {bad[0]} is not a multiple of the vision tower's input size {tower_size} "
                         f"(every [width, height] must be, so each crop is one tower input)")
    return [[h, w] for w, h in width_height]


def select_best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The pinpoint ``(h, w)`` keeping the most of the image's pixels when fitted inside, then wasting the least."""
    best, best_effective, best_waste = None, -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    return best


@dataclass(frozen=True)
class AnyresLayout:
    """How a vision tower + pinpoints turn an image size into image tokens (native LlavaNext / LlavaOnevision)."""

    grid_pinpoints: tuple[tuple[int, int], ...]
    tower_image_size: int
    patch_size: int
    base_tokens: int  # features of one tower view after the select strategy (576 for CLIP-L/14-336 "default")
    max_num_patches: int | None = None  # anyres_max_N (LlavaOnevision); None: anyres (LlavaNext)

    @classmethod
    def from_vision_config(cls, vision_config, strategy: str, pinpoints: list[list[int]],
                           max_num_patches: int | None = None) -> AnyresLayout:
        side = vision_config.image_size // vision_config.patch_size
        has_cls = vision_config.model_type in HAS_CLS_TOKEN
        base = side * side + (1 if has_cls and strategy == "full" else 0)
        return cls(tuple((int(h), int(w)) for h, w in pinpoints), vision_config.image_size, vision_config.patch_size,
                   base, max_num_patches)

    @property
    def model_type(self) -> str:
        return "llava_onevision" if self.max_num_patches else "llava_next"

    @property
    def vision_aspect_ratio(self) -> str:
        return f"anyres_max_{self.max_num_patches}" if self.max_num_patches else "anyres"

    def image_tokens(self, height: int, width: int, *, multi_image: bool = False) -> int:
        """Image tokens for one image of ``height`` x ``width`` pixels (``multi_image``: OneVision's base view only)."""
        if multi_image and self.max_num_patches:
            return self.base_tokens + 1
        best_h, best_w = select_best_resolution(height, width, [list(p) for p in self.grid_pinpoints])
        side = self.tower_image_size // self.patch_size
        rows, cols = side * (best_h // self.tower_image_size), side * (best_w // self.tower_image_size)
        if width / height > cols / rows:  # wider than the grid: the grid was padded top and bottom
            kept = int(round(height * (cols / width), 7))
            rows -= 2 * ((rows - kept) // 2)
        else:
            kept = int(round(width * (rows / height), 7))
            cols -= 2 * ((cols - kept) // 2)
        if self.max_num_patches:
            ratio = math.sqrt(rows * cols / (self.max_num_patches * side * side))
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
        return self.base_tokens + rows * cols + rows  # base view + unpadded grid + one newline per row

    def record_image_tokens(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Per-image token counts of one sample's images, given their ``(height, width)``."""
        multi = len(sizes) > 1
        return [self.image_tokens(h, w, multi_image=multi) for h, w in sizes]

    def num_views(self, height: int, width: int, *, multi_image: bool = False) -> int:
        """Tower inputs for one image: the grid's crops + the base view (1 for a OneVision multi-image sample)."""
        if multi_image and self.max_num_patches:
            return 1
        best_h, best_w = select_best_resolution(height, width, [list(p) for p in self.grid_pinpoints])
        return (best_h // self.tower_image_size) * (best_w // self.tower_image_size) + 1


def read_image_sizes(image_folder: str | Path | None, paths: list) -> list[tuple[int, int]]:
    """``(height, width)`` of each image (a path or embedded bytes) from its header (nothing decoded);
    ``ImageLoadError`` as the loader raises."""
    return [image_ref_size(image_folder, ref) for ref in paths]


_COPIED_KEYS = ("image_mean", "image_std", "resample", "rescale_factor", "do_rescale", "do_normalize",
                "do_convert_rgb")


def build_anyres_image_processor(layout: AnyresLayout, tower_processor):
    """The native (PIL-backed, no torchvision) LlavaNext / LlavaOnevision image processor for ``layout``, with the
    tower processor's normalisation and the tower's input size for every crop and the base view."""
    # transformers' image-processor modules load only for anyres (train/args.py imports this module)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    size = layout.tower_image_size
    kwargs = {k: getattr(tower_processor, k) for k in _COPIED_KEYS if getattr(tower_processor, k, None) is not None}
    kwargs["image_grid_pinpoints"] = [list(p) for p in layout.grid_pinpoints]
    kwargs["do_pad"] = True
    if getattr(tower_processor, "crop_size", None) and getattr(tower_processor, "do_center_crop", False):
        kwargs.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True)
    else:
        kwargs.update(size={"height": size, "width": size}, do_center_crop=False)
    cls = LlavaOnevisionImageProcessorPil if layout.max_num_patches else LlavaNextImageProcessorPil
    return cls(**kwargs)


def process_anyres_images(image_processor, images: list) -> dict:
    """One sample's PIL images -> ``{"pixel_values": [n, views, 3, S, S], "image_sizes": [n, 2]}`` (views padded to
    the sample's largest; a OneVision processor gets them as one sample, so several images are base views only)."""
    out = image_processor(images=[images], return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}


def check_anyres_flags(model_args, data_args) -> None:
    """Start-up checks across ``--image_aspect_ratio``, ``--image_grid_pinpoints``, ``--mm_patch_merge_type`` and the
    tower (its config is read, no weights): each failure names the flag and the value."""
    mode, max_n = parse_image_aspect_ratio(data_args.image_aspect_ratio)
    merge = model_args.mm_patch_merge_type
    if mode == "anyres" and merge != "spatial_unpad":
        raise UsageValueError(
            f"--image_aspect_ratio {data_args.image_aspect_ratio} needs --mm_patch_merge_type spatial_unpad, got "
            f"{merge!r}: the native LlavaNext/LlavaOnevision models compute only spatial_unpad (the unpadded grid "
            f"with one image_newline per row), so a {merge} model could not be saved as one")
    if mode != "anyres" and merge != "flat":
        raise UsageValueError(f"--mm_patch_merge_type {merge!r} merges the crops of --image_aspect_ratio anyres or "
                         f"anyres_max_N; with --image_aspect_ratio {data_args.image_aspect_ratio} use flat")
    if mode != "anyres":
        return
    if model_args.mm_vision_select_feature != "patch":
        raise UsageValueError(f"--mm_vision_select_feature {model_args.mm_vision_select_feature!r} with --image_aspect_ratio "
                         f"{data_args.image_aspect_ratio}: the native grid needs patch features only (use patch)")
    vision_config = _vision_config_of(model_args)
    if vision_config is not None:
        parse_grid_pinpoints(data_args.image_grid_pinpoints, vision_config.image_size, max_num_patches=max_n)


def _vision_config_of(model_args):
    """The tower's vision config from ``--vision_tower`` (a CLIP/SigLIP directory, full or vision-only), else None."""
    if not model_args.vision_tower:
        return None
    # transformers' auto classes only when a tower is given (train/args.py imports this module)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_args.vision_tower, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageValueError(f"--vision_tower {model_args.vision_tower}: cannot read its config ({err})") from err
    return getattr(config, "vision_config", config)
