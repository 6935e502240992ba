"""``llava eval --report DIR``: one page with every held-out sample, its images, question, reference and answers.

    llava eval --model out/finetune --data heldout.json --image_folder data/ --blank_images --report eval_report
    # -> eval_report/index.html (+ images/ thumbnails, eval_results.json with every prediction)

The page holds the accuracy per question type (a row per run: real images, and blank images with
``--blank_images``), then one row per sample: every image of the sample (embedded images too), a video's sampled
frames with their times (the frames the model was given), the question (the last user turn), the reference answer,
and each run's answer marked right or wrong as the accuracy counted it. Filters show only wrong
answers of a run, or one question type. ``eval_results.json`` beside the page holds the same numbers and marks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llava.report.html_page import ThumbnailWriter, esc, html_page, prepare_report_dir, write_page
from llava.serve.eval import EvalResult, print_results, run_eval

PAGE = "index.html"
EMPTY = '<span class="count">(empty answer)</span>'
RESULTS_FILE = "eval_results.json"

FILTER_JS = """
const rows = Array.from(document.querySelectorAll('tr.sample'));
const typeSel = document.getElementById('f-type'), showSel = document.getElementById('f-show');
const shown = document.getElementById('f-count');
function applyFilters() {
  const t = typeSel.value, s = showSel.value; let n = 0;
  for (const r of rows) {
    const ok = (t === '' || r.dataset.type === t) && (s === '' || r.getAttribute('data-wrong-' + s) === '1');
    r.style.display = ok ? '' : 'none'; n += ok;
  }
  shown.textContent = n;
}
typeSel.addEventListener('change', applyFilters); showSel.addEventListener('change', applyFilters);
const wanted = new URLSearchParams(location.hash.slice(1));  // e.g. index.html#type=colour&show=0
if (wanted.has('type')) typeSel.value = wanted.get('type');
if (wanted.has('show')) showSel.value = wanted.get('show');
applyFilters();
"""


def eval_report_main(args) -> int:
    """``llava eval ... --report DIR``: the usual table (and JSON), then the page; prints the page's path."""
    out = prepare_report_dir("--report", args.report)  # before the model loads: a bad folder fails at once
    results = run_eval(args)
    print_results(results, as_json=args.json)
    page = write_eval_report(out, results, image_folder=args.image_folder, model=args.model, data=args.data,
                             video_folder=getattr(args, "video_folder", None))
    print(f"evaluation page: {page}")
    return 0


def write_eval_report(out_dir: str | Path, results: dict[str, EvalResult], *, image_folder: str | None,
                      model: str | Path | None = None, data: str | Path | None = None,
                      title: str = "Evaluation", video_folder: str | None = None) -> Path:
    """Write ``out_dir/index.html``, its thumbnails and ``eval_results.json``; returns the page's path.

    ``results``: run name -> :class:`EvalResult` of the same records in the same order (``evaluate`` of the real
    and of the blank images)."""
    out = prepare_report_dir("--report", out_dir)
    names = list(results)
    samples = results[names[0]].predictions
    for name in names[1:]:
        if [p["id"] for p in results[name].predictions] != [p["id"] for p in samples]:
            raise ValueError(f"eval run {name!r} scored other records than {names[0]!r}; cannot share one page")
    thumbs = ThumbnailWriter(out)
    refs = results[names[0]].image_refs or [p.get("images", []) for p in samples]  # embedded images: their bytes
    keys = [[thumbs.submit(image_folder, ref) for ref in sample_refs] for sample_refs in refs]
    frame_keys = [thumbs.submit_frames(video_folder, p["video"], p["frames"]) if p.get("video") else []
                  for p in samples]
    thumbs.wait()
    types = sorted({p["type"] for p in samples})
    meta = {"model": str(model) if model else None, "data": str(data) if data else None,
            "image_folder": str(image_folder) if image_folder else None,
            "video_folder": str(video_folder) if video_folder else None}
    body = [f"<h1>{esc(title)}: {esc(Path(str(model)).name if model else '')}</h1>",
            '<div class="meta">' + " · ".join(f"{k} <code>{esc(v)}</code>" for k, v in meta.items() if v)
            + f" · {len(samples)} samples · written {esc(time.strftime('%Y-%m-%d %H:%M'))}</div>",
            "<h2>Accuracy by question type</h2>", _accuracy_table(results, types),
            "<h2>Samples</h2>", _filters(names, types, len(samples)),
            _sample_table(results, names, samples, keys, frame_keys, thumbs)]
    page = write_page(out, PAGE, html_page(f"{title}: {meta['model'] or ''}", "\n".join(body), FILTER_JS))
    payload = {**meta, "accuracy": {n: r.accuracy() for n, r in results.items()},
               "counts": {n: {k: {"correct": r.correct[k], "total": r.total[k]} for k in sorted(r.total)}
                          for n, r in results.items()},
               "predictions": {n: r.predictions for n, r in results.items()}}
    write_page(out, RESULTS_FILE, json.dumps(payload, indent=1))
    return page


