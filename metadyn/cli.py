"""``metadyn run | bench | list``.

Bad input (a malformed task file, a wrong key or type, a missing dataset, impossible sizes, NaNs)
exits with code 2 and one line on stderr naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from metadyn.errors import InputError

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def cmd_run(args) -> int:
    from metadyn.runner import run_task

    out, metrics = run_task(args.task, args.set or [], quick=args.quick, out=args.out, progress=not args.no_progress)
    print(f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir()))}")
    for e in metrics["exits"]:
        ece = f"  ECE {e['ece']:.3f}" if "ece" in e else ""
        print(f"  exit {e['exit']}: accuracy {100 * e['accuracy']:.2f}%  {e['mflops']:.3f} MFLOPs{ece}")
    return 0


def bench_names() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_benchmark(name: str):
    path = BENCH_DIR / f"{name}.py"
    if not path.is_file():
        names = bench_names()
        raise InputError(f"unknown benchmark {name!r}; choose from: {', '.join(names) or '(none found)'}")
    if str(BENCH_DIR.parent) not in sys.path:  # benchmarks import their shared helpers as benchmarks._timing
        sys.path.insert(0, str(BENCH_DIR.parent))
    spec = importlib.util.spec_from_file_location(f"metadyn_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cmd_bench(args) -> int:
    from metadyn.config import parse_override
    from metadyn.runner import json_text

    mod = load_benchmark(args.name)
    options = dict(parse_override(s) for s in (args.set or []))
    if args.model:
        options["model"] = args.model
    result = mod.run(quick=args.quick, **options)
    result["reuse_freed_memory"] = args.reuse_freed_memory  # same setting for metadyn and its alternative
    text = json_text(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 0


def cmd_list(args) -> int:
    import metadyn.data  # noqa: F401  (registers datasets)
    import metadyn.runner  # noqa: F401  (registers task kinds)
    from metadyn import registry

    for title, reg in (("backbones", registry.BACKBONES), ("methods", registry.METHODS),
                       ("policies", registry.POLICIES), ("task kinds", registry.TASK_KINDS),
                       ("datasets", registry.DATASETS)):
        print(f"{title}: {', '.join(reg.names())}")
    print(f"benchmarks: {', '.join(bench_names())}")
    tasks = sorted(p.name for p in Path("tasks").glob("*.yaml")) if Path("tasks").is_dir() else []
    if tasks:
        print(f"tasks (./tasks): {', '.join(tasks)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metadyn", description="Dynamic inference experiments.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a task file and write a results folder")
    r.add_argument("task", help="tasks/<name>.yaml")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key (repeatable)")
    r.add_argument("--out", help="results folder (default runs/<task>)")
    r.add_argument("--quick", action="store_true", help="small settings from the task file's quick: section")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(fn=cmd_run)
    b = sub.add_parser("bench", help="run a speed/memory benchmark")
    b.add_argument("name")
    b.add_argument("--json", help="write the result object here")
    b.add_argument("--quick", action="store_true", help="fewer repetitions")
    b.add_argument("--model", help="network to benchmark, where the benchmark takes one")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="benchmark option (repeatable)")
    b.set_defaults(fn=cmd_bench)
    lst = sub.add_parser("list", help="print what is registered")
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
