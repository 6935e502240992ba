"""Training curves as a picture: loss (train and eval), learning rate per parameter group, grad norm.

    write_training_curves(output_dir, trainer.state.log_history)   # curves.png + curves.json (the plotted points)
    llava plot out/padded out/packed --out padded_vs_packed.png    # several runs on one figure

Both backends write ``curves.png`` in the output directory at the end and beside each checkpoint, through one
``CurvesWriter`` per run: the hf backend's trainer (``llava/train/trainer.py``) from ``trainer_state.json``'s log
history, the Megatron backend (``llava/megatron/backend/megatron_train.py``) from ``megatron_state.json``'s.
``curves.json`` holds the points the figure drew (read back from its lines). matplotlib is an optional extra (``pip
install 'llava[plot]'``, in ``scripts/install.sh``'s defaults): without it training writes no picture and says so once.
Plotting uses matplotlib's object API on the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from llava.errors import UsagePathError, UsageValueError

CURVES_PNG = "curves.png"
CURVES_JSON = "curves.json"
STATE_FILE = "trainer_state.json"  # transformers' Trainer.save_state (the run's log history)
LR_GROUP_PREFIX = "learning_rate/"  # per-group rates the trainer logs beside "learning_rate" (llava/train/trainer.py)
PANELS = ("loss", "learning rate", "grad norm")
MISSING_HINT = ("matplotlib is not installed, so no training curves picture (curves.png) is written: "
                "pip install 'llava[plot]'")


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401  (an optional extra: asked for, never required)
    except ImportError:
        return False
    return True


def series_from_log_history(log_history: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """``{panel: {line: (steps, values)}}``: one point per logged step of each quantity, in log order."""
    lines: dict[str, dict[str, tuple[list[int], list[float]]]] = {p: {} for p in PANELS}

    def add(panel: str, line: str, step: int, value) -> None:
        steps, values = lines[panel].setdefault(line, ([], []))
        steps.append(int(step))
        values.append(float(value))

    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        if "loss" in entry:
            add("loss", "train loss", step, entry["loss"])
        if "eval_loss" in entry:
            add("loss", "eval loss", step, entry["eval_loss"])
        groups = {k[len(LR_GROUP_PREFIX):]: v for k, v in entry.items() if k.startswith(LR_GROUP_PREFIX)}
        if groups:
            for name, value in groups.items():
                add("learning rate", name, step, value)
        elif "learning_rate" in entry:
            add("learning rate", "learning rate", step, entry["learning_rate"])
        if entry.get("grad_norm") is not None:
            add("grad norm", "grad norm", step, entry["grad_norm"])
    return lines


def plot_runs(runs: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> dict:
    """Draw each run's log history (``{label: log_history}``) on one figure of three panels; save it to ``path``
    (PNG, written through a temporary file). Returns the points each drawn line holds, read back from the figure:
    ``{panel: {line label: {"steps": [...], "values": [...]}}}``."""
    # matplotlib is optional (the plot extra): imported only to draw
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))  # fixed margins: a constrained layout doubles the drawing time
    FigureCanvasAgg(fig)
    axes = dict(zip(PANELS, fig.subplots(1, len(PANELS))))
    colours = [f"C{i}" for i in range(10)]
    styles = {"train loss": "-", "eval loss": "--"}
    several = len(runs) > 1
    for r, (label, history) in enumerate(runs.items()):
        for panel, lines in series_from_log_history(history).items():
            for k, (name, (steps, values)) in enumerate(lines.items()):
                text = f"{label}: {name}" if several else name
                colour = colours[r % 10] if several else colours[k % 10]
                axes[panel].plot(steps, values, styles.get(name, "-" if k == 0 else ":"), color=colour, label=text,
                                 marker="o" if len(steps) == 1 or name == "eval loss" else None, markersize=3)
    drawn: dict[str, dict] = {}
    for panel, ax in axes.items():
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no step logged (see --logging_steps)", ha="center", va="center", transform=ax.transAxes,
                    color="0.4")
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        drawn[panel] = {line.get_label(): {"steps": [int(x) for x in line.get_xdata()],
                                           "values": [float(y) for y in line.get_ydata()]} for line in ax.lines}
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.86, wspace=0.2)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return drawn


def write_training_curves(output_dir: str | os.PathLike, log_history: list[dict], title: str | None = None) -> Path:
    """``output_dir/curves.png`` of one run and ``curves.json`` with the points drawn; needs matplotlib. ``title``:
    the figure's (default: ``output_dir``; a checkpoint staged under another name gives its final one)."""
    output_dir = Path(output_dir)
    drawn = plot_runs({output_dir.name: log_history}, output_dir / CURVES_PNG, title=title or str(output_dir))
    tmp = output_dir / f".{CURVES_JSON}.tmp"
    tmp.write_text(json.dumps(drawn, indent=1))
    os.replace(tmp, output_dir / CURVES_JSON)
    return output_dir / CURVES_PNG


class CurvesWriter:
    """One run's curves at each save (``writer(output_dir, log_history)``); without matplotlib, one warning (at the
    first save) and nothing else for the rest of the run."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.can_plot: bool | None = None  # matplotlib present? asked at the first save

    def __call__(self, output_dir: str | os.PathLike, log_history: list[dict], title: str | None = None) -> Path | None:
        if self.can_plot is None:
            self.can_plot = matplotlib_available()
            if not self.can_plot:
                self.logger.warning(MISSING_HINT)
        return write_training_curves(output_dir, log_history, title) if self.can_plot else None


def read_log_history(run_dir: str | os.PathLike) -> list[dict]:
    """A run's log history: its ``trainer_state.json``, else its latest checkpoint's, else the Megatron backend's
    ``megatron_state.json``; a one-line error naming the directory when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsagePathError(f"llava plot: {run_dir} is not a directory; give training output directories")
    candidates = [run_dir / STATE_FILE]
    checkpoints = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    candidates += [p / STATE_FILE for p in sorted(checkpoints, key=lambda p: -int(p.name.split("-", 1)[1]))]
    candidates.append(run_dir / "megatron_state.json")
    for path in candidates:
        if path.is_file():
            state = json.loads(path.read_text())
            history = state.get("log_history")
            if isinstance(history, list):
                return history
    raise UsagePathError(f"llava plot: {run_dir} has no {STATE_FILE} (nor a checkpoint-N/{STATE_FILE}); give the "
                         f"--output_dir of a `llava train` run")


def plot_main(args) -> int:
    """``llava plot RUN_DIR [RUN_DIR ...] [--out FILE]``: the runs' curves on one figure."""
    if not Path(args.out).resolve().parent.is_dir():
        raise UsagePathError(f"--out {args.out}: its folder does not exist; create it or give another path")
    histories = {}
    for run in args.runs:
        label = Path(run).resolve().name
        while label in histories:  # two runs with the same folder name: keep both
            label += "'"
        histories[label] = read_log_history(run)
    if not matplotlib_available():
        raise UsageValueError("llava plot needs matplotlib: pip install 'llava[plot]'")
    plot_runs(histories, args.out, title=" vs ".join(histories))
    print(f"curves of {len(histories)} run(s): {args.out}")
    return 0
