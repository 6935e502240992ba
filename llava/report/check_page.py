"""``llava data check --report DIR``: the data check as a page.

    llava data check --data_path d.json --image_folder images --model_name_or_path LLM --vision_tower CLIP \
        --version vicuna_v1 --report data_report          # -> data_report/index.html (+ images/)

The page holds the verdict (would training stop?), the statistics, histograms of token lengths (after templating and
image expansion, with ``--model_max_length`` marked), image widths and heights and image tokens per image, the
modality mix and images per sample, then each problem kind with its severity, count, advice, first records and
messages, and the images of those records (or why an image cannot be shown). The modality chart has one bar per
category the check's ``stats.modality`` counts (image, text only, and video with video on). For a dataset-mixture
YAML (``llava/data/sources.py``) the page first has one row per entry with the ``--json`` report's numbers (rows
available and taken, trainable, modality mix, tokens, problems, verdict) and the mixture's total; the statistics,
histograms and problems below are the whole mixture's (``MixtureReport.combined``), each problem record naming its
entry and its images read from the entry's own image folder. The exit code and the printed report are those of
``llava data check``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from llava.data.records import RecordError, parse_record
from llava.data.validate import DataError, ProblemLog, load_raw_records
from llava.data_check import MixtureReport, ProblemReport, run_check
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


@dataclass(eq=False)  # hashed by identity: a key of the page's lookups
class _Source:
    """One dataset on the page: the whole ``--data_path``, or one mixture entry (``label`` names it)."""

    label: str | None
    data_path: str
    image_folder: str | None
    report: ProblemReport


def write_check_report(out_dir: str | Path, report: ProblemReport | MixtureReport, *, data_path: str | Path,
                       image_folder: str | None) -> Path:
    """Write ``out_dir/index.html`` (+ thumbnails, ``check_results.json`` = the ``--json`` report); returns its path.
    A mixture's page has the per-entry table first; its histograms and problem lists are the whole mixture's
    (:meth:`MixtureReport.combined`), each problem row naming its entry."""
    out = prepare_report_dir("--report", out_dir)
    info = report.as_dict()
    mixture = isinstance(report, MixtureReport)
    if mixture:
        sources = [_Source(spec.label, spec.path, spec.image_folder, r) for spec, r in report.reports]
        whole = report.combined()
    else:
        sources, whole = [_Source(None, str(data_path), image_folder, report)], report
    thumbs = ThumbnailWriter(out)
    examples: dict[str, list[tuple[_Source, str, str]]] = {}  # kind -> (source, record id, message)
    for src in sources:
        for kind, problem in src.report.as_dict()["problems"].items():
            examples.setdefault(kind, []).extend((src, rid, m) for rid, m in zip(problem["record_ids"],
                                                                                  problem["messages"]))
    shown: dict[str, list[tuple[_Source, str, tuple[str, str]]]] = {}
    images_of = {src: _record_images(src.data_path, {rid for kind in examples.values()
                                                         for s, rid, _ in kind if s is src}) for src in sources}
    for kind, rows in examples.items():
        pairs = [(src, rid, rel) for src, rid in dict.fromkeys((src, rid) for src, rid, _ in rows)
                 for rel in images_of[src].get(rid, [])]
        shown[kind] = [(src, rid, thumbs.submit(src.image_folder, rel)) for src, rid, rel in
                       pairs[:MAX_IMAGES_PER_KIND]]
    thumbs.wait()
    whole_info = whole.as_dict()
    problems, stats = whole_info["problems"], whole.stats
    verdict = ('<p class="ok" id="verdict" data-ok="1">OK: nothing would stop training</p>' if info["ok"] else
               '<p class="bad" id="verdict" data-ok="0">FAILED: training would stop on the errors below (fix them, '
               "or train with --on_bad_sample skip to drop those records)</p>")
    folders = ("" if mixture else f" · image_folder <code>{esc(image_folder)}</code>")
    body = [f"<h1>Data check: {esc(Path(str(data_path)).name)}</h1>",
            f'<div class="meta">{"mixture" if mixture else "data"} <code>{esc(data_path)}</code>{folders}'
            f" · written {esc(time.strftime('%Y-%m-%d %H:%M'))}</div>", verdict]
    if mixture:
        body += [f"<h2>Sources ({len(sources)} entries)</h2>", _sources_table(info["sources"], stats)]
    body += ["<h2>Statistics" + (" (whole mixture)" if mixture else "") + "</h2>", _stats_table(stats),
             "<h2>Distributions" + (" (whole mixture)" if mixture else "") + "</h2>",
             f'<div class="charts">{_charts(whole, stats)}</div>', f"<h2>Problems ({len(problems)} kinds)</h2>"]
    order = sorted(problems, key=lambda k: (SEVERITY_ORDER.index(problems[k]["severity"])
                                            if problems[k]["severity"] in SEVERITY_ORDER else 0, -problems[k]["count"]))
    if not problems:
        body.append('<p class="count">none found</p>')
    else:
        body.append(_problem_index(order, problems))
    for kind in order:
        body.append(_problem_section(kind, problems[kind], examples[kind], shown[kind], thumbs, mixture))
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
    rows = [("records available", stats.get("available")), ("records", stats.get("records")),
            ("trainable", stats.get("trainable")), ("tokens (all token lengths summed)", stats.get("tokens")),
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
    charts = [svg_bars({k.replace("_", " "): v for k, v in stats.get("modality", {}).items()}, title="modality mix"),
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


def _sources_table(sources: list[dict], whole: dict) -> str:
    """One row per mixture entry, its numbers as the ``--json`` report gives them, and the mixture's total."""
    kinds = list(dict.fromkeys(k for src in sources for k in src["stats"]["modality"]))
    head = ("entry", "file", "sampling", "available", "taken", "trainable", *(k.replace("_", " ") for k in kinds),
            "tokens", "token length p50 / max", "problems", "verdict")
    cols = ("available", "records", "trainable", *(f"modality.{k}" for k in kinds), "tokens")

    def num(stats: dict, col: str):
        return stats["modality"].get(col.split(".", 1)[1], 0) if col.startswith("modality.") else stats.get(col)

    rows = []
    for src in sources:
        st, problems = src["stats"], sum(p["count"] for p in src["problems"].values())
        cells = "".join(f'<td class="num" data-col="{esc(c)}">{num(st, c)}</td>' for c in cols)
        rows.append(f'<tr class="source" data-entry="{src["entry"]}" data-ok="{int(src["ok"])}">'
                    f'<td data-col="entry">{src["entry"]}</td><td data-col="file"><code>{esc(src["json_path"])}</code>'
                    f'</td><td data-col="sampling">{esc(src["sampling"])}</td>{cells}'
                    f'<td class="num" data-col="token_length">{_p50_max(st["token_length"])}</td>'
                    f'<td class="num" data-col="problems">{problems}</td><td data-col="verdict" class='
                    f'"{"ok" if src["ok"] else "bad"}">{"OK" if src["ok"] else "stops training"}</td></tr>')
    total = "".join(f'<td class="num" data-col="{esc(c)}">{num(whole, c)}</td>' for c in cols)
    rows.append(f'<tr class="source-total"><th colspan="3">whole mixture</th>{total}<td class="num">'
                f'{_p50_max(whole["token_length"])}</td><td></td><td></td></tr>')
    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f'<table class="grid" id="sources"><tr>{header}</tr>{"".join(rows)}</table>'


