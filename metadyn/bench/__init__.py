"""Speed and memory benchmarks, run by ``metadyn bench NAME`` (``metadyn list`` names them).

Each module registers one entry point, ``@BENCHMARKS.register("name")`` on ``run(quick=False,
**options) -> dict``; the CLI passes ``--set key=value`` options and ``--model`` as keyword arguments
and prints the returned object as JSON. A benchmark imports optional packages (learn2learn, higher,
torchvision, matplotlib) inside ``run`` only, so listing the benchmarks needs none of them. Shared
timing helpers live in :mod:`metadyn.bench._timing`.
"""
