"""The report's output: report.md with its figures (PNG) and tables (CSV and Markdown), written reproducibly.

Figures are built with matplotlib's object API (`Figure`, Agg canvas), never pyplot, so no window or global
figure state is involved, and saved without the software/date metadata so a second run writes the same bytes.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# Fixed style: the same numbers draw the same picture whatever the user's matplotlibrc says.
STYLE = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 8, "figure.dpi": 100,
         "savefig.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "lines.markersize": 4}
OUTCOME_MARKS = {"error": "error", "diverged": "diverged", "no result": "no result", "pending": "not started",
                 "running": "running", "incomplete": "incomplete"}


def new_figure(n_panels: int = 1, *, width: float = 4.6, height: float = 3.6, ncols: int | None = None,
               sharey: bool = False):
    """(figure, flat list of axes) for n_panels panels laid out in rows of ncols."""
    import matplotlib

    ncols = ncols or min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def log_scale_if_wide(ax, values, axis: str = "y", ratio: float = 20.0) -> None:
    """Log axis when the positive finite values span more than `ratio` (MSE falls by decades over training)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) and v.max() / v.min() > ratio:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def batch_axis(ax, batch_sizes) -> None:
    """Batch sizes are powers of two in both studies: log2 x axis, ticks at the sizes that ran."""
    sizes = sorted({int(b) for b in batch_sizes})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlim(sizes[0] / 1.3, sizes[-1] * 1.3)  # the grid's sizes, whatever else the panel draws
    ax.minorticks_off()
    ax.set_xlabel("batch size (images)")


def legend_below(ax, ncol: int = 2) -> None:
    """The panel's legend under its x label, off the curves (and off a right-hand axis' points, which "best"
    cannot see); constrained layout makes room for it."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, fontsize="small", frameon=False)


def epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def fmt(value, digits: int = 4) -> str:
    """A table cell: numbers to `digits` significant figures, NaN as an en dash, anything else as text."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


class ReportWriter:
    """Collects report.md section by section; tables go to CSV next to it, figures to PNG."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self.figures: list[str] = []
        self.tables: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.lines += ["#" * level + " " + text, ""]

    def text(self, *paragraphs: str) -> None:
        for p in paragraphs:
            self.lines += [p, ""]

    def bullets(self, items) -> None:
        self.lines += [f"- {item}" for item in items] + [""]

    def table(self, name: str, df: pd.DataFrame, caption: str, *, shown: pd.DataFrame | None = None,
              notes=()) -> None:
        """Write df to <name>.csv and show `shown` (default df) in the report, with the caption and notes."""
        if name + ".csv" in self.tables:
            raise ValueError(f"table {name} written twice")
        df.to_csv(self.out / f"{name}.csv", index=False, lineterminator="\n")
        self.tables.append(name + ".csv")
        self.lines += [f"**{caption}** ([{name}.csv]({name}.csv))", "", markdown_table(df if shown is None else shown),
                       ""]
        for note in notes:
            self.lines += [f"> {note}", ""]

    def figure(self, name: str, fig: Figure, caption: str) -> None:
        if name + ".png" in self.figures:
            raise ValueError(f"figure {name} written twice")
        fig.savefig(self.out / f"{name}.png", format="png", metadata={"Software": None})
        self.figures.append(name + ".png")
        self.lines += [f"![{caption}]({name}.png)", "", f"*{caption}*", ""]

    def finish(self) -> Path:
        path = self.out / "report.md"
        path.write_text("\n".join(self.lines).rstrip() + "\n")
        return path