def _p50_max(percentiles: dict) -> str:
    return f'{percentiles.get("p50", "–")} / {percentiles.get("max", "–")}'  # "–": no record was tokenized


def _problem_section(kind: str, problem: dict, examples, shown, thumbs: ThumbnailWriter, mixture: bool) -> str:
    """A problem kind: its count (the whole mixture's), advice, first records (each naming its entry in a mixture)
    and their images."""
    severity = problem["severity"]
    rows = "".join(f'<li data-rid="{esc(rid)}"' + (f' data-source="{esc(src.label)}">' if mixture else ">")
                   + (f'<span class="badge sev-note">{esc(src.label)}</span> ' if mixture else "")
                   + f"<code>{esc(rid)}</code>: {esc(message)}</li>" for src, rid, message in examples)
    advice = f'<div class="advice">fix: {esc(problem["advice"])}</div>' if problem.get("advice") else ""
    images = "".join(f'<figure style="margin:0">{thumbs.img(key)}<figcaption class="count">{esc(rid)}'
                     f'{f" · {esc(src.label)}" if mixture else ""}</figcaption></figure>' for src, rid, key in shown)
    more = problem["count"] - len(examples)
    return (f'<section id="kind-{esc(kind)}" data-kind="{esc(kind)}" data-count="{problem["count"]}" '
            f'data-severity="{esc(severity)}">'
            f'<h3><span class="badge sev-{esc(severity)}">{esc(severity)}</span> {esc(kind)}: '
            f'{problem["count"]} record(s)</h3>{advice}<ul>{rows}'
            f'{f"<li class=count>… and {more} more</li>" if more > 0 else ""}</ul>'
            f'{f"<div class=thumbs>{images}</div>" if images else ""}</section>')
