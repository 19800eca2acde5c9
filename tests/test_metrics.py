"""What a run shows (issue 21): subject and prior loss every step in OUTPUT/logs/metrics.csv and TensorBoard,
continued across --resume without a duplicate or missing row; the loss plot and the validation sheet at the end;
previews enlarged to be seen."""

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
from PIL import Image
from runs import assert_refused, train

from dreambooth_fast.images import enlarged
from dreambooth_fast.metrics import COLUMNS, MetricsLog, StepMetrics, read_metrics
from dreambooth_fast.plots import LABEL_WIDTH, smoothed, write_run_pictures
from dreambooth_fast.train import StageTrainer

BASE = ["--stages", "base"]


def rows_of(out) -> list[StepMetrics]:
    return read_metrics(out / "logs" / "metrics.csv")


def test_every_step_logs_subject_and_prior_loss_that_add_up_to_the_loss(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    options = ["--steps", "3", "--gradient-accumulation", "2", "--prior-weight", "0.5", "--lr", "2e-5"]
    result = train(tiny_cascade, subject_dir, out, *BASE, *options)
    assert result.exit_code == 0, result.output
    header = (out / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert header == "stage,step,loss,subject_loss,prior_loss,lr,grad_norm,step_time_s,skipped_steps"
    rows = rows_of(out)
    assert [(m.stage, m.step) for m in rows] == [("base", 1), ("base", 2), ("base", 3)]
    for m in rows:
        # Averaged over the two micro-batches like the loss; the prior part carries --prior-weight.
        assert m.subject_loss > 0 and m.prior_loss > 0
        assert m.loss == pytest.approx(m.subject_loss + m.prior_loss, rel=1e-6)
        assert m.lr == 2e-5 and m.skipped_steps == 0
        assert math.isfinite(m.grad_norm) and m.grad_norm > 0 and m.step_time_s > 0
    assert json.loads((out / "dreambooth.json").read_text())["final_loss"]["base"] == rows[-1].loss


def test_metrics_rows_equal_the_steps_after_a_crash_and_a_resume(tiny_cascade, subject_dir, tmp_path, monkeypatch):
    """A crash after the checkpoint of step 2 leaves a row of step 3, which the resumed run trains again: the log
    keeps exactly one row per step, and step 3 trained twice logs the same loss (resume is exact)."""
    out = tmp_path / "run"
    common = [*BASE, "--no-prior", "--steps", "5", "--checkpoint-every", "2"]
    step = StageTrainer.optimizer_step

    def crash_at_step_4(self):
        if self.step == 3:
            raise RuntimeError("the process died")  # no Ctrl-C handler: no checkpoint at step 3
        return step(self)

    monkeypatch.setattr(StageTrainer, "optimizer_step", crash_at_step_4)
    with pytest.raises(RuntimeError, match="died"):
        train(tiny_cascade, subject_dir, out, *common)
    before = rows_of(out)
    assert [m.step for m in before] == [1, 2, 3]
    monkeypatch.setattr(StageTrainer, "optimizer_step", step)
    assert train(tiny_cascade, subject_dir, out, *common, "--resume").exit_code == 0
    after = rows_of(out)
    assert [(m.stage, m.step) for m in after] == [("base", s) for s in range(1, 6)]
    assert [m.loss for m in after[:3]] == [m.loss for m in before]
    assert all(m.prior_loss == 0 and m.subject_loss == m.loss for m in after)  # --no-prior: all of it is subject


def test_tensorboard_files_hold_the_metrics_after_an_interrupt_and_resume(
    tiny_cascade, subject_dir, tmp_path, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    common = [*BASE, "--no-prior", "--steps", "4", "--report-to", "tensorboard"]
    step = StageTrainer.optimizer_step

    def interrupted_at_step_3(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(StageTrainer, "optimizer_step", interrupted_at_step_3)
    assert_refused(train(tiny_cascade, subject_dir, out, *common), "interrupted at base step 2")
    monkeypatch.setattr(StageTrainer, "optimizer_step", step)
    assert train(tiny_cascade, subject_dir, out, *common, "--resume").exit_code == 0
    rows = rows_of(out)
    assert [m.step for m in rows] == [1, 2, 3, 4]
    events = EventAccumulator(str(out / "logs" / "tensorboard"))
    events.Reload()
    for column in COLUMNS[2:]:
        scalars = events.Scalars(f"base/{column}")
        assert [e.step for e in scalars] == [1, 2, 3, 4], column
        # TensorBoard keeps float32 scalars.
        assert [e.value for e in scalars] == [float(np.float32(getattr(m, column))) for m in rows], column


def test_report_to_tensorboard_without_tensorboard_says_how_to_install_it(
    tiny_cascade, subject_dir, tmp_path, monkeypatch
):
    find_spec = importlib.util.find_spec

    def without_tensorboard(name, *args):
        return None if name == "tensorboard" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_tensorboard)
    out = tmp_path / "run"
    result = train(tiny_cascade, subject_dir, out, "--report-to", "tensorboard")
    assert_refused(result, "--report-to tensorboard", "pip install 'dreambooth-fast[tensorboard]'", out=out)


def test_a_finished_run_draws_the_loss_plot_and_a_sheet_of_its_validation_grids(tiny_cascade, subject_dir, tmp_path):
    out = tmp_path / "run"
    validation = ["--validation-prompt", "a [V] dog", "--validation-every", "1"]
    result = train(tiny_cascade, subject_dir, out, *BASE, *validation)
    assert result.exit_code == 0, result.output
    plot, sheet = out / "logs" / "loss.png", out / "validation" / "base-sheet.png"
    assert f"loss plot: {plot}" in result.output and f"validation base: {sheet}" in result.output
    assert Image.open(plot).size == (600, 400)
    grids = [Image.open(out / "validation" / f"base-step-{s:06d}.png") for s in (1, 2)]
    assert all(grid.width >= 512 for grid in grids)  # the tiny cascade's images, enlarged
    assert Image.open(sheet).size == (LABEL_WIDTH + grids[0].width, grids[0].height + grids[1].height)


def test_without_matplotlib_the_run_ends_with_a_warning_line_not_a_failure(tmp_path, monkeypatch):
    with MetricsLog(tmp_path / "logs", "none", keep=[]) as log:
        log.write(StepMetrics("base", 1, 0.3, 0.2, 0.1, 1e-5, 0.5, 0.01, 0))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure raises ImportError
    lines = write_run_pictures(tmp_path, ["base"])
    assert len(lines) == 1 and lines[0].startswith("warning: no loss plot (matplotlib is missing")
    assert not (tmp_path / "logs" / "loss.png").exists()


def test_small_images_are_enlarged_by_a_whole_factor_with_sharp_pixels():
    pixels = np.random.default_rng(0).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    big = enlarged(Image.fromarray(pixels))
    assert big.size == (520, 260)  # the smallest whole factor to 512 px wide: 26
    assert np.array_equal(np.asarray(big), pixels.repeat(26, axis=0).repeat(26, axis=1))
    wide = Image.new("RGB", (600, 10))
    assert enlarged(wide) is wide


def test_smoothing_keeps_the_first_value_and_skips_overflow_steps():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    values = smoothed([1.0, float("inf"), 3.0])
    assert values[0] == 1.0 and values[1] == 1.0 and 1.0 < values[2] < 3.0
