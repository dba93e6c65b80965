"""Markdown as a function of results: the tables and sentences of every report (plots: :mod:`metadyn.core.plots`)."""

from __future__ import annotations

from collections.abc import Sequence

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
    if all(c["p"] is None for c in comparisons):  # one seed (or episode) per group: a spread needs two
        rule = (f"Paired differences over {unit}: one unit each, so none is tested (no spread; run several seeds for "
                "a test).")
    else:
        rule = (f"Paired differences over {unit}; two-sided paired t-test (the exact sign-flip test where every "
                f"unit shows the same difference), p-values adjusted together by Holm's method over the "
                f"{len(comparisons)} comparisons below; significant at adjusted p < 0.05.")
    lines = [rule, ""]
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
