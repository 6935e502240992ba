"""Open dataset images safely and as RGB; LLaVA's pad-to-square.

Used by the dataset (one image per ``__getitem__``) and by ``llava data check`` (every image, up front):

    image, notes = load_image_rgb("playground/data/images", "coco/000001.jpg")
    image = expand2square(image, (122, 116, 104))

Safety: a record's path is confined to ``image_folder`` (absolute paths and paths that escape it through
``..`` or a symlink are refused before anything is opened); the pixel count is checked from the header
before decoding (decompression bombs); the image is decoded fully, so a truncated file fails here rather
than yielding grey pixels. No global PIL setting is changed (``LOAD_TRUNCATED_IMAGES``, ``MAX_IMAGE_PIXELS``
stay as they are), so the functions are safe to call from threads.

Every failure is an :class:`ImageLoadError` whose ``kind`` is one of :data:`IMAGE_ERROR_KINDS` and whose
message names the path (and ``image_folder`` when known) in words a person can act on. Non-RGB images are not
errors: they are converted (see :func:`to_rgb`) and the conversion is reported in the returned notes.
"""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava.data.records import EmbeddedImage
from llava.errors import UsageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_ERROR_KINDS",
    "ImageLoadError",
    "expand2square",
    "check_image_ref",
    "image_ref_size",
    "load_image_rgb",
    "open_image_ref",
    "open_image_rgb",
    "resolve_image_path",
    "to_rgb",
]

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own error threshold: 2 * Image.MAX_IMAGE_PIXELS (default)

IMAGE_ERROR_KINDS = (
    "missing",  # no such file (or image_folder does not exist)
    "not_a_file",  # the path is a directory or another non-regular file
    "absolute_path",  # the record gives an absolute path; paths must be relative to image_folder
    "outside_folder",  # the path escapes image_folder through '..' or a symlink
    "invalid_path",  # empty path or a NUL byte
    "unreadable",  # not an image PIL can read, or the OS refused to read it
    "truncated",  # the file ends before the image data does
    "too_large",  # more pixels than max_pixels (decompression bomb) or oversized metadata
    "unsupported_mode",  # a pixel mode with no RGB conversion
)

_SIBLING_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


class ImageLoadError(UsageError):
    """An image that cannot be used; ``kind`` says why (see :data:`IMAGE_ERROR_KINDS`)."""

    def __init__(self, kind: str, path: str | Path, detail: str, *, image_folder: str | Path | None = None) -> None:
        self.kind = kind
        self.path = str(path)
        self.image_folder = None if image_folder is None else str(image_folder)
        self.detail = detail
        where = f" (image_folder: {self.image_folder!r})" if self.image_folder is not None else ""
        super().__init__(f"{kind}: image {self.path!r}{where}: {detail}")


def _is_absolute(rel: str) -> bool:
    return PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or bool(PureWindowsPath(rel).drive)


def _sibling_hint(path: Path) -> str:
    """' Found X instead.' when the same name exists with another extension (a .gif where the JSON says .jpg)."""
    for ext in _SIBLING_EXTENSIONS:
        for candidate in (path.with_suffix(ext), path.with_suffix(ext.upper())):
            if candidate != path and candidate.is_file():
                return f" A file with another extension exists: {candidate.name!r}; fix the record's 'image' field."
    return ""


def resolve_image_path(image_folder: str | Path, rel: str) -> Path:
    """The real path of ``rel`` inside ``image_folder``, checked without opening the file.

    Refuses absolute paths (``absolute_path``), paths that leave ``image_folder`` once ``..`` and symlinks are
    resolved (``outside_folder``), empty paths or NUL bytes (``invalid_path``), and paths that do not exist
    (``missing``) or are not regular files (``not_a_file``). Only ``stat``/``readlink`` touch the disk.
    """
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise ImageLoadError(
            "invalid_path", repr(rel), "the image path must be a non-empty string", image_folder=image_folder
        )
    if _is_absolute(rel):
        raise ImageLoadError(
            "absolute_path",
            rel,
            "absolute image paths are refused; give the path relative to --image_folder",
            image_folder=image_folder,
        )
    folder = Path(image_folder).resolve()
    if not folder.is_dir():
        raise ImageLoadError(
            "missing",
            rel,
            "the image folder does not exist or is not a directory; check --image_folder",
            image_folder=image_folder,
        )
    try:
        real = (folder / rel).resolve()
    except (OSError, RuntimeError) as err:  # symlink loop
        raise ImageLoadError("unreadable", rel, f"cannot resolve the path: {err}", image_folder=image_folder) from err
    if not real.is_relative_to(folder):
        raise ImageLoadError(
            "outside_folder",
            rel,
            f"the path resolves to {str(real)!r}, outside the image folder (through '..' or a symlink); refused",
            image_folder=image_folder,
        )
    if not real.exists():
        raise ImageLoadError(
            "missing",
            rel,
            f"no such file ({str(real)!r}); check --image_folder and the record's 'image' field.{_sibling_hint(real)}",
            image_folder=image_folder,
        )
    if not real.is_file():
        raise ImageLoadError("not_a_file", rel, "the path is a directory, not an image file", image_folder=image_folder)
    return real


