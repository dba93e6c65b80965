"""Markdown and plots as functions of results (matplotlib is imported only here, on use)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

FLOPS_NOTE = ("MFLOPs are counted by `torch.utils.flop_counter` (2 FLOPs per multiply-add); an exit's cost includes "
              "every earlier exit's head.")


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


def pct(m: float | None, spread: float | None = None, digits: int = 2) -> str | None:
    """``0.9812, 0.004`` -> ``"98.12 ± 0.40"`` (percent); None stays None."""
    if m is None:
        return None
    return f"{100 * m:.{digits}f}" + ("" if spread is None else f" ± {100 * spread:.{digits}f}")


def spread_of(r: dict) -> float | None:
    return r.get("accuracy_std", r.get("ci95"))


def exit_table(rows: Sequence[dict], key: str = "accuracy", labels: dict | None = None, digits: int = 2) -> str:
    """One line per group, one column per exit: ``key`` in % (± its std or CI) and the exit's MFLOPs."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    k = max(r["exit"] for r in rows) + 1
    table = []
    for g in groups:
        line = {"group": f"`{g}`" + (f" {labels[g]}" if labels and g in labels else "")}
        for r in rows:
            if r["group"] == g:
                s = r.get(f"{key}_std", r.get("ci95") if key == "accuracy" else None)
                cell = pct(r[key], s, digits)
                line[f"e{r['exit']}"] = None if cell is None else f"{cell} ({r['mflops']:.3f})"
                if r.get("diverged"):
                    line["group"] += f" (diverged: {r['diverged']} of {r['n'] + r['diverged']})"
        table.append(line)
    return markdown_table(table, [("group", "", "")] + [(f"e{i}", f"exit {i}", "") for i in range(k)])


def budget_table(budgets: Sequence[dict], full_mflops: float | None = None) -> str:
    """One line per group, one column per budget fraction: test accuracy % (test MFLOPs)."""
    groups = list(dict.fromkeys(b["group"] for b in budgets))
    fracs = list(dict.fromkeys(b["budget_fraction"] for b in budgets))
    table = []
    for g in groups:
        line = {"group": f"`{g}`"}
        for b in budgets:
            if b["group"] == g and b["accuracy"] is not None:
                line[b["budget_fraction"]] = f"{pct(b['accuracy'], b.get('accuracy_std'))} ({b['mflops']:.3f})"
        table.append(line)
    head = [(f, f"{100 * f:.0f}%" + (f" ({f * full_mflops:.3f})" if full_mflops else ""), "") for f in fracs]
    return markdown_table(table, [("group", "", "")] + head)


def comparison_lines(comparisons: Sequence[dict], unit: str) -> str:
    """The paired differences as sentences, with the rule that decided them."""
    if not comparisons:
        return "(no comparisons in this run)"
    lines = [f"Paired differences over {unit}; two-sided paired t-test, p-values adjusted together by Holm's "
             f"method over the {len(comparisons)} comparisons below; significant at adjusted p < 0.05.", ""]
    for c in comparisons:
        se = "" if c["se"] is None else f" ± {100 * c['se']:.2f}"
        p = "" if c["p"] is None else f", p = {c['p']:.3g}, adjusted {c['p_holm']:.3g}"
        lines.append(f"- `{c['group']}` − `{c['against']}` at {c['at']}: {100 * c['difference']:+.2f}{se} points "
                     f"(n = {c['n']}{p}): **{c['verdict']}**")
    return "\n".join(lines)


def settings_line(m: dict) -> str:
    s = m["settings"]
    return (f"Dataset `{m['dataset']}`, seed {m['seed']}, device `{s['device']}`, {s['threads']} CPU thread(s), "
            f"{s['dtype']}, torch {s['torch']}.")


# --------------------------------------------------------------------------- plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 120) -> None:
    """Write ``fig`` as a PNG atomically (temp file, then rename), with the umask's permissions."""
    import os
    import tempfile

    from metadyn.runner.results import file_mode

    plt = pyplot()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            fig.tight_layout()
            fig.savefig(f, dpi=dpi, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
    _save(fig, path)


def plot_bars(path: Path, values: Sequence[float], xlabel: str, ylabel: str, title: str, start: int = 0) -> None:
    """A bar per index (e.g. the share of samples leaving at each exit, or running each block), in %."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(range(start, start + len(values)), [100 * v for v in values], color="tab:blue")
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 100))
    ax.set_title(title, fontsize=9)
    _save(fig, path)


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
    _save(fig, path, dpi=110)
