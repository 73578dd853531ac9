"""Tables in Markdown, CSV, LaTeX and HTML from hand-built analyses."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from study.analysis import AnalysisOptions, analyze_run
from study.export import (
    build_table,
    export_tables,
    latex_label,
    log_artifacts,
    metric_names,
    power_table,
    read_markdown_table,
    summary_text,
    to_html_table,
    to_latex,
    to_markdown,
)
from tests.study.test_analysis import ended, make_run, reached


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> tuple[MlflowClient, Path]:
    """One MLflow store for the module, since creating its tables takes seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"), root


@pytest.fixture
def analysis():
    rows = [
        reached(8, 1.0, 40, seed=0, val_loss=3.41),
        reached(8, 1.0, 44, seed=1, val_loss=3.43),
        reached(8, 1.2, 30, seed=0, val_loss=3.40),
        reached(8, 1.2, 34, seed=1, val_loss=3.42),
        reached(8, 1.4, 50, seed=0, val_loss=3.44),
        reached(8, 1.4, 52, seed=1, val_loss=3.46),
        reached(16, 1.0, 20, seed=0, val_loss=3.45),
        reached(16, 1.0, 22, seed=1, val_loss=3.47),
        reached(16, 1.2, 26, seed=0, val_loss=3.44),
        ended(16, 1.2, "censored", seed=1, val_loss=3.6),
        ended(16, 1.4, "censored", seed=0, val_loss=3.7),
        ended(16, 1.4, "diverged", seed=1, val_loss=None),
    ]
    return analyze_run(
        make_run(rows, budget=100), AnalysisOptions(bootstrap_samples=200)
    )


def test_table_cells_best_and_censored(analysis):
    table = power_table(analysis)
    assert list(table.columns) == ["batch_size", "p=1", "p=1.2", "p=1.4", "best_power"]
    row8 = table.set_index("batch_size").loc[8]
    row16 = table.set_index("batch_size").loc[16]
    assert row8["p=1.2"] == "32"
    assert row8["best_power"] == "1.2"
    # 26 and a censored seed: the median is at least (26 + 100) / 2.
    assert row16["p=1.2"] == ">63"
    assert row16["p=1.4"] == ">100"
    assert row16["best_power"] == "1"


def test_time_table_caption_names_unit(analysis):
    (caption,) = build_table(analysis, "steps").footnotes
    assert caption.startswith("Cells are the optimizer steps to the target")
    assert "median over seeds of the best lr_max" not in caption
    assert "ties go to the lower median val/loss" in caption
    assert caption in summary_text(analysis)


def test_markdown_round_trip_pandas(analysis):
    table = build_table(analysis)
    text = to_markdown(table)
    assert "| **32** |" in text
    assert "| **21** |" in text
    assert text.count("**") == 4

    parsed = read_markdown_table(text)
    pd.testing.assert_frame_equal(parsed, table.frame())

    lines = [line for i, line in enumerate(text.splitlines()) if i != 1]
    plain = pd.read_csv(
        io.StringIO("\n".join(lines).replace("**", "")),
        sep="|",
        skipinitialspace=True,
        dtype=str,
    )
    plain = plain.drop(columns=[c for c in plain.columns if c.startswith("Unnamed")])
    plain.columns = [c.strip() for c in plain.columns]
    plain = plain.apply(lambda column: column.str.strip())
    expected = table.frame().astype(str)
    assert plain.to_dict("list") == expected.to_dict("list")


def test_csv_round_trip(analysis, tmp_path):
    paths = export_tables(analysis, tmp_path, formats=("csv",))
    frame = pd.read_csv(paths["csv"], dtype=str)
    assert frame.to_dict("list") == power_table(analysis).astype(str).to_dict("list")


def test_spread_shows_sd(analysis):
    table = build_table(analysis, "steps", spread=True)
    assert table.cells[8][1.2].text == "32 ± 2.8"
    assert table.cells[16][1.0].text == "21 ± 1.4"
    # A censored cell has a bound and no sd.
    assert table.cells[16][1.2].text == ">63"


def test_final_loss_marks_unreached(analysis):
    table = build_table(analysis, "final_loss")
    assert table.cells[8][1.2].text == "3.4100"
    assert table.cells[16][1.2].text.endswith("†")
    assert table.best[8] == 1.2
    # 3.46 at p=1 beats the median 3.52 of 3.44 and a censored 3.6 at p=1.2.
    assert table.best[16] == 1.0


