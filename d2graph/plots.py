"""Plots: accuracy against cost for the routing methods of a sweep, and training curves.

In:  plain rows of numbers — sweep points ({method, cost_fraction, accuracy, budget, ...})
     or a run's metrics rows ({stage, trainer, epoch, train_loss, val_score, val_accuracy, ...}).
Out: `tradeoff_plot(points, out_stem, title=...)` and `training_plot(rows, out_stem)` write
     `OUT_STEM.png` and `OUT_STEM.svg` and return their paths.
Guarantees: files are written atomically (`d2graph.files.atomic_path`); the same rows give
byte-identical SVG files (fixed hash salt, no date in the metadata, text drawn as paths)
and identical PNG files; no pyplot state is touched (a `Figure` rendered by Agg), so
plotting is safe in threads and leaves a user's own pyplot figures alone. matplotlib is
imported on first use; without it the functions raise an ImportError that says what to
install.

Example:
    >>> tradeoff_plot([{"method": "learned", "cost_fraction": 0.3, "accuracy": 0.9, "budget": 0.3},
    ...                {"method": "static", "cost_fraction": 1.0, "accuracy": 0.92, "budget": None,
    ...                 "path": "Q1=1"}], "runs/cascade/tradeoff", title="cascade")  # doctest: +SKIP
    [PosixPath('runs/cascade/tradeoff.png'), PosixPath('runs/cascade/tradeoff.svg')]
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Mapping

from .files import atomic_path

__all__ = ["tradeoff_plot", "training_plot"]

STATIC = "static"  # the method whose points are single static paths, drawn unconnected
FORMATS = ("png", "svg")
DPI = 150
SIZE = (6.4, 4.4)  # inches


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("drawing plots needs matplotlib: `pip install matplotlib`") from None
    return matplotlib, Figure


@contextlib.contextmanager
def _style():
    matplotlib, _ = _matplotlib()
    # A fixed salt makes the SVG's element ids the same from run to run; glyphs as paths
    # keep the file independent of the fonts installed where it is opened.
    with matplotlib.rc_context({"svg.hashsalt": "d2graph", "svg.fonttype": "path", "font.size": 9}):
        yield


def _save(fig, out_stem: str | Path) -> list[Path]:
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in FORMATS:
        path = stem.with_name(stem.name + "." + fmt)
        # No date (SVG) and no software version (both) in the files: same rows, same bytes.
        metadata = {"Date": None, "Creator": None} if fmt == "svg" else {"Software": None}
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata)
        written.append(path)
    return written


def _new_figure(nrows: int = 1):
    _, Figure = _matplotlib()
    fig = Figure(figsize=(SIZE[0], SIZE[1] * (1 if nrows == 1 else 0.75 * nrows)), layout="constrained")
    return fig, fig.subplots(nrows, 1, squeeze=False)[:, 0]


def tradeoff_plot(points: Iterable[Mapping[str, Any]], out_stem: str | Path, *, title: str,
                  metric: str = "accuracy", spread: str | None = None) -> list[Path]:
    """Draw `metric` against mean cost, one line per method (points sorted by cost).

    Each point is a dict with `method`, `cost_fraction` and `metric` (default "accuracy");
    `budget` is optional. Points of the method "static" are single static paths: drawn as
    unconnected points, each labelled with its `path` (or `label`). Points missing the
    metric are left out. The drawing does not depend on the order of the points.
    `spread` names a key holding a half-width (e.g. a standard deviation over seeds): each
    method's line then gets a shaded band of ± that much, the static paths error bars.
    Writes OUT_STEM.png and OUT_STEM.svg; returns their paths.

    Example:
        >>> tradeoff_plot(points, "runs/g/tradeoff", title="g: accuracy vs cost")  # doctest: +SKIP
    """
    points = [p for p in points if p.get(metric) is not None and p.get("cost_fraction") is not None]
    methods: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        methods.setdefault(str(p["method"]), []).append(p)

    with _style():
        fig, (ax,) = _new_figure()
        palette = [c["color"] for c in _matplotlib()[0].rcParams["axes.prop_cycle"]]
        colour = 0
        # Methods in name order: a method keeps its colour from plot to plot, whatever
        # order a sweep produced its points in.
        for method, group in sorted(methods.items(), key=lambda m: (m[0] == STATIC, m[0])):
            group = sorted(group, key=lambda p: (float(p["cost_fraction"]), float(p[metric])))
            xs = [float(p["cost_fraction"]) for p in group]
            ys = [float(p[metric]) for p in group]
            widths = [float(p.get(spread) or 0.0) for p in group] if spread else None
            if method == STATIC:
                ax.scatter(xs, ys, marker="s", s=22, color="0.35", label="static paths", zorder=3)
                if widths and any(widths):
                    ax.errorbar(xs, ys, yerr=widths, fmt="none", ecolor="0.35", elinewidth=0.8, capsize=2,
                                zorder=3)
                for p, x, y in zip(group, xs, ys):
                    text = p.get("path") or p.get("label")
                    if text:
                        ax.annotate(str(text), (x, y), xytext=(4, 3), textcoords="offset points",
                                    fontsize=7, color="0.35")
                continue
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.4, label=method,
                    color=palette[colour % len(palette)], zorder=4)
            if widths:
                ax.fill_between(xs, [y - w for y, w in zip(ys, widths)], [y + w for y, w in zip(ys, widths)],
                                color=palette[colour % len(palette)], alpha=0.18, linewidth=0, zorder=2)
            colour += 1
        ax.set_xlabel("mean cost (fraction of the full graph)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(title)
        # Room right of the full graph (1.0) for the labels of the dearest static paths.
        ax.set_xlim(0, 1.1 * max([1.0, *(float(p["cost_fraction"]) for p in points)]))
        ax.grid(True, linewidth=0.4, alpha=0.5)
        if methods:
            ax.legend(loc="lower right", frameon=False)
        return _save(fig, out_stem)


def training_plot(rows: Iterable[Mapping[str, Any]], out_stem: str | Path, *, title: str = "training") -> list[Path]:
    """Training curves per stage from a run's metrics rows: the training loss (top axes) and
    the validation score (bottom axes) of each epoch, one line per stage (rows with `stage`,
    `epoch` and `train_loss` or `val_score`), the stages one after another on the x axis with
    a dotted line between them. A stage that calibrates once instead of training in epochs (a
    row with `val_accuracy` and no `epoch`, e.g. `threshold`) is one marked point on the bottom
    axes at its validation accuracy. Writes OUT_STEM.png and .svg; [] when no row has
    anything to draw.

    Example:
        >>> training_plot(run.rows(), "runs/g/training", title="g: training")  # doctest: +SKIP
        [PosixPath('runs/g/training.png'), PosixPath('runs/g/training.svg')]
    """
    stages: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("stage") is None:
            continue
        stage = stages.setdefault(str(r["stage"]), {"trainer": r.get("trainer"), "epochs": {}, "calibrated": None})
        if r.get("epoch") is not None and (r.get("train_loss") is not None or r.get("val_score") is not None):
            stage["epochs"][float(r["epoch"])] = r  # a resumed run logs an epoch once; the last row wins anyway
        elif r.get("epoch") is None and r.get("val_accuracy") is not None:
            stage["calibrated"] = float(r["val_accuracy"])
    stages = {name: s for name, s in stages.items() if s["epochs"] or s["calibrated"] is not None}
    if not stages:
        return []

    with _style():
        fig, (loss, score) = _new_figure(2)
        palette = [c["color"] for c in _matplotlib()[0].rcParams["axes.prop_cycle"]]
        offset = 0.0
        for i, (name, stage) in enumerate(stages.items()):
            colour = palette[i % len(palette)]
            label = f"{name} ({stage['trainer']})" if stage["trainer"] else name
            if i:
                for ax in (loss, score):
                    ax.axvline(offset + 0.5, color="0.6", linewidth=0.8, linestyle=":")
            if stage["epochs"]:
                epochs = sorted(stage["epochs"].items())
                xs = [offset + e for e, _ in epochs]
                for ax, key in ((loss, "train_loss"), (score, "val_score")):
                    pts = [(x, float(r[key])) for x, (_, r) in zip(xs, epochs) if r.get(key) is not None]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", markersize=3, linewidth=1.2, color=colour, label=label)
                offset = max(xs)
            if stage["calibrated"] is not None:  # fitted once, after the epochs (if any) of its stage
                offset += 1
                score.scatter([offset], [stage["calibrated"]], marker="*", s=80, color=colour, zorder=4,
                              label=f"{label}: validation accuracy once fitted")
        loss.set_ylabel("training loss")
        score.set_ylabel("validation score\n(each stage's own; higher is better)")
        score.set_xlabel("epoch (stages one after another)")
        loss.set_title(title)
        for ax in (loss, score):
            ax.grid(True, linewidth=0.4, alpha=0.5)
            ax.set_xlim(0.5, offset + 0.5)
            ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", frameon=False)
        return _save(fig, out_stem)
