#!/usr/bin/env bash
# Install the peers metadyn is measured against (higher 0.2.1, learn2learn 0.2.0, TorchOpt 0.7.3) into a virtual env.
#
#   scripts/install_peers.sh VENV_PYTHON        e.g. scripts/install_peers.sh .venv/bin/python
#
# Idempotent: returns at once when all three import at the pinned versions. TorchOpt's compiled operators do
# not load on a torch it was not built against (torch 2.14: an undefined symbol); it then runs its pure-PyTorch
# path, which `metadyn bench maml` records (MAML's MetaSGD uses no compiled operator). learn2learn 0.2.0's sdist ships
# Cython C files that no longer compile on Python >= 3.11 (longintrepr.h); they are regenerated with
# Cython 3 and the package is built without build isolation. It is installed without its dependency
# list (gsutil, qpth: only needed by dataset downloaders and MetaOptNet, which metadyn never uses);
# the modules `import learn2learn` needs are installed explicitly.
set -euo pipefail

PY=${1:?usage: scripts/install_peers.sh VENV_PYTHON}
"$PY" -c 'import sys; assert sys.version_info >= (3, 10)' || { echo "install_peers: $PY is not Python >= 3.10" >&2; exit 1; }

check() {
    "$PY" - <<'PY' 2>/dev/null
from importlib.metadata import version
import higher, learn2learn, torchopt  # noqa: F401
assert version("higher") == "0.2.1" and version("learn2learn") == "0.2.0" and version("torchopt") == "0.7.3"
PY
}

if check; then
    echo "install_peers: higher 0.2.1, learn2learn 0.2.0 and torchopt 0.7.3 already installed"
    exit 0
fi

PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "higher==0.2.1" "torchopt==0.7.3" "optree" "graphviz" "cython>=3" "gym" "requests" "setuptools" "wheel"

if ! "$PY" -c 'import learn2learn' 2>/dev/null; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "learn2learn==0.2.0" -d "$tmp"
    tar -xzf "$tmp"/learn2learn-0.2.0.tar.gz -C "$tmp"
    src="$tmp/learn2learn-0.2.0"
    rm -rf "$src/.eggs"  # stale Cython eggs shipped in the sdist
    for pyx in "$src"/learn2learn/data/*.pyx; do
        "$PY" -m cython -3 "$pyx"
    done
    "${PIP[@]}" --no-build-isolation --no-deps "$src"
fi

if ! check; then
    echo "install_peers: installed, but 'import higher, learn2learn, torchopt' still fails:" >&2
    "$PY" -c 'import higher, learn2learn, torchopt' >&2 || true
    exit 1
fi
echo "install_peers: higher 0.2.1, learn2learn 0.2.0 and torchopt 0.7.3 installed"