def _scale_to_uint8(array: np.ndarray, max_value: float) -> np.ndarray:
    """Map ``0..max_value`` linearly onto ``0..255`` with rounding (65535 -> 255, 32768 -> 128)."""
    scaled = np.rint(array.astype(np.float64) * (255.0 / max_value))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _high_depth_to_l(image: Image.Image) -> tuple[Image.Image, str]:
    """Grayscale with more than 8 bits (I;16*, I, F) -> 8-bit L, scaled (never clipped) to keep the range."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(array, 65535.0), "L"), "16-bit, scaled to 8-bit"
    if image.mode == "F":
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 1.0)
        if low >= 0.0 and high <= 1.0:
            return Image.fromarray(_scale_to_uint8(array, 1.0), "L"), "float in [0, 1], scaled to 8-bit"
    else:  # "I": 32-bit signed; take the narrowest usual range that holds the data
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low >= 0 and high <= 255:
            return Image.fromarray(array.astype(np.uint8), "L"), "32-bit integer holding 8-bit values"
        if low >= 0 and high <= 65535:
            return Image.fromarray(_scale_to_uint8(array, 65535.0), "L"), "16-bit values, scaled to 8-bit"
    span = high - low or 1.0
    stretched = _scale_to_uint8(array.astype(np.float64) - low, span)
    return Image.fromarray(stretched, "L"), f"values {low:g}..{high:g} stretched to 8-bit"


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """A new RGB image from ``image`` of any mode, and notes describing the conversion ([] for RGB).

    - L, 1 (bilevel: 0/255), YCbCr, CMYK (PIL's naive inversion, no ICC profile): ``convert("RGB")``.
    - Transparency (RGBA, LA, PA, P or L with a ``transparency`` entry): composited on **white**. PIL's plain
      ``convert("RGB")`` drops alpha and exposes whatever colour is stored under transparent pixels (often
      black), which turns icons and logos on transparent backgrounds black; a white page is how people see them.
    - More than 8 bits (I;16, I;16B, I, F): scaled to 8-bit over the type's range (65535 -> 255, 32768 -> 128),
      never clipped; an ``I`` or ``F`` image whose values fit no usual range is stretched min..max.
    """
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _composite_on_white(image), [f"converted from {mode} (alpha composited on white)"]
    if mode == "RGB":
        return image.copy(), []
    if mode.startswith("I") or mode == "F":
        gray, how = _high_depth_to_l(image)
        return gray.convert("RGB"), [f"converted from {mode} ({how})"]
    try:
        return image.convert("RGB"), [f"converted from {mode}"]
    except ValueError as err:
        raise ImageLoadError(
            "unsupported_mode", image.filename or "<image>", f"PIL cannot convert mode {mode!r} to RGB ({err})"
        ) from err


def _load_error(path: str | Path, err: BaseException) -> ImageLoadError:
    """Map an exception raised while decoding to an ImageLoadError of the right kind."""
    text = str(err)
    if isinstance(err, Image.DecompressionBombError) or "too large" in text.lower():
        return ImageLoadError("too_large", path, f"refused as a decompression bomb: {text}")
    if isinstance(err, EOFError) or "truncated" in text.lower() or "broken data stream" in text.lower():
        return ImageLoadError("truncated", path, f"the file is cut short ({text}); re-download or re-extract it")
    if isinstance(err, MemoryError):
        return ImageLoadError("too_large", path, "not enough memory to decode the image")
    return ImageLoadError("unreadable", path, f"PIL cannot decode the image data ({type(err).__name__}: {text})")


def open_image_rgb(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, list[str]]:
    """Open, fully decode and convert ``path`` to RGB; returns ``(image, notes)``.

    The header is read first (PIL's lazy open) and ``width * height > max_pixels`` is refused as
    ``too_large`` before any pixel is decoded; PIL's own DecompressionBombError (above ``2 *
    Image.MAX_IMAGE_PIXELS``, which is this default) is also reported as ``too_large``. PIL's
    DecompressionBombWarning (between ``MAX_IMAGE_PIXELS`` and twice that) is left alone: ``max_pixels`` is the
    decision, and silencing warnings would change process-wide state. The image is then decoded fully, so a
    truncated file raises ``truncated`` (``LOAD_TRUNCATED_IMAGES`` is never set). Animated or multi-frame images
    give their first frame and a note ``"animated: first frame of N"``. EXIF orientation is not applied (as in
    LLaVA and the Hugging Face image processors). Notes from :func:`to_rgb` are appended.
    """
    notes: list[str] = []
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    "too_large",
                    path,
                    f"{width}x{height} = {width * height:,} pixels is above max_pixels={max_pixels:,} "
                    "(a decompression-bomb guard); shrink the image or raise the limit",
                )
            if width <= 0 or height <= 0:
                raise ImageLoadError("unreadable", path, f"the image has an empty size {width}x{height}")
            n_frames = getattr(image, "n_frames", 1)
            if getattr(image, "is_animated", False) or n_frames > 1:
                image.seek(0)
                notes.append(f"animated: first frame of {n_frames}")
            try:
                image.load()
            except (OSError, EOFError, SyntaxError, ValueError, MemoryError, Image.DecompressionBombError) as err:
                raise _load_error(path, err) from err
            rgb, conversion = to_rgb(image)
    except ImageLoadError:
        raise
    except FileNotFoundError as err:
        raise ImageLoadError("missing", path, "no such file") from err
    except IsADirectoryError as err:
        raise ImageLoadError("not_a_file", path, "the path is a directory, not an image file") from err
    except PermissionError as err:
        raise ImageLoadError("unreadable", path, "permission denied; check the file's permissions") from err
    except Image.DecompressionBombError as err:
        raise _load_error(path, err) from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(
            "unreadable", path, "not an image file PIL recognises (wrong extension, HTML error page, or corrupt)"
        ) from err
    except (OSError, EOFError, SyntaxError, ValueError) as err:  # header parse failures
        raise _load_error(path, err) from err
    return rgb, notes + conversion


def load_image_rgb(
    image_folder: str | Path, rel: str, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, list[str]]:
    """:func:`resolve_image_path` then :func:`open_image_rgb`; errors name both ``rel`` and ``image_folder``."""
    real = resolve_image_path(image_folder, rel)
    try:
        return open_image_rgb(real, max_pixels=max_pixels)
    except ImageLoadError as err:
        raise ImageLoadError(err.kind, rel, err.detail, image_folder=image_folder) from err


def open_image_ref(image_folder: str | Path | None, ref: str | EmbeddedImage, *,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, list[str]]:
    """The one way a record's image is opened: a path (:func:`load_image_rgb`, confined to ``image_folder``) or
    embedded bytes (decoded from memory; an error names ``ref.name``, i.e. the source file and row)."""
    if not isinstance(ref, EmbeddedImage):
        return load_image_rgb(image_folder, ref, max_pixels=max_pixels)
    try:
        return open_image_rgb(io.BytesIO(ref.data), max_pixels=max_pixels)
    except ImageLoadError as err:
        raise ImageLoadError(err.kind, ref.name, err.detail) from err


def image_ref_size(image_folder: str | Path | None, ref: str | EmbeddedImage) -> tuple[int, int]:
    """``(height, width)`` from the image's header (nothing decoded); ``ImageLoadError`` as the loader raises."""
    if isinstance(ref, EmbeddedImage):
        source, name, folder = io.BytesIO(ref.data), ref.name, None
    else:
        source, name, folder = resolve_image_path(image_folder, ref), ref, image_folder
    try:
        with Image.open(source) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageLoadError("unreadable", name, f"cannot read the image header ({err})", image_folder=folder) from err
    return height, width


def check_image_ref(image_folder: str | Path | None, ref: str | EmbeddedImage) -> None:
    """What the index checks without decoding: a path exists inside the folder (:func:`resolve_image_path`);
    embedded bytes have an image header PIL reads."""
    if isinstance(ref, EmbeddedImage):
        image_ref_size(None, ref)
    else:
        resolve_image_path(image_folder, ref)


def expand2square(img: Image.Image, background_color: tuple[int, int, int]) -> Image.Image:
    """LLaVA's pad-to-square: centre ``img`` on a square canvas of its long side filled with ``background_color``.

    LLaVA passes ``tuple(int(x * 255) for x in image_processor.image_mean)``. An already square image is
    returned as is. Offsets round down, as in LLaVA (a 1-pixel odd remainder goes to the bottom/right).
    """
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background_color)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result
