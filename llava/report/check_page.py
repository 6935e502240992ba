"""``llava data check --report DIR``: the data check as a page.

    llava data check --data_path d.json --image_folder images --model_name_or_path LLM --vision_tower CLIP \
        --version vicuna_v1 --report data_report          # -> data_report/index.html (+ images/)

The page holds the verdict (would training stop?), the statistics, histograms of token lengths (after templating and
image expansion, with ``--model_max_length`` marked), image widths and heights and image tokens per image, the
modality mix and images per sample, then each problem kind with its severity, count, advice, first records and
messages, and the images of those records (or why an image cannot be shown). The exit code and the printed report
are those of ``llava data check``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llava.data.records import RecordError, parse_record
from llava.data.validate import DataError, ProblemLog, load_raw_records
from llava.data_check import ProblemReport, run_check
from llava.errors import ArgumentParser
from llava.report.html_page import (
    ThumbnailWriter,
    esc,
    html_page,
    prepare_report_dir,
    svg_bars,
    svg_histogram,
    write_page,
)

PAGE = "index.html"
RESULTS_FILE = "check_results.json"
MAX_IMAGES_PER_KIND = 6  # example records' images shown per problem kind
SEVERITY_ORDER = ("error", "dropped", "warning", "note")  # the page lists what stops training first


def check_report_main(argv: list[str]) -> int:
    """``llava data check ... --report DIR``: the usual output, then the page; returns the check's exit code."""
    parser = ArgumentParser(prog="llava data check", add_help=False)
    parser.add_argument("--report", required=True)
    out = prepare_report_dir("--report", parser.parse_known_args(argv)[0].report)
    args, report = run_check(argv)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    page = write_check_report(out, report, data_path=args.data_path, image_folder=args.image_folder)
    print(f"data check page: {page}")
    return report.exit_code


def write_check_report(out_dir: str | Path, report: ProblemReport, *, data_path: str | Path,
                       image_folder: str | None) -> Path:
    """Write ``out_dir/index.html`` (+ thumbnails, ``check_results.json`` = the ``--json`` report); returns its path."""
    out = prepare_report_dir("--report", out_dir)
    info = report.as_dict()
    thumbs = ThumbnailWriter(out)
    wanted = {rid for kind in info["problems"].values() for rid in kind["record_ids"]}
    images_of = _record_images(data_path, wanted)
    shown: dict[str, list[tuple[str, tuple[str, str]]]] = {}
    for kind, problem in info["problems"].items():
        pairs = [(rid, rel) for rid in dict.fromkeys(problem["record_ids"]) for rel in images_of.get(rid, [])]
        shown[kind] = [(rid, thumbs.submit(image_folder, rel)) for rid, rel in pairs[:MAX_IMAGES_PER_KIND]]
    thumbs.wait()
    stats = info["stats"]
    verdict = ('<p class="ok" id="verdict" data-ok="1">OK: nothing would stop training</p>' if info["ok"] else
               '<p class="bad" id="verdict" data-ok="0">FAILED: training would stop on the errors below (fix them, '
               "or train with --on_bad_sample skip to drop those records)</p>")
    body = [f"<h1>Data check: {esc(Path(str(data_path)).name)}</h1>",
            f'<div class="meta">data <code>{esc(data_path)}</code> · image_folder <code>{esc(image_folder)}</code>'
            f" · written {esc(time.strftime('%Y-%m-%d %H:%M'))}</div>", verdict,
            "<h2>Statistics</h2>", _stats_table(stats), "<h2>Distributions</h2>",
            f'<div class="charts">{_charts(report, stats)}</div>',
            f"<h2>Problems ({len(info['problems'])} kinds)</h2>"]
    order = sorted(info["problems"], key=lambda k: (SEVERITY_ORDER.index(info["problems"][k]["severity"])
                                                    if info["problems"][k]["severity"] in SEVERITY_ORDER else 0,
                                                    -info["problems"][k]["count"]))
    if not info["problems"]:
        body.append('<p class="count">none found</p>')
    else:
        body.append(_problem_index(order, info["problems"]))
    for kind in order:
        body.append(_problem_section(kind, info["problems"][kind], shown[kind], thumbs))
    page = write_page(out, PAGE, html_page(f"Data check: {data_path}", "\n".join(body)))
    write_page(out, RESULTS_FILE, json.dumps(info, indent=1))
    return page


