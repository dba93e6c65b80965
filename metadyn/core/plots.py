"""Plots people would rather look at than read: accuracy against MFLOPs per group (exits as points with their
spread, budgeted curves as lines), per-index bars (samples leaving at each exit, running each block) and
reliability diagrams. matplotlib is imported on use only; every PNG is written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from metadyn.core.files import atomic_file


def spread_of(r: dict) -> float | None:
    """A row's spread: its std over seeds, else its 95% CI over episodes."""
    return r.get("accuracy_std", r.get("ci95"))


def pyplot():
    """``matplotlib.pyplot`` with the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120, tight: bool = True) -> None:
    """Write ``fig`` as a PNG atomically (:func:`metadyn.core.files.atomic_file`) and close it."""
    plt = pyplot()
    try:
        with atomic_file(path) as f:
            if tight:
                fig.tight_layout()
            fig.savefig(f, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def plot_groups(path: Path, rows: Sequence[dict], curves: Sequence[dict], title: str, x: str = "mflops",
                xlabel: str = "MFLOPs per sample", ylabel: str = "test accuracy (%)", labels: dict | None = None,
                logx: bool = False) -> None:
    """Per group: its curve (line) and its exits (points with std / CI error bars)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, g in enumerate(dict.fromkeys([r["group"] for r in rows] + [c["group"] for c in curves])):
        color, label = f"C{i % 10}", (labels or {}).get(g, g)
        pts = sorted((c for c in curves if c["group"] == g), key=lambda c: c[x])
        if pts:
            ax.plot([c[x] for c in pts], [100 * c["accuracy"] for c in pts], "-", color=color, label=label)
            label = None
        ex = [r for r in rows if r["group"] == g and r["accuracy"] is not None]
        if ex:
            err = [100 * (spread_of(r) or 0) for r in ex]
            ax.errorbar([r[x] for r in ex], [100 * r["accuracy"] for r in ex], yerr=err, fmt="o", color=color,
                        ms=4, capsize=2, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def plot_bars(path: Path, values: Sequence[float], xlabel: str, ylabel: str, title: str, start: int = 0) -> None:
    """A bar per index (e.g. the share of samples leaving at each exit, or running each block), in %."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(range(start, start + len(values)), [100 * v for v in values], color="tab:blue")
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 100))
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_reliability(path: Path, before: Sequence[dict], after: Sequence[dict] | None = None) -> None:
    """Reliability diagrams, one panel per exit: accuracy per confidence bin, before/after temperature scaling."""
    plt = pyplot()
    k = len(before)
    fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.8), squeeze=False)
    for i, ax in enumerate(axes[0]):
        for rel, color, label in ((before[i], "tab:red", "raw"), ((after or [None] * k)[i], "tab:blue", "T-scaled")):
            if rel is not None:
                keep = [j for j, n in enumerate(rel["count"]) if n > 0]
                ax.plot([rel["confidence"][j] for j in keep], [rel["accuracy"][j] for j in keep], "o-", ms=3,
                        color=color, label=label)
        ax.plot([0, 1], [0, 1], ":", color="gray")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence")
        ax.set_title(f"exit {i}", fontsize=9)
        if i == 0:
            ax.set_ylabel("accuracy")
            ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)