def _accuracy_table(results: dict[str, EvalResult], types: list[str]) -> str:
    head = "".join(f"<th>{esc(t)}</th>" for t in [*types, "overall"])
    rows = []
    for name, result in results.items():
        cells = []
        for kind in [*types, "overall"]:
            correct = sum(result.correct.values()) if kind == "overall" else result.correct[kind]
            total = sum(result.total.values()) if kind == "overall" else result.total[kind]
            acc = result.accuracy().get(kind)
            text = "–" if acc is None else f"{acc:.1%}"
            cells.append(f'<td class="num" data-run="{esc(name)}" data-type="{esc(kind)}" data-correct="{correct}" '
                         f'data-total="{total}">{text} <span class="count">({correct}/{total})</span></td>')
        rows.append(f'<tr class="accuracy"><th>{esc(name)}</th>{"".join(cells)}</tr>')
    return f'<table class="grid" id="accuracy"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def _filters(names: list[str], types: list[str], n: int) -> str:
    type_options = "".join(f'<option value="{esc(t)}">{esc(t)}</option>' for t in types)
    show_options = "".join(f'<option value="{i}">wrong with {esc(name)}</option>' for i, name in enumerate(names))
    return (f'<div class="filters"><label>question type <select id="f-type"><option value="">all</option>'
            f'{type_options}</select></label><label>show <select id="f-show"><option value="">all samples</option>'
            f'{show_options}</select></label><span class="count">showing <span id="f-count">{n}</span> of {n}'
            f"</span></div>")


def _video_frames(sample: dict, keys: list, thumbs: ThumbnailWriter) -> str:
    """A video's sampled frames in order, each captioned with its time (what ``--add_time_instruction`` states)."""
    if not keys:
        return ""
    video = sample["video"]
    figures = "".join(
        f'<figure class="frame">{thumbs.img(key, alt=f"frame {i} of {video}", extra=_frame_attr(i))}'
        f"<figcaption>{t:.2f} s</figcaption></figure>"
        for key, i, t in zip(keys, sample["frames"], sample["frame_times"]))
    return (f'<div class="video" data-video="{esc(sample["video"])}"><div class="count">video '
            f'<code>{esc(sample["video"])}</code>: {len(keys)} frames</div><div class="frames">{figures}</div></div>')


def _frame_attr(index: int) -> str:
    return f' data-frame="{int(index)}"'


def _sample_table(results, names, samples, keys, frame_keys, thumbs: ThumbnailWriter) -> str:
    head = "".join(f"<th>answer ({esc(name)})</th>" for name in names)
    lines = [f'<table class="grid" id="samples"><tr><th>#</th><th>images</th><th>type</th><th>question</th>'
             f"<th>reference</th>{head}</tr>"]
    for i, sample in enumerate(samples):
        marks, cells = [], []
        for j, name in enumerate(names):
            p = results[name].predictions[i]
            verdict = "right" if p["correct"] else "wrong"
            sign = '<span class="ok">✓</span>' if p["correct"] else '<span class="bad">✗</span>'
            marks.append(f' data-wrong-{j}="{int(not p["correct"])}"')
            cells.append(f'<td class="answer {verdict}" data-run="{esc(name)}" data-correct="{int(p["correct"])}">'
                         f'{sign} <span class="txt">{esc(p["answer"])}</span>'
                         f'{"" if p["answer"].strip() else EMPTY}</td>')
        images = "".join(thumbs.img(key, alt=f"image {k + 1} of {sample['id']}") for k, key in enumerate(keys[i]))
        images += _video_frames(sample, frame_keys[i], thumbs)
        lines.append(f'<tr class="sample" data-id="{esc(sample["id"])}" data-type="{esc(sample["type"])}"'
                     f'{"".join(marks)}><td class="num">{i + 1}<br><span class="count">{esc(sample["id"])}</span></td>'
                     f'<td><div class="thumbs">{images or "<span class=count>text only</span>"}</div></td>'
                     f'<td>{esc(sample["type"])}</td><td><pre>{esc(sample.get("question", ""))}</pre></td>'
                     f'<td class="reference"><pre>{esc(sample["gold"])}</pre></td>{"".join(cells)}</tr>')
    lines.append("</table>")
    return "\n".join(lines)
