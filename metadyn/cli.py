"""``metadyn run | bench | list``.

Bad input (a malformed task file, a wrong key or type, a missing dataset, impossible sizes, NaNs, a
folder that cannot be written, a run folder another run holds) exits with code 2 and one line on stderr
naming the problem, never a traceback; so does an argument error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
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

    out, metrics = run_task(args.task, args.set or [], quick=args.quick, out=args.out, progress=not args.no_progress,
                            device=args.device, precision=args.precision, kernels=args.kernels)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    print(f"wrote {out}/: {', '.join(names)}")
    for line in summary_lines(metrics):
        print(line)
    return 0


def bench_options(name: str, fn, quick: bool, options: dict) -> dict:
    """Benchmark ``name``'s options checked as a task file's fields are (:func:`metadyn.config.check_options`):
    an unknown option names the benchmark's options; a wrong type or a value out of its declared range
    names the option. Returns the options converted."""
    import inspect

    from metadyn.config import check_options

    params = [p for p in inspect.signature(fn).parameters if p != "quick"]
    unknown = [k for k in options if k not in params]
    if unknown:
        bad = ", ".join(repr(k) for k in unknown)
        raise InputError(f"benchmark {name!r} has no option {bad}; options: {', '.join(params)}")
    return check_options(fn, options, name, quick=quick)


class JsonTarget:
    """Where ``--json`` writes, checked before the benchmark runs: the folder above it exists (or only that
    folder is missing, and is created), the file does not exist unless ``overwrite``, and the folder is
    writable (a temp file is opened there now and renamed over the target at the end)."""

    def __init__(self, path: str, overwrite: bool):
        from metadyn.core.files import new_file_mode

        self.path = Path(path)
        if self.path.is_dir():
            raise InputError(f"--json {path!r} is a folder; name a file")
        if str(path).endswith(("/", os.sep)):  # Path() drops the slash: "new.json/" would become a file
            raise InputError(f"--json {path!r} ends with a slash, so it names a folder; name a file")
        if self.path.exists() and not overwrite:
            raise InputError(f"--json {path!r} exists; pass --overwrite to replace it")
        folder = self.path.parent
        try:
            if not folder.exists():
                folder.mkdir()  # at most the last level
            self.fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
            os.fchmod(self.fd, new_file_mode())
        except FileNotFoundError:
            raise InputError(f"--json {path!r}: the folder {str(folder.parent)!r} does not exist") from None
        except OSError as e:
            raise InputError(f"--json {path!r}: cannot write to {str(folder)!r}: {e.strerror}") from None

    def write(self, text: str) -> None:
        try:
            with os.fdopen(self.fd, "w") as f:
                f.write(text)
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.discard()
            raise InputError(f"--json {str(self.path)!r} could not be written ({e.strerror}); the result is "
                             "printed above") from None

    def discard(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        Path(self.tmp).unlink(missing_ok=True)


def cmd_bench(args) -> int:
    import torch

    from metadyn.bench._load import competing_load
    from metadyn.bench._timing import environment
    from metadyn.config import parse_override
    from metadyn.core.device import configure_kernels
    from metadyn.core.files import json_text
    from metadyn.registry import BENCHMARKS

    fn = BENCHMARKS.get(args.name)
    options = dict(parse_override(s) for s in (args.set or []))
    if args.model:
        options["model"] = args.model
    if args.device:
        options["device"] = args.device
    options = bench_options(args.name, fn, args.quick, options)
    configure_kernels(args.kernels)
    target = JsonTarget(args.json, args.overwrite) if args.json else None
    try:
        with competing_load(args.under_load) as load:  # stopped on the way out, also on an error or Ctrl-C
            result = fn(quick=args.quick, **options)
    except BaseException:
        if target is not None:
            target.discard()
        raise
    result["under_load"] = load  # {"processes": 0} or the competing process's core
    result["threads"] = torch.get_num_threads()  # as the benchmark left them (threads=N sets them)
    result["reuse_freed_memory"] = args.reuse_freed_memory  # same setting for metadyn and its alternative
    result["environment"] = environment(options.get("device", "auto"))  # device name, versions, kernel switches
    text = json_text(result)
    print(text)  # first: a late failure to write --json loses nothing
    if target is not None:
        target.write(text)
    return 0


def cmd_list(args) -> int:
    from metadyn.config import task_names
    from metadyn.registry import ALL

    for title, reg in ALL.items():
        print(f"{title}: {', '.join(reg.names())}")
    print(f"tasks: {', '.join(task_names())}")
    return 0


def cmd_data(args) -> int:
    from metadyn.data import prepare

    if args.data_command == "prepare":
        for dest, what in prepare.prepare(args.name, args.src, args.to):
            print(f"{dest}: {what}")
        return 0
    for name, where, state in prepare.status():
        print(f"{name}: {state} ({where})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``metadyn: error: ...``, exit 2), like every other error."""

    def error(self, message: str):
        command = self.prog.removeprefix("metadyn").strip()
        raise InputError(f"{command + ': ' if command else ''}{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="metadyn", description="Dynamic inference experiments.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a task file and write a results folder")
    r.add_argument("task", help="a task file, or the name of a shipped task (metadyn list shows them)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key (repeatable)")
    r.add_argument("--out", help="results folder (default runs/<task>); created only when the folder above it "
                                 "exists. An existing run folder is resumed with the same config and refused "
                                 "with another (unless it holds nothing but the config of a run that failed "
                                 "before its first checkpoint); one run at a time holds it")
    r.add_argument("--quick", action="store_true", help="small settings from the task file's quick: section")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--device", help="where to compute: auto, cpu, cuda, cuda:N (overrides the task's device:; a run "
                                    "folder may be resumed on another device)")
    r.add_argument("--precision", help="fp32 (default) or bf16 autocast in every fit and "
                                                           "inference (thresholds fitted at the same precision)")
    r.add_argument("--kernels", help="kernel switches: default (torch's), fast (cuDNN autotuning, "
                                                      "TF32), deterministic (bit-identical resume on a GPU)")
    r.set_defaults(fn=cmd_run)
    b = sub.add_parser("bench", help="run a speed/memory benchmark")
    b.add_argument("name", help="a registered benchmark (metadyn list shows them)")
    b.add_argument("--json", help="also write the result object to this file (its folder is created only when the "
                                  "folder above it exists; an existing file needs --overwrite)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    b.add_argument("--under-load", action="store_true", help="run a competing CPU-bound process on one core for "
                                                             "the duration (a busy machine); the JSON records it")
    b.add_argument("--quick", action="store_true", help="fewer repetitions")
    b.add_argument("--model", help="network to benchmark, where the benchmark takes one")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="benchmark option (repeatable)")
    b.add_argument("--device", help="where to run it: auto (default), cpu, cuda, cuda:N")
    b.add_argument("--kernels", default="default", help="kernel switches (as for run); recorded "
                                                                         "in the JSON's environment")
    b.set_defaults(fn=cmd_bench)
    lst = sub.add_parser("list", help="print what is registered and the shipped tasks")
    lst.set_defaults(fn=cmd_list)
    d = sub.add_parser("data", help="data sets on disk: where they are read from and whether they are ready; "
                                    "`data prepare NAME --from DIR` copies downloaded files into place")
    dsub = d.add_subparsers(dest="data_command", parser_class=_Parser)
    prep = dsub.add_parser("prepare", help="check a data set's downloaded files and copy them into its folder")
    prep.add_argument("name", help="fashion_mnist, mnist or omniglot")
    prep.add_argument("--from", dest="src", required=True, help="a folder holding the downloaded files (searched "
                                                                "recursively)")
    prep.add_argument("--to", help="the folder holding every data set (default $METADYN_DATA)")
    d.set_defaults(fn=cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    from metadyn.core.runtime import reuse_freed_memory

    try:
        args = build_parser().parse_args(argv)
        args.reuse_freed_memory = reuse_freed_memory()  # freed activations are reused, not page-faulted in again
        return args.fn(args)
    except InputError as e:
        message = " ".join(str(e).split())  # one line, whatever it holds, and never a whole value
        print(f"metadyn: error: {message if len(message) <= 1000 else message[:997] + '...'}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`metadyn list | head`): stop quietly, like any Unix tool
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit does not raise again
        return 141
    except OSError as e:  # the machine, not metadyn: a full disk, a folder made read-only while running
        where = f" ({e.filename})" if e.filename else ""
        print(f"metadyn: error: {e.strerror or type(e).__name__}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metadyn: interrupted (the last completed epoch's checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
