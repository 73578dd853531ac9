"""Figures and the HTML report from a hand-built analysis with curves."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from dashboards.plots import PLOT_NAMES, write_plots
from dashboards.report import write_report
from study.analysis import CURVE_COLUMNS, AnalysisOptions, analyze_run
from tests.study.test_analysis import ended, make_run, reached


@pytest.fixture(scope="module")
def analysis():
    rows, curves = [], []
    for batch_size, optimum in [(8, 1.15), (16, 1.05), (32, 0.95)]:
        for power in (0.8, 1.0, 1.2, 1.4):
            for seed in (0, 1):
                steps = round(40 * math.exp(4 * (power - optimum) ** 2)) + seed
                key = f"trial-{len(rows)}"
                if steps > 60:
                    rows.append(ended(batch_size, power, "censored", seed=seed))
                    last = 60
                else:
                    rows.append(reached(batch_size, power, steps, seed=seed))
                    last = steps
                for step in range(5, last + 1, 5):
                    value = 3.5 * (steps / step) ** 0.3
                    curves.append((key, "val/loss", step, value))
    run = make_run(rows, budget=60, curves=pd.DataFrame(curves, columns=CURVE_COLUMNS))
    return analyze_run(run, AnalysisOptions(bootstrap_samples=200))


def test_plots_written_as_png(analysis, tmp_path):
    paths = write_plots(analysis, tmp_path)
    assert tuple(paths) == PLOT_NAMES
    for name, path in paths.items():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        pixels = imread(path)
        assert pixels.shape[0] > 200, name
        # A blank figure has a single colour.
        assert np.std(pixels) > 0.05, name


def test_curves_skipped_without_histories(analysis, tmp_path):
    no_curves = analyze_run(make_run([reached(8, 1.0, 10), reached(16, 1.0, 12)]))
    paths = write_plots(no_curves, tmp_path)
    assert "curves" not in paths
    assert "pstar" in paths


def test_report_embeds_tables_and_images(analysis, tmp_path):
    page, images = write_report([analysis], tmp_path)
    text = page.read_text()
    assert page.name == "batch_power_grid-smoke-r1-report.html"
    assert len(images) == len(PLOT_NAMES)
    assert text.count("data:image/png;base64,") == len(PLOT_NAMES)
    assert text.count('<table class="power-table">') == 2
    assert "linear trend: p* =" in text
    assert "noise-scale trend: p* =" in text
    assert "90% percentile bootstrap over seeds, 200 resamples" in text
    assert "<strong>" in text


def test_report_without_reached_trials(tmp_path):
    rows = [
        ended(8, 1.0, "censored"),
        ended(8, 1.2, "diverged", steps_done=5),
        ended(16, 1.0, "censored"),
        ended(16, 1.2, "failed"),
    ]
    curves = pd.DataFrame([("trial-0", "val/loss", 5, 4.0)], columns=CURVE_COLUMNS)
    analysis = analyze_run(make_run(rows, curves=curves))
    page, images = write_report([analysis], tmp_path)
    text = page.read_text()
    assert "no power reached the target" in text
    assert "no trend fit" in text
    assert len(images) == len(PLOT_NAMES)
