#!/usr/bin/env bash
# Build metadyn's wheel, install it (not editable) into a fresh venv and run it outside the checkout.
#
#   scripts/check_wheel.sh [VENV_PYTHON]        default: .venv/bin/python (make check-wheel)
#
# 1. The wheel is built from a copy of the files git knows about (tracked, plus untracked ones that are
#    not ignored), so stale build/ output and ignored junk cannot leak into it; with the project venv's
#    setuptools (no build isolation: nothing is downloaded).
# 2. The wheel must hold only metadyn/ and its .dist-info (no top-level benchmarks/ or tasks/), and every
#    .py and .yaml file under metadyn/ in the checkout (a package without __init__.py would be missing).
# 3. A fresh venv gets the wheel with `pip install --no-deps`; its third-party packages (torch, ...) come
#    from the project venv through a .pth line naming that venv's site-packages. A directory added by a
#    .pth line has its own .pth files skipped, so the project venv's editable metadyn
#    (__editable__.metadyn-*.pth) is never activated; the script checks that metadyn is imported from the
#    fresh venv's site-packages.
# 4. From a temporary folder outside the checkout: metadyn list, metadyn run digits_anytime --quick and
#    metadyn bench inference --quick.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-$ROOT/.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
[ -x "$PY" ] || { echo "check_wheel: $PY is not an executable Python" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/metadyn-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step() { echo "check_wheel: $*"; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }

# 1. build
SRC=$WORK/src
mkdir -p "$SRC"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done \
        | tar --null --files-from=- -cf -) | tar -xf - -C "$SRC"
else
    (cd "$ROOT" && tar --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - .) | tar -xf - -C "$SRC"
fi
step "building the wheel"
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$WORK/dist" "$SRC" \
    >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; fail "pip wheel"; }
WHEEL=$(ls "$WORK"/dist/metadyn-*.whl)
step "built $(basename "$WHEEL")"

# 2. contents
"$PY" - "$WHEEL" "$SRC" <<'PY' || fail "wheel contents"
import sys, zipfile
from pathlib import Path

wheel, src = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
top = {n.split("/")[0] for n in names}
extra = sorted(t for t in top if t != "metadyn" and not t.endswith(".dist-info"))
assert not extra, f"top-level entries besides metadyn/: {extra}"
want = {p.relative_to(src).as_posix() for p in (src / "metadyn").rglob("*")
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts}
missing = sorted(want - names)
assert not missing, f"files of metadyn/ not in the wheel: {missing}"
for f in ("metadyn/tasks/digits_anytime.yaml", "metadyn/bench/inference.py"):
    assert f in names, f"{f} not in the wheel"
print(f"check_wheel: wheel holds metadyn/ only, {len(want)} .py/.yaml files, tasks and benchmarks included")
PY

# 3. fresh venv, wheel installed without -e
VENV=$WORK/venv
"$PY" -m venv --without-pip "$VENV"
FRESH_SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
DEPS_SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$DEPS_SITE" >"$FRESH_SITE/_metadyn_check_deps.pth"
"$PY" -m pip --python "$VENV/bin/python" install --quiet --disable-pip-version-check --no-deps --no-index \
    "$WHEEL" >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log" >&2; fail "pip install of the wheel"; }
step "installed into a fresh venv (third-party packages from $DEPS_SITE)"

RUN=$WORK/outside
mkdir -p "$RUN"
cd "$RUN"  # outside the checkout: nothing can be imported from it by accident
export PATH="$VENV/bin:$PATH" PYTHONNOUSERSITE=1
unset PYTHONPATH VIRTUAL_ENV

"$VENV/bin/python" - "$FRESH_SITE" "$ROOT" <<'PY' || fail "metadyn is not imported from the fresh venv"
import sys
from pathlib import Path

import metadyn
import metadyn.bench
import metadyn.cli

site, root = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
for mod in (metadyn, metadyn.cli, metadyn.bench):
    f = Path(mod.__file__).resolve()
    assert f.is_relative_to(site), f"{mod.__name__} imported from {f}, not from {site}"
    assert not f.is_relative_to(root), f"{mod.__name__} imported from the checkout: {f}"
editable = [m for m in sys.modules if "editable" in m]
assert not editable, f"an editable finder is active: {editable}"
print(f"check_wheel: metadyn {metadyn.__version__} imported from {Path(metadyn.__file__).parent}")
PY
[ "$(command -v metadyn)" = "$VENV/bin/metadyn" ] || fail "metadyn on PATH is $(command -v metadyn)"

# 4. the commands
step "metadyn list"
metadyn list >"$WORK/list.txt" 2>&1 || { cat "$WORK/list.txt" >&2; fail "metadyn list"; }
cat "$WORK/list.txt"
grep -q '^benchmarks: .*inference' "$WORK/list.txt" || fail "metadyn list names no inference benchmark"
grep -q '^tasks: .*digits_anytime' "$WORK/list.txt" || fail "metadyn list names no digits_anytime task"

step "metadyn run digits_anytime --quick"
metadyn run digits_anytime --quick --no-progress --out "$RUN/digits" || fail "metadyn run digits_anytime --quick"
[ -s "$RUN/digits/metrics.json" ] || fail "metadyn run wrote no metrics.json"

step "metadyn bench inference --quick"
metadyn bench inference --quick --json "$RUN/bench.json" >/dev/null || fail "metadyn bench inference --quick"
"$VENV/bin/python" - "$RUN/bench.json" <<'PY' || fail "metadyn bench inference wrote no result"
import json, sys

r = json.load(open(sys.argv[1]))
assert r["benchmark"] == "inference", r
print(f"check_wheel: bench inference: FLOP speedup {r['flop_speedup']:.2f}, realized {r['realized_speedup']:.2f}")
PY

[ -z "$(ls -A "$RUN" | grep -v -x -e digits -e bench.json)" ] || fail "stray files in the run folder: $(ls -A "$RUN")"
step "OK"
