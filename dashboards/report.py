"""Write one HTML page per study run with, for each workload, the table, the
best power per batch size, the trend fits and the figures as embedded images."""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path

from dashboards.plots import write_plots
from study.analysis import PowerAnalysis
from study.export import (
    HTML_STYLE,
    best_power_frame,
    build_table,
    count_line,
    power_table_metric,
    to_html_table,
    trend_lines,
)

REPORT_STYLE = (
    HTML_STYLE
    + """
table.plain { border-collapse: collapse; }
table.plain th, table.plain td { padding: 0.2em 0.7em; border-bottom: 1px solid #ccc; }
img { max-width: 100%; display: block; margin: 1em 0; }
pre { background: #f4f4f4; padding: 0.6em; white-space: pre-wrap; }
"""
)


def _image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _workload_section(analysis: PowerAnalysis, images: dict[str, Path]) -> str:
    run = analysis.run
    options = analysis.options
    parts = [
        f"<h2>{html.escape(run.label)} ({html.escape(run.workload)})</h2>",
        f"<p>{html.escape(count_line(analysis))}</p>",
        to_html_table(build_table(analysis, power_table_metric(analysis))),
        "<h3>Best power per batch size</h3>",
        best_power_frame(analysis).to_html(index=False, classes="plain", border=0),
    ]
    if analysis.best.resamples.max():
        parts.append(
            f"<p class='note'>Intervals: {options.confidence:.0%} percentile "
            f"bootstrap over seeds, {options.bootstrap_samples} resamples, seed "
            f"{options.bootstrap_seed}.</p>"
        )
    parts.append(
        "<p class='note'>p*: the vertex of a parabola through log time at the grid "
        "minimum and its two neighbours, or the grid power when the minimum is at "
        "the grid edge or a neighbour has no time. p* sd: the uncertainty that "
        "weights the trend fits, from the bootstrap over seeds plus a grid term "
        "where p* is a grid power.</p>"
    )
    if analysis.at_best_step is not None and not analysis.at_best_step.empty:
        table = build_table(analysis, "at_best_step")
        parts.append(to_html_table(table))
    parts.append("<h3>Trend of p* with batch size</h3>")
    parts.append(f"<pre>{html.escape(chr(10).join(trend_lines(analysis)))}</pre>")
    if analysis.notes:
        items = "".join(f"<li>{html.escape(note)}</li>" for note in analysis.notes)
        parts.append(f"<h3>Notes</h3><ul>{items}</ul>")
    for name, path in images.items():
        parts.append(_image_tag(path, f"{run.label} {name}"))
    return "\n".join(parts)


def write_report(
    analyses: list[PowerAnalysis], directory: Path
) -> tuple[Path, list[Path]]:
    """Write the figures and the HTML page of one study run.

    Returns the page and the PNG files, which sit beside it and are also
    embedded in it, so the page can be moved or logged alone.
    """
    directory.mkdir(parents=True, exist_ok=True)
    first = analyses[0].run
    images = []
    sections = []
    for analysis in analyses:
        plots = write_plots(analysis, directory)
        images.extend(plots.values())
        sections.append(_workload_section(analysis, plots))
    title = f"{first.study} ({first.scale}), run {first.run_id}"
    path = directory / f"{first.study}-{first.scale}-{first.run_id}-report.html"
    path.write_text(_page(title, sections))
    return path, images


def _page(title: str, sections: list[str]) -> str:
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            "<html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title>",
            f"<style>{REPORT_STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f"<p class='note'>Written {created} UTC by <code>study report</code>.</p>",
            *sections,
            "</body></html>",
        ]
    )


def write_tables_page(
    title: str,
    tables: list[tuple],
    notes: list[str],
    images: list[Path],
    path: Path,
) -> Path:
    """Write one HTML page with headed tables, a list of notes and embedded PNGs,
    for the studies whose analysis is not a batch size x power table.

    Each table is (heading, frame) or (heading, frame, footnote).
    """
    sections = []
    for heading, frame, *footnote in tables:
        section = f"<h2>{html.escape(heading)}</h2>\n" + frame.to_html(
            index=False, classes="plain", border=0
        )
        if footnote:
            section += f"\n<p>{html.escape(footnote[0])}</p>"
        sections.append(section)
    if notes:
        items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
        sections.append(f"<h2>Notes</h2><ul>{items}</ul>")
    sections.extend(_image_tag(image, image.stem) for image in images)
    path.write_text(_page(title, sections))
    return path
