"""The pictures at the end of a run: the loss plot (OUTPUT/logs/loss.png: total, subject and prior loss per stage,
raw and smoothed, from logs/metrics.csv) and, per stage with validation on, one sheet of its validation grids
across steps (OUTPUT/validation/<stage>-sheet.png)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_write
from .images import enlarged, save_png
from .metrics import METRICS_FILE, StepMetrics, read_metrics
from .rundir import LOGS, VALIDATION

LOSS_PLOT = "loss.png"
# (column, legend label, colour) of the loss plot's curves
CURVES = (("loss", "total", "black"), ("subject_loss", "subject", "tab:blue"), ("prior_loss", "prior", "tab:orange"))
SMOOTHING = 0.9  # TensorBoard's default smoothing weight
LABEL_WIDTH = 110  # the sheet's column of step labels, in pixels
FONT_SIZE = 18


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start (the first value is kept,
    not pulled towards 0); a non-finite value (an fp16 overflow step) is skipped."""
    out, average, total = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = weight * average + (1 - weight) * value
            total = weight * total + (1 - weight)
        out.append(average / total if total else value)
    return out


def loss_plot(rows: list[StepMetrics], path: Path) -> Path:
    """One panel per stage: each curve raw (faint) and smoothed, log scale when every value is positive. A run
    without prior rows has no prior curve."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    stages = list(dict.fromkeys(m.stage for m in rows))
    figure = Figure(figsize=(6 * len(stages), 4), dpi=100, layout="constrained")
    for ax, stage in zip(figure.subplots(1, len(stages), squeeze=False)[0], stages):
        stage_rows = [m for m in rows if m.stage == stage]
        steps = [m.step for m in stage_rows]
        plotted = []
        for column, label, colour in CURVES:
            values = [getattr(m, column) for m in stage_rows]
            if column == "prior_loss" and not any(values):
                continue
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smoothed(values), color=colour, linewidth=1.8, label=label)
            plotted += [v for v in values if math.isfinite(v)]
        if plotted and min(plotted) > 0:
            ax.set_yscale("log")
        ax.set(title=f"stage {stage}", xlabel="step", ylabel=f"loss (smoothed {SMOOTHING}; raw faint)")
        ax.grid(alpha=0.3)
        ax.legend()
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def validation_sheet(grids: list[tuple[int, Path]], path: Path) -> Path:
    """The validation grids of one stage, one row per (step, grid file) in order, each labelled with its step."""
    images = [enlarged(Image.open(grid_path).convert("RGB")) for _, grid_path in grids]
    width = LABEL_WIDTH + max(image.width for image in images)
    sheet = Image.new("RGB", (width, sum(image.height for image in images)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=FONT_SIZE)
    top = 0
    for (step, _), image in zip(grids, images):
        sheet.paste(image, (LABEL_WIDTH, top))
        draw.text((8, top + (image.height - FONT_SIZE) // 2), f"step {step}", fill="black", font=font)
        top += image.height
    return save_png(sheet, path)


def _validation_grids(folder: Path, stage: str) -> list[tuple[int, Path]]:
    """(step, path) of the grids StageTrainer.validate wrote for `stage`, by step."""
    found = []
    for path in folder.glob(f"{stage}-step-*.png"):
        match = re.fullmatch(rf"{stage}-step-(\d+)\.png", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_run_pictures(out: Path, stages: list[str]) -> list[str]:
    """Draw the loss plot and the validation sheets of the run in `out`; return the closing lines that name them."""
    lines = []
    rows = read_metrics(out / LOGS / METRICS_FILE)
    if rows:
        try:
            lines.append(f"loss plot: {loss_plot(rows, out / LOGS / LOSS_PLOT)}")
        except ImportError:  # a dependency, but a finished run must not fail over a picture
            lines.append(f"warning: no loss plot (matplotlib is missing: pip install matplotlib); the losses are in "
                         f"{out / LOGS / METRICS_FILE}")
    for stage in stages:
        grids = _validation_grids(out / VALIDATION, stage)
        if grids:
            lines.append(f"validation {stage}: {validation_sheet(grids, out / VALIDATION / f'{stage}-sheet.png')}")
    return lines