def test_time_metric_must_match_analysis(analysis):
    with pytest.raises(ValueError, match="needs an analysis with metric 'seconds'"):
        build_table(analysis, "seconds")


def test_latex_structure(analysis):
    table = build_table(analysis)
    text = to_latex(table, "tab:test")
    lines = text.splitlines()
    order = [
        r"\begin{table}",
        r"\begin{tabular}{rrrr}",
        r"\toprule",
        r"\midrule",
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    positions = [next(i for i, l in enumerate(lines) if s in l) for s in order]
    assert positions == sorted(positions)

    body = lines[positions[3] + 1 : positions[4]]
    assert len(body) == 2
    for line in body:
        assert line.count("&") == 3
        assert line.rstrip().endswith(r"\\")
        assert line.count(r"\textbf{") == 1
    assert r"\textbf{32}" in body[0]
    assert "$>$63" in body[1]
    assert r"batch\_power\_grid" in text
    assert r"\label{tab:test}" in text
    # Apostrophes stay; a quote that opens a word becomes LaTeX's opening quote.
    assert "the trials' last evaluation" in text
    spread = to_latex(build_table(analysis, "final_loss", spread=True), "tab:spread")
    assert r"`$\pm$ s': standard deviation" in spread

    # Only booktabs beyond plain LaTeX.
    commands = set(re.findall(r"\\([a-zA-Z]+)", text))
    assert commands <= {
        "begin", "end", "centering", "caption", "label", "toprule", "midrule",
        "bottomrule", "cmidrule", "multicolumn", "textbf", "le", "ge", "pm", "dagger",
        "usepackage",
    }  # fmt: skip


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_compiles(analysis, tmp_path):
    table = build_table(analysis, "final_loss", spread=True)
    document = (
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        + to_latex(table, "tab:test")
        + to_latex(build_table(analysis), "tab:steps")
        + "\\end{document}\n"
    )
    (tmp_path / "table.tex").write_text(document)
    completed = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "table.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert (tmp_path / "table.pdf").stat().st_size > 1000


class _TableParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self.strong_rows: set[int] = set()
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "strong":
            self.strong_rows.add(len(self.rows) - 1)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def test_html_table_cells(analysis):
    parser = _TableParser()
    parser.feed(to_html_table(build_table(analysis)))
    assert parser.rows[0] == ["batch size", "p = 1", "p = 1.2", "p = 1.4"]
    assert parser.rows[1] == ["8", "42", "32", "51"]
    assert parser.rows[2] == ["16", "21", ">63", ">100"]
    assert parser.strong_rows == {1, 2}


def test_export_files_and_artifacts(analysis, mlflow_store, tmp_path):
    paths = export_tables(
        analysis, tmp_path / "exports", formats=("md", "csv", "latex", "html")
    )
    assert {p.suffix for p in paths.values()} == {".md", ".csv", ".tex", ".html"}
    assert all(p.parent == tmp_path / "exports" for p in paths.values())
    assert paths["md"].name == "batch_power_grid-smoke-lm-r1.md"
    spread = export_tables(analysis, tmp_path, formats=("md",), spread=True)
    assert spread["md"].name == "batch_power_grid-smoke-lm-r1-spread.md"

    client, root = mlflow_store
    (root / "artifacts").mkdir()
    experiment = client.create_experiment(
        "exports", artifact_location=(root / "artifacts").as_uri()
    )
    parent = client.create_run(experiment).info.run_id
    assert log_artifacts(client, parent, list(paths.values()), "exports")
    logged = {a.path for a in client.list_artifacts(parent, "exports")}
    assert logged == {f"exports/{p.name}" for p in paths.values()}
    assert not log_artifacts(client, None, list(paths.values()), "exports")


def test_artifacts_skipped_when_location_missing(analysis, mlflow_store, tmp_path):
    paths = export_tables(analysis, tmp_path, formats=("md",))
    client, _ = mlflow_store
    moved = tmp_path / "moved-away"
    experiment = client.create_experiment("moved", artifact_location=moved.as_uri())
    parent = client.create_run(experiment).info.run_id
    assert not log_artifacts(client, parent, list(paths.values()), "exports")
    assert not moved.exists()


def test_summary_states_counts_and_fits(analysis):
    text = summary_text(analysis)
    assert (
        "trials: 12 recorded, 9 reached (used), 2 censored (lower bounds), "
        "1 excluded (1 diverged, 0 failed)"
    ) in text
    assert "90% bootstrap CIs over seeds, 200 resamples, seed 0" in text
    assert "linear trend: p* =" in text
    assert "noise-scale trend: p* =" in text
    assert "note: 2 batch sizes" in text


def _progress_analysis(unit: str):
    """Return a progress-to-target analysis of a workload that counts `unit`."""
    rows = [
        reached(8, 1.0, 40, seed=0),
        reached(8, 1.2, 30, seed=0),
        reached(16, 1.0, 20, seed=0),
        reached(16, 1.2, 26, seed=0),
    ]
    run = make_run(rows)
    run.progress_unit = unit
    options = AnalysisOptions(metric="progress", bootstrap_samples=200)
    return analyze_run(run, options)


@pytest.mark.parametrize("unit", ["tokens", "examples"])
def test_export_progress_file_named_by_unit(unit, tmp_path):
    analysis = _progress_analysis(unit)
    paths = export_tables(analysis, tmp_path, ("md", "latex"), unit)
    assert paths["md"].name == f"batch_power_grid-smoke-lm-r1-{unit}.md"
    assert paths["latex"].name == f"batch_power_grid-smoke-lm-r1-{unit}.tex"
    assert f"\\label{{tab:batch-power-grid-smoke-lm-{unit}}}" in (
        paths["latex"].read_text()
    )
    table = build_table(analysis, unit)
    assert table.title.endswith(f": {unit} to val/loss <= 3.5")
    # 30 steps of 8 sequences of 32 tokens, as make_run counts progress.
    assert table.frame().set_index("batch_size").loc[8, "p=1.2"] == "7680"


@pytest.mark.parametrize(
    ("unit", "other"), [("tokens", "examples"), ("examples", "tokens")]
)
def test_progress_table_rejects_other_unit(unit, other):
    analysis = _progress_analysis(unit)
    with pytest.raises(ValueError, match=f"counts its progress in {unit}"):
        build_table(analysis, other)


def test_value_table_leaves_out_steps_notes(analysis, tmp_path):
    steps = export_tables(analysis, tmp_path / "steps", formats=("md",))["md"]
    final = export_tables(analysis, tmp_path / "final", ("md",), "final_loss")["md"]
    steps_text, final_text = steps.read_text(), final.read_text()
    assert "linear trend: p* =" in steps_text
    assert "Note: " in steps_text
    assert "linear trend: p* =" not in final_text
    assert "Note: " not in final_text
    assert "Cells are the median over seeds of the last recorded value" in final_text


def test_metric_names_keep_settings_that_read_alike_apart(mlflow_store):
    values = {
        ("gap", "llama 66m", "bs_4", "AdamPower (p=1.2)"): -0.05,
        ("gap", "llama+66m", "bs_4", "AdamPower (p=1.2)"): -0.02,
        ("gap", "llama_66m", "bs_4", "Adam"): 0.0,
        ("gap", "plain", "bs_4", "Adam"): float("nan"),
    }
    names = metric_names(values)
    assert "gap/llama_66m/bs_4/Adam" in names
    alike = sorted(name for name in names if "AdamPower" in name)
    assert len(alike) == 2
    assert all(
        re.fullmatch(r"gap/llama_66m/bs_4/AdamPower_p_1\.2-[0-9a-f]{6}", name)
        for name in alike
    )
    assert sorted(names[name] for name in alike) == [-0.05, -0.02]
    assert not any(name.startswith("gap/plain") for name in names)
    assert metric_names(values) == names

    client, _ = mlflow_store
    experiment = client.create_experiment("metric-names")
    run = client.create_run(experiment).info.run_id
    for name, value in names.items():
        client.log_metric(run, name, value)
    assert client.get_run(run).data.metrics == names


def test_latex_label_keeps_only_characters_latex_reads():
    assert latex_label("my_study", "smoke", "lm", "steps") == (
        "tab:my-study-smoke-lm-steps"
    )
    spaced = latex_label("my_study", "smoke", "lm a", "steps")
    signed = latex_label("my_study", "smoke", "lm+a", "steps")
    assert re.fullmatch(r"tab:my-study-smoke-lm-a-steps-[0-9a-f]{6}", spaced)
    assert re.fullmatch(r"tab:my-study-smoke-lm-a-steps-[0-9a-f]{6}", signed)
    assert spaced != signed
    odd = latex_label("my_study", "smoke", "lm a'b\"c{ü}", "steps")
    assert re.fullmatch(r"tab:my-study-smoke-lm-a-b-c----steps-[0-9a-f]{6}", odd)
