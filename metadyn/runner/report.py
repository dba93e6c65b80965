"""Markdown tables and PNG plots for run folders (matplotlib is imported only here, on use)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows of dicts -> a Markdown table; ``columns`` are ``(key, header, format)`` like ``("acc", "Acc.", ".3f")``."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---:" if f else ":---" for _, _, f in columns) + "|"
    lines = [head, rule]
    for r in rows:
        cells = []
        for k, _, f in columns:
            v = r.get(k)
            cells.append("—" if v is None else (format(v, f) if f else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_curve_plot(fig, ax, path: Path, title: str, xlabel: str = "MFLOPs per sample",
                      ylabel: str = "test accuracy (%)", legend_size: int = 8) -> None:
    """Label, grid, legend (lower right), save at 120 dpi and close an accuracy-vs-cost figure."""
    plt = pyplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_mflops(path: Path, curve: Sequence[dict], exits: Sequence[dict], title: str = "") -> None:
    """The budgeted curve (dynamic early exit) with every exit's anytime accuracy as points."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if curve:
        pts = sorted(curve, key=lambda c: c["mflops"])
        ax.plot([c["mflops"] for c in pts], [100 * c["accuracy"] for c in pts], "-", marker=".",
                label="early exit (thresholds fitted on val)")
    ax.plot([e["mflops"] for e in exits], [100 * e["accuracy"] for e in exits], "s--", color="gray",
            label="single exit (anytime)")
    for e in exits:
        ax.annotate(str(e["exit"]), (e["mflops"], 100 * e["accuracy"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=8, color="gray")
    finish_curve_plot(fig, ax, path, title or "accuracy vs computation")


def plot_exit_histogram(path: Path, fractions: Sequence[float], title: str = "") -> None:
    """Fraction of test samples leaving at each exit."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(fractions)), [100 * f for f in fractions], color="tab:blue")
    ax.set_xticks(range(len(fractions)))
    ax.set_xlabel("exit")
    ax.set_ylabel("samples leaving (%)")
    ax.set_title(title or "where samples exit")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(path: Path, before: Sequence[dict], after: Sequence[dict] | None = None) -> None:
    """Reliability diagrams, one panel per exit: accuracy per confidence bin, before/after temperature scaling."""
    plt = pyplot()
    k = len(before)
    fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.8), squeeze=False)
    for i, ax in enumerate(axes[0]):
        for rel, color, label in ((before[i], "tab:red", "raw"), ((after or [None] * k)[i], "tab:blue", "T-scaled")):
            if rel is None:
                continue
            xs = [c for c, n in zip(rel["confidence"], rel["count"]) if n > 0]
            ys = [a for a, n in zip(rel["accuracy"], rel["count"]) if n > 0]
            ax.plot(xs, ys, "o-", ms=3, color=color, label=label)
        ax.plot([0, 1], [0, 1], ":", color="gray")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"exit {i}", fontsize=9)
        ax.set_xlabel("confidence", fontsize=8)
        if i == 0:
            ax.set_ylabel("accuracy", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
