"""The pieces every report page shares: the page shell (inline CSS, no network), the report folder, thumbnails
written beside the page, histograms and bars as inline SVG.

    out = prepare_report_dir("--report", "eval_report")          # a one-line error if it cannot be written
    thumbs = ThumbnailWriter(out)
    key = thumbs.submit("images_root", "coco/0001.jpg")          # decoded and shrunk in a thread pool
    keys = thumbs.submit_frames("videos", "clip.mp4", [0, 12, 24])   # a video's sampled frames, one decode
    thumbs.wait()                                                 # then thumbs.img(key) -> '<img src="images/…">'
    body = svg_histogram([3, 5, 5, 9], title="token length")
    (out / "index.html").write_text(html_page("Title", body))

Images are opened through ``llava.data.images.load_image_rgb`` (confined to the image folder, decompression-bomb
guard; embedded bytes through ``open_image_ref``), video frames through ``llava.data.video.decode_video_frames``
(confined to the video folder), so a page never decodes what training would refuse; an image or frame that cannot
be shown is named with its reason.
"""

from __future__ import annotations

import hashlib
import html
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from llava.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image_rgb, open_image_ref, resolve_image_path
from llava.data.records import EmbeddedImage
from llava.errors import UsagePathError

THUMB_DIR = "images"
THUMB_SIDE = 192  # longest side of a thumbnail, in pixels

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 24px 40px;color:#1d2330}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:3px}
.meta{color:#5b6475;font-size:12px;word-break:break-all}.meta code{background:#f1f3f7;padding:0 3px}
table{border-collapse:collapse}th,td{padding:4px 8px;text-align:left;vertical-align:top}
table.grid th{background:#f1f3f7;position:sticky;top:0;z-index:1}table.grid td,table.grid th{border:1px solid #dde2ea}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}
tr.wrong>td.answer{background:#fdecea}tr.right>td.answer{background:#e8f5e9}
td.answer.wrong{background:#fdecea}td.answer.right{background:#e8f5e9}
.thumbs{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}.thumbs img{max-width:160px;max-height:160px;image-rendering:auto;
border:1px solid #dde2ea;background:#fafafa}
.video{flex-basis:100%;margin-top:2px}.frames{display:flex;flex-wrap:wrap;gap:3px}
figure.frame{margin:0;text-align:center;font-size:11px;color:#5b6475}figure.frame img{width:72px;height:auto;max-height:96px;object-fit:contain}
.noimg{display:inline-block;max-width:220px;padding:6px;border:1px dashed #b3261e;color:#b3261e;font-size:12px}
.filters{position:sticky;top:0;background:#fff;padding:8px 0;z-index:2;border-bottom:1px solid #dde2ea}
.filters label{margin-right:16px}.count{color:#5b6475}
.badge{display:inline-block;border-radius:3px;padding:0 6px;font-size:12px;color:#fff}
.sev-error{background:#b3261e}.sev-dropped{background:#c26401}.sev-warning{background:#8a6d00}.sev-note{background:#5b6475}
.charts{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.chart{border:1px solid #dde2ea;padding:6px}
.chart>svg{display:block;margin-top:4px}
.advice{margin:4px 0 8px;padding:4px 8px;background:#f1f3f7;border-left:3px solid #4a6fa5}
pre,.txt{white-space:pre-wrap;margin:0;font:12px/1.35 ui-monospace,"DejaVu Sans Mono",monospace}
"""


def esc(value) -> str:
    """Text (or a number) safe inside HTML elements and quoted attributes."""
    return html.escape(str(value), quote=True)


def html_page(title: str, body: str, script: str = "") -> str:
    """A whole page: no external script, style sheet or font (opens offline)."""
    tail = f"<script>\n{script}\n</script>\n" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f"<style>{CSS}</style></head>\n<body>\n{body}\n{tail}</body></html>\n")


def prepare_report_dir(flag: str, path: str | os.PathLike) -> Path:
    """Create the report folder (and its thumbnail folder); a one-line error naming ``flag`` if it cannot be."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsagePathError(f"{flag} {out} is a file; give a directory (created if missing)")
    try:
        (out / THUMB_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsagePathError(f"{flag} {out}: cannot create it ({err.strerror}); give a writable directory") from err
    return out


def write_page(out_dir: Path, name: str, text: str) -> Path:
    """Write ``out_dir/name`` through a temporary file, so a reader never sees half a page."""
    path = out_dir / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _open_for_thumbnail(image_folder: str, rel: str) -> Image.Image:
    """A JPEG decoded at reduced scale (PIL's draft mode: several times faster for photos), anything else, or a JPEG
    that fails, the way training opens it (``load_image_rgb``: its checks and its error for what cannot be shown)."""
    path = resolve_image_path(image_folder, rel)  # confined to the image folder, before anything is opened
    try:
        with Image.open(path) as image:
            if image.format == "JPEG" and image.width * image.height <= DEFAULT_MAX_PIXELS:
                image.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
                image.load()
                return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        pass  # load_image_rgb below names the problem
    return load_image_rgb(image_folder, rel)[0]


def _make_thumbnail(image_folder: str, rel: str | EmbeddedImage, dest_stem: Path) -> tuple[str, str]:
    """``(file name, "")`` of the written thumbnail, or ``("", why)`` when the image cannot be shown."""
    try:
        image = (open_image_ref(None, rel)[0] if isinstance(rel, EmbeddedImage)
                 else _open_for_thumbnail(image_folder, rel))
    except ImageLoadError as err:
        return "", f"{err.kind}: {err.detail}"
    return _save_thumbnail(image, dest_stem)


def _make_frame_thumbnails(video_folder: str, rel: str, indices: list[int], stems: list[Path]) -> list[tuple[str, str]]:
    """The thumbnails of a video's frames at ``indices`` (decoded in one pass, seeking), or each ``("", why)``."""
    from llava.data.video import decode_video_frames  # PyAV loads with the first video, not with the page module

    try:
        frames = decode_video_frames(video_folder, rel, indices)
    except ImageLoadError as err:  # a VideoLoadError
        return [("", f"{err.kind}: {err.detail}")] * len(indices)
    return [_save_thumbnail(frame, stem) for frame, stem in zip(frames, stems)]


def _save_thumbnail(image: Image.Image, dest_stem: Path) -> tuple[str, str]:
    if max(image.size) <= THUMB_SIDE:  # small (synthetic) images stay exact: PNG, scaled up by the browser
        name = dest_stem.name + ".png"
        image.save(dest_stem.with_name(name), format="PNG")
    else:
        image.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR)
        name = dest_stem.name + ".jpg"
        image.save(dest_stem.with_name(name), format="JPEG", quality=85)
    return name, ""


class ThumbnailWriter:
    """Thumbnails of dataset images in ``out_dir/images/``, each image once, decoded in a thread pool."""

    def __init__(self, out_dir: Path, workers: int = 8):
        self.out_dir = Path(out_dir)
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.futures: dict[tuple[str, str], Future] = {}
        self.done: dict[tuple[str, str], tuple[str, str]] = {}

    def submit(self, image_folder: str | os.PathLike | None, rel: str | EmbeddedImage) -> tuple[str, str]:
        if isinstance(rel, EmbeddedImage):  # bytes from a Parquet / datasets row: keyed by where they came from
            key = ("embedded", rel.name)
            if key not in self.futures:
                self.futures[key] = self.pool.submit(_make_thumbnail, "", rel, self._stem(key))
            return key
        key = (str(image_folder or ""), rel)
        if key not in self.futures:
            if not image_folder:
                self.futures[key] = Future()
                self.futures[key].set_result(("", "no --image_folder given"))
            else:
                self.futures[key] = self.pool.submit(_make_thumbnail, key[0], rel, self._stem(key))
        return key

    def submit_frames(self, video_folder: str | os.PathLike | None, rel: str, indices: list[int]) -> list[tuple]:
        """One key per sampled frame of video ``rel`` (the frames decoded together, in the pool)."""
        keys = [(f"video:{video_folder or ''}", f"{rel}#frame={i}") for i in indices]
        todo = list(dict.fromkeys(k for k in keys if k not in self.futures))
        if not todo:
            return keys
        futures = {k: Future() for k in todo}
        self.futures.update(futures)
        if not video_folder:
            for future in futures.values():
                future.set_result(("", "no --video_folder given"))
            return keys
        frames = [int(k[1].rsplit("=", 1)[1]) for k in todo]

        def job():
            try:
                results = _make_frame_thumbnails(str(video_folder), rel, frames, [self._stem(k) for k in todo])
            except Exception as err:  # noqa: BLE001  (any failure becomes the frames' note, never a hung wait())
                results = [("", f"{type(err).__name__}: {err}")] * len(todo)
            for future, got in zip(futures.values(), results):
                future.set_result(got)

        self.pool.submit(job)
        return keys

    def _stem(self, key: tuple[str, str]) -> Path:
        return self.out_dir / THUMB_DIR / hashlib.sha1("\0".join(key).encode()).hexdigest()[:20]

    def wait(self) -> None:
        self.done = {key: future.result() for key, future in self.futures.items()}
        self.pool.shutdown()

    def img(self, key: tuple[str, str], alt: str = "", extra: str = "") -> str:
        """An ``<img>`` of the thumbnail, or a note saying why there is none; ``extra``: more attributes."""
        name, why = self.done[key]
        if not name:
            return f'<span class="noimg" data-image="{esc(key[1])}"{extra}>{esc(key[1])}: {esc(why)}</span>'
        return (f'<img src="{THUMB_DIR}/{esc(name)}" loading="lazy" alt="{esc(alt or key[1])}" '
                f'title="{esc(key[1])}" data-image="{esc(key[1])}"{extra}>')


def svg_histogram(values, *, title: str, bins: int = 30, marker: float | None = None, marker_label: str = "",
                  width: int = 420, height: int = 180) -> str:
    """A histogram as inline SVG; each bar carries ``data-lo``, ``data-hi`` and ``data-count`` (the test reads them).
    ``marker``: a vertical line (e.g. ``--model_max_length``)."""
    values = np.asarray(list(values), dtype=float)
    head = f'<div class="chart" data-histogram="{esc(title)}" data-n="{len(values)}"><b>{esc(title)}</b>'
    if len(values) == 0:
        return head + '<div class="count">no values</div></div>'
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    left, bottom, plot_w, plot_h = 44, 20, width - 54, height - 34
    top = max(1, int(counts.max()))
    bar_w = plot_w / len(counts)
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<line x1="{left}" y1="{height - bottom}" x2="{left + plot_w}" y2="{height - bottom}" stroke="#888"/>',
             f'<text x="{left - 4}" y="{height - bottom - plot_h + 8}" font-size="10" text-anchor="end">{top}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" font-size="10" text-anchor="end">0</text>']
    for i, n in enumerate(counts):
        h = plot_h * n / top
        x = left + i * bar_w
        parts.append(f'<rect class="bin" x="{x:.1f}" y="{height - bottom - h:.1f}" width="{max(bar_w - 1, 0.5):.1f}" '
                     f'height="{h:.1f}" fill="#4a6fa5" data-lo="{edges[i]:.6g}" data-hi="{edges[i + 1]:.6g}" '
                     f'data-count="{int(n)}"><title>{edges[i]:.6g} – {edges[i + 1]:.6g}: {int(n)}</title></rect>')
    parts.append(f'<text x="{left}" y="{height - 4}" font-size="10">{_num(values.min())}</text>')
    parts.append(f'<text x="{left + plot_w}" y="{height - 4}" font-size="10" text-anchor="end">{_num(values.max())}'
                 f'</text>')
    if marker is not None and lo <= marker <= hi * 1.5:
        x = left + plot_w * min(1.0, (marker - lo) / (hi - lo))
        side, anchor = (3, "start") if x < left + plot_w / 2 else (-3, "end")  # the label on the roomier side
        parts.append(f'<line x1="{x:.1f}" y1="{height - bottom - plot_h}" x2="{x:.1f}" y2="{height - bottom}" '
                     f'stroke="#b3261e" stroke-dasharray="4 3"/><text x="{x + side:.1f}" '
                     f'y="{height - bottom - plot_h / 2:.1f}" font-size="10" fill="#b3261e" '
                     f'text-anchor="{anchor}">{esc(marker_label)} {_num(marker)}</text>')
    parts.append("</svg>")
    return head + f' <span class="count">({len(values)} values)</span>' + "".join(parts) + "</div>"


def svg_bars(counts: dict[str, int], *, title: str, width: int = 420) -> str:
    """Horizontal bars, one per label, with its count and share."""
    total = max(1, sum(counts.values()))
    top = max([1, *counts.values()])
    row_h, label_w = 22, 120
    height = row_h * max(1, len(counts)) + 6
    parts = [f'<div class="chart" data-bars="{esc(title)}"><b>{esc(title)}</b>',
             f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    for i, (label, n) in enumerate(counts.items()):
        y = 3 + i * row_h
        w = (width - label_w - 110) * n / top
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" font-size="12" text-anchor="end">{esc(label)}</text>'
                     f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 6}" fill="#4a6fa5" '
                     f'data-label="{esc(label)}" data-count="{int(n)}"/>'
                     f'<text x="{label_w + w + 6:.1f}" y="{y + 14}" font-size="12">{int(n)} ({n / total:.1%})</text>')
    return "".join(parts) + "</svg></div>"


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.3g}"
