"""One line plot (log2 x axis) written as a PNG: the shape of every plot the eval and the benchmarks make."""

from __future__ import annotations

from pathlib import Path


def line_plot(series: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str, title: str,
              hline: tuple[str, float] | None = None) -> Path:
    """`series`: label -> [(x, y), ...]; `hline`: an optional (label, y) reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        if points:
            ax.plot(*zip(*sorted(points)), marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[1], color="black", linestyle="--", label=hline[0])
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