def _record_images(data_path, wanted: set[str]) -> dict[str, list[str]]:
    """The image paths of the records named in the report (read again from the file: the check keeps none)."""
    if not wanted:
        return {}
    try:
        raws = load_raw_records(data_path, ProblemLog())  # bad lines were reported by the check itself
    except DataError:
        return {}
    found: dict[str, list[str]] = {}
    for i, raw in enumerate(raws):
        if isinstance(raw, dict) and "id" in raw and str(raw["id"]) not in wanted:
            continue
        try:
            record = parse_record(raw, i)
            rid, images = record.id, list(record.images)
        except RecordError as err:
            rid = err.record_id
            images = raw.get("images") or ([raw["image"]] if raw.get("image") else []) if isinstance(raw, dict) else []
            images = [x for x in images if isinstance(x, str)] if isinstance(images, list) else []
        if rid in wanted and rid not in found:
            found[rid] = images
    return found


def _stats_table(stats: dict) -> str:
    rows = [("records", stats.get("records")), ("trainable", stats.get("trainable")),
            ("--model_max_length", stats.get("model_max_length")),
            ("longer than --model_max_length", stats.get("over_max_length")),
            ("… truncated after their images", stats.get("truncated")), ("… dropped", stats.get("dropped")),
            ("image tokens per image", stats.get("num_image_tokens"))]
    for key in ("token_length", "image_width", "image_height", "image_tokens_per_image"):
        if stats.get(key):
            rows.append((key.replace("_", " ") + " (min / p50 / p90 / p99 / max)",
                         " / ".join(str(v) for v in stats[key].values())))
    cells = "".join(f'<tr><th>{esc(k)}</th><td class="num" data-stat="{esc(k)}">{esc(v)}</td></tr>'
                    for k, v in rows if v is not None)
    return f'<table class="grid" id="stats">{cells}</table>'


def _charts(report: ProblemReport, stats: dict) -> str:
    values = report.values
    sizes = values.get("image_size", [])
    charts = [svg_bars({"image": stats.get("modality", {}).get("image", 0),
                        "text only": stats.get("modality", {}).get("text_only", 0)}, title="modality mix"),
              svg_bars({f"{k} image(s)": v for k, v in stats.get("images_per_sample", {}).items()},
                       title="images per sample"),
              svg_histogram(values.get("token_length", []), title="token length", marker=stats.get("model_max_length"),
                            marker_label="--model_max_length"),
              svg_histogram([w for w, _ in sizes], title="image width (pixels)"),
              svg_histogram([h for _, h in sizes], title="image height (pixels)")]
    tokens = values.get("image_tokens")
    tokens = [] if tokens is None else tokens
    if len(tokens) == 0 and isinstance(stats.get("num_image_tokens"), int):  # fixed count (LLaVA-1.5): one per image
        tokens = [stats["num_image_tokens"]] * len(sizes)
    charts.append(svg_histogram(tokens, title="image tokens per image"))
    return "\n".join(charts)


def _problem_index(order: list[str], problems: dict) -> str:
    rows = "".join(f'<tr><td><span class="badge sev-{esc(problems[k]["severity"])}">{esc(problems[k]["severity"])}'
                   f'</span></td><td><a href="#kind-{esc(k)}">{esc(k)}</a></td><td class="num">{problems[k]["count"]}'
                   f"</td></tr>" for k in order)
    head = "<tr><th>severity</th><th>kind</th><th>records</th></tr>"
    return f'<table class="grid" id="problem-index">{head}{rows}</table>'


def _problem_section(kind: str, problem: dict, shown, thumbs: ThumbnailWriter) -> str:
    severity = problem["severity"]
    examples = "".join(f"<li><code>{esc(rid)}</code>: {esc(message)}</li>"
                       for rid, message in zip(problem["record_ids"], problem["messages"]))
    advice = f'<div class="advice">fix: {esc(problem["advice"])}</div>' if problem.get("advice") else ""
    images = "".join(f'<figure style="margin:0">{thumbs.img(key)}<figcaption class="count">{esc(rid)}</figcaption>'
                     f"</figure>" for rid, key in shown)
    more = problem["count"] - len(problem["record_ids"])
    return (f'<section id="kind-{esc(kind)}" data-kind="{esc(kind)}" data-count="{problem["count"]}" '
            f'data-severity="{esc(severity)}">'
            f'<h3><span class="badge sev-{esc(severity)}">{esc(severity)}</span> {esc(kind)}: '
            f'{problem["count"]} record(s)</h3>{advice}<ul>{examples}'
            f'{f"<li class=count>… and {more} more</li>" if more > 0 else ""}</ul>'
            f'{f"<div class=thumbs>{images}</div>" if images else ""}</section>')
