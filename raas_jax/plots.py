"""The plots the eval and the benchmarks write as PNGs: a line plot (log2 x axis) and a grouped bar chart."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(series: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str, title: str,
              hline: tuple[str, float] | None = None, log_y: bool = False, log_x: bool = True) -> Path:
    """`series`: label -> [(x, y), ...]; `hline`: an optional (label, y) reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        if points:
            ax.plot(*zip(*sorted(points)), marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[1], color="black", linestyle="--", label=hline[0])
    if log_x:
        ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bar_plot(groups: list[str], series: dict[str, list[float | None]], path: Path, ylabel: str, title: str,
             hline: tuple[str, float] | None = None) -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per series (None = no bar)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + i * width for g, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=label)
    if hline is not None:
        ax.axhline(hline[1], color="black", linestyle="--", linewidth=1, label=hline[0])
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
