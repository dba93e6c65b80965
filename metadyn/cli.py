"""``metadyn run | bench | list``.

Bad input (a malformed task file, a wrong key or type, a missing dataset, impossible sizes, NaNs)
exits with code 2 and one line on stderr naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from metadyn.errors import InputError


def _mflops(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def summary_lines(metrics: dict) -> list[str]:
    """The closing summary of ``metadyn run``: one line per group of ``metrics["rows"]`` (a method, variant
    or condition; ``model`` for a kind with one group), its exits in order with accuracy and MFLOPs."""
    groups: dict[str, list[dict]] = {}
    for row in metrics.get("rows") or []:
        groups.setdefault(str(row.get("group", "model")), []).append(row)
    lines = []
    for group, rows in groups.items():
        parts = []
        for i, r in enumerate(sorted(rows, key=lambda r: r.get("exit", 0))):
            if r.get("accuracy") is None:  # every run of this group diverged
                parts.append(f"diverged in {r.get('diverged', '?')} of {r.get('diverged', 0) + r.get('n', 0)} runs")
                continue
            std = f"±{100 * r['accuracy_std']:.2f}" if r.get("accuracy_std") is not None else ""
            label = f"exit {r['exit']} " if "exit" in r else ""
            unit = " MFLOPs" if i == 0 else ""
            parts.append(f"{label}{100 * r['accuracy']:.2f}{std}% ({_mflops(r['mflops'])}{unit})")
        lines.append(f"  {group}: {' · '.join(parts)}")
    return lines


def cmd_run(args) -> int:
    from metadyn.runner import run_task

    out, metrics = run_task(args.task, args.set or [], quick=args.quick, out=args.out, progress=not args.no_progress)
    print(f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir()))}")
    for line in summary_lines(metrics):
        print(line)
    return 0


def bench_options(name: str, fn, quick: bool, options: dict) -> None:
    """An unknown option for benchmark ``name`` is an :class:`InputError` naming its options."""
    try:
        inspect.signature(fn).bind(quick=quick, **options)
    except TypeError:
        params = [p for p in inspect.signature(fn).parameters if p != "quick"]
        bad = ", ".join(repr(k) for k in options if k not in params)
        raise InputError(f"benchmark {name!r} has no option {bad}; options: {', '.join(params)}") from None


def cmd_bench(args) -> int:
    from metadyn.config import parse_override
    from metadyn.registry import BENCHMARKS
    from metadyn.runner import json_text

    fn = BENCHMARKS.get(args.name)
    options = dict(parse_override(s) for s in (args.set or []))
    if args.model:
        options["model"] = args.model
    bench_options(args.name, fn, args.quick, options)
    result = fn(quick=args.quick, **options)
    result["reuse_freed_memory"] = args.reuse_freed_memory  # same setting for metadyn and its alternative
    text = json_text(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 0


def cmd_list(args) -> int:
    from metadyn.config import task_names
    from metadyn.registry import ALL

    for title, reg in ALL.items():
        print(f"{title}: {', '.join(reg.names())}")
    print(f"tasks: {', '.join(task_names())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metadyn", description="Dynamic inference experiments.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a task file and write a results folder")
    r.add_argument("task", help="a task file, or the name of a shipped task (metadyn list shows them)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key (repeatable)")
    r.add_argument("--out", help="results folder (default runs/<task>)")
    r.add_argument("--quick", action="store_true", help="small settings from the task file's quick: section")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(fn=cmd_run)
    b = sub.add_parser("bench", help="run a speed/memory benchmark")
    b.add_argument("name", help="a registered benchmark (metadyn list shows them)")
    b.add_argument("--json", help="write the result object here")
    b.add_argument("--quick", action="store_true", help="fewer repetitions")
    b.add_argument("--model", help="network to benchmark, where the benchmark takes one")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="benchmark option (repeatable)")
    b.set_defaults(fn=cmd_bench)
    lst = sub.add_parser("list", help="print what is registered and the shipped tasks")
    lst.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    from metadyn.core.runtime import reuse_freed_memory

    args = build_parser().parse_args(argv)
    args.reuse_freed_memory = reuse_freed_memory()  # freed activations are reused, not page-faulted in again
    try:
        return args.fn(args)
    except InputError as e:
        print(f"metadyn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metadyn: interrupted (the last completed epoch's checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
