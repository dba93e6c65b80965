#!/usr/bin/env bash
# metadyn on one GPU, in one call and under 8 minutes: every task kind --quick on CUDA (metrics.json must record
# it), a GPU run folder resumed on the CPU, every benchmark on CUDA (JSON under $OUT), the host syncs of dynamic
# exit and gated inference, a 1-rank NCCL meta-training and its resume, and the test suite (cuda tests included).
#
#   scripts/gpu_check.sh [--dry-run]            OUT=folder PYTHON=python scripts/gpu_check.sh
#
# Runs from a fresh checkout plus the install (make install, or pip install -e '.[dev,vision]'): PYTHON defaults
# to .venv/bin/python when it exists, else python3; OUT (default gpu_check_out/) receives logs/, runs/, bench/ and
# summary.txt. It prints one summary line per step: "gpu_check: <step>: PASS|FAIL|SKIP (<what>) <seconds>s".
# --dry-run (on a CPU-only machine too): every step that needs CUDA prints SKIP with the command it would run; the
# steps that do not (environment, collecting the tests) run. The exit status is 1 when a step failed.
set -uo pipefail

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT/logs" "$OUT/runs" "$OUT/bench"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
METADYN=("$PY" -m metadyn.cli)
START=$SECONDS
DEADLINE=$((START + 470))  # 7 min 50 s
FAILED=0

line() {  # step status detail started_at
    local text="gpu_check: $1: $2 ($3) $((SECONDS - $4))s"
    echo "$text" | tee -a "$SUMMARY"
    [[ "$2" == FAIL ]] && FAILED=1
    return 0
}

left() { echo $((DEADLINE - SECONDS)); }

cap() {  # the smaller of a step's own limit and the time left
    local l; l=$(left)
    (( l < $1 )) && echo "$l" || echo "$1"
}

CUDA=0
# --------------------------------------------------------------------------- 1. environment
t=$SECONDS
if env_out=$("$PY" - <<'PY' 2>"$OUT/logs/environment.log"
import torch
import metadyn  # noqa: F401
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "no GPU"
cudnn = torch.backends.cudnn.version() if cuda else None
print(f"{int(cuda)} torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}, {name}")
PY
); then
    CUDA=${env_out%% *}
    detail=${env_out#* }
    if [[ $CUDA == 1 || $DRY == 1 ]]; then line environment PASS "$detail" "$t"; else line environment FAIL "$detail: no CUDA device; run with --dry-run on a CPU" "$t"; fi
else
    line environment FAIL "python $PY cannot import torch and metadyn; see $OUT/logs/environment.log" "$t"
fi
RUN_CUDA=$(( CUDA == 1 && DRY == 0 ))

skip_or_fail() {  # step started_at command...: the line when the step cannot run here
    local step=$1 t0=$2; shift 2
    if (( DRY )); then line "$step" SKIP "dry run, needs CUDA: would run $*" "$t0"; else line "$step" SKIP "no CUDA device" "$t0"; fi
}

# --------------------------------------------------------------------------- 2. benchmarks (first: a quiet machine)
t=$SECONDS
BENCH_CMD="${METADYN[*]} bench NAME --quick --device cuda --kernels fast --json $OUT/bench/NAME.json"
if (( RUN_CUDA )); then
    names=$("$PY" -c 'from metadyn.registry import BENCHMARKS; print(*BENCHMARKS.names())')
    done_=(); bad=()
    for name in $names; do
        extra=()
        case $name in
            maml) extra=(--set meta_batch=32) ;;     # the GPU target is at meta-batch 32
            inference) extra=(--set batch=1024) ;;   # and at batch 1024
        esac
        if timeout "$(cap 75)" "${METADYN[@]}" bench "$name" --quick --device cuda --kernels fast "${extra[@]}" \
                --json "$OUT/bench/$name.json" --overwrite > "$OUT/logs/bench_$name.log" 2>&1; then
            done_+=("$name")
        else
            bad+=("$name")
        fi
    done
    figures=$("$PY" - "$OUT/bench" <<'PY'
import json, sys
from pathlib import Path
keys = ("speedup_vs_learn2learn", "ratio", "realized_over_flop_speedup", "step_over_fwd_bwd", "flop_speedup")
parts = []
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    shown = [f"{k} {d[k]:.3g}" for k in keys if isinstance(d.get(k), (int, float))]
    parts.append(f"{f.stem}: {', '.join(shown[:3]) or 'see JSON'}")
print("; ".join(parts))
PY
)
    if (( ${#bad[@]} )); then line benchmarks FAIL "failed: ${bad[*]} (logs/bench_*.log); $figures" "$t"
    else line benchmarks PASS "${#done_[@]} JSON in $OUT/bench: $figures" "$t"; fi
else
    skip_or_fail benchmarks "$t" "$BENCH_CMD (for every registered benchmark)"
fi

# --------------------------------------------------------------------------- 3. the test suite, in the background
t_tests=$SECONDS
TEST_CMD=("$PY" -m pytest -q -n 6 -p no:cacheprovider -rfEs)
if (( RUN_CUDA )); then
    timeout "$(cap 460)" "${TEST_CMD[@]}" > "$OUT/logs/tests.log" 2>&1 &
    TESTS_PID=$!
else
    TESTS_PID=
fi

# --------------------------------------------------------------------------- 4. host syncs
t=$SECONDS
if (( RUN_CUDA )); then
    if sync_out=$(timeout "$(cap 60)" "$PY" - 2>"$OUT/logs/syncs.log" <<'PY'
import warnings
import torch
from metadyn.core import gating
from metadyn.core.backbones.resnet import resnet_exits
from metadyn.core.inference import dynamic_exit
from metadyn.core.policies import ThresholdPolicy

def syncs(fn):
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)

torch.manual_seed(0)
dev = torch.device("cuda")
x = torch.rand(1024, 3, 32, 32, device=dev)
net = resnet_exits((3, 32, 32), 10, depth=56, exits=(8, 17, 26)).to(dev).eval()
policy = ThresholdPolicy([0.12, 0.12, 0.0])
with torch.no_grad():
    dynamic_exit(net, x, policy)
    d = syncs(lambda: dynamic_exit(net, x, policy))
    bb = resnet_exits((3, 32, 32), 10, depth=56, exits=(26,)).to(dev)
    bd = gating.BlockDropNet(bb, gating.PolicyNet((3, 32, 32), len(bb.blocks))).eval()
    bd(x)
    b = syncs(lambda: bd(x))
    sk = gating.GatedResNet(resnet_exits((3, 32, 32), 10, depth=56, exits=(26,))).to(dev).eval()
    sk(x)
    s = syncs(lambda: sk(x))
ok = d <= net.num_exits - 1 and b == 1 and s <= len(sk.backbone.blocks)
print(f"{int(ok)} dynamic exit {d} (<= {net.num_exits - 1}: one per early exit), BlockDrop {b} (1 per batch), "
      f"SkipNet {s} (<= {len(sk.backbone.blocks)}: one per block), batch 1024, ResNet-56")
PY
    ); then
        [[ ${sync_out%% *} == 1 ]] && line syncs PASS "${sync_out#* }" "$t" || line syncs FAIL "${sync_out#* }" "$t"
    else
        line syncs FAIL "see $OUT/logs/syncs.log" "$t"
    fi
else
    skip_or_fail syncs "$t" "a count of synchronising CUDA calls (torch.cuda.set_sync_debug_mode) of dynamic exit, BlockDrop and SkipNet"
fi

# --------------------------------------------------------------------------- 5. 1-rank NCCL meta-training and its resume
t=$SECONDS
META=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m metadyn.meta.distributed
      --out "$OUT/meta_nccl.pt" --dataset digits --n-way 3 --k-shot 1 --n-query 5 --width 8 --iterations 3
      --meta-batch 4)
if (( RUN_CUDA )); then
    rm -f "$OUT/meta_nccl.pt"
    if timeout "$(cap 90)" "${META[@]}" --epochs 1 > "$OUT/logs/meta_nccl.log" 2>&1 \
        && timeout "$(cap 90)" "${META[@]}" --epochs 2 >> "$OUT/logs/meta_nccl.log" 2>&1 \
        && epochs=$("$PY" -c "import torch, sys; print(torch.load(sys.argv[1], weights_only=True)['epoch'])" "$OUT/meta_nccl.pt") \
        && [[ $epochs == 2 ]]; then
        line nccl-meta PASS "1 rank, NCCL: epoch 1, then resumed to epoch 2 from $OUT/meta_nccl.pt" "$t"
    else
        line nccl-meta FAIL "see $OUT/logs/meta_nccl.log" "$t"
    fi
else
    skip_or_fail nccl-meta "$t" "${META[*]} --epochs 1, then --epochs 2 (resume)"
fi

# --------------------------------------------------------------------------- 6. every task kind --quick on CUDA
t=$SECONDS
TASKS=$("$PY" - <<'PY'
from metadyn.config import load_task, task_names
one = {}
for t in sorted(task_names(), key=lambda t: ("digits" not in t, t)):  # the small data sets first
    one.setdefault(load_task(t).kind, t)
print(" ".join(f"{k}:{t}" for k, t in sorted(one.items())))
PY
)
if (( RUN_CUDA )); then
    ok=(); bad=(); skipped=()
    for pair in $TASKS; do
        kind=${pair%%:*} task=${pair#*:}
        if (( $(left) < 30 )); then skipped+=("$kind(time)"); continue; fi
        log="$OUT/logs/task_$task.log"
        timeout "$(cap 90)" "${METADYN[@]}" run "$task" --quick --device cuda --out "$OUT/runs/$task" --no-progress \
            > "$log" 2>&1
        code=$?
        if (( code == 0 )) && "$PY" -c "import json, sys; s = json.load(open(sys.argv[1]))['settings']; \
                assert s['device'].startswith('cuda') and s['cuda'], s" "$OUT/runs/$task/metrics.json" 2>>"$log"; then
            ok+=("$kind")
        elif (( code == 2 )) && grep -qiE "METADYN_DATA|not found|does not exist|no such" "$log"; then
            skipped+=("$kind(data)")
        else
            bad+=("$kind")
        fi
    done
    detail="on cuda, recorded in metrics.json: ${ok[*]:-none}${skipped:+; skipped: ${skipped[*]}}"
    (( ${#bad[@]} )) && line tasks FAIL "failed: ${bad[*]} (logs/task_*.log); $detail" "$t" || line tasks PASS "$detail" "$t"
else
    skip_or_fail tasks "$t" "${METADYN[*]} run TASK --quick --device cuda for $TASKS"
fi

# --------------------------------------------------------------------------- 7. a GPU run folder resumed on the CPU
t=$SECONDS
GPU_RUN=$(for pair in $TASKS; do [[ ${pair%%:*} == anytime ]] && echo "${pair#*:}"; done)
if (( RUN_CUDA )) && [[ -f "$OUT/runs/$GPU_RUN/checkpoint.pt" ]]; then
    rm -rf "$OUT/runs/resume_cpu"
    cp -r "$OUT/runs/$GPU_RUN" "$OUT/runs/resume_cpu"
    rm -f "$OUT/runs/resume_cpu/metrics.json" "$OUT/runs/resume_cpu/report.md"
    if timeout "$(cap 90)" "${METADYN[@]}" run "$GPU_RUN" --quick --device cpu --out "$OUT/runs/resume_cpu" \
            --no-progress > "$OUT/logs/resume_cpu.log" 2>&1 \
        && "$PY" -c "import json, sys; s = json.load(open(sys.argv[1]))['settings']; assert s['device'] == 'cpu', s" \
            "$OUT/runs/resume_cpu/metrics.json" 2>>"$OUT/logs/resume_cpu.log"; then
        line resume-on-cpu PASS "$GPU_RUN's CUDA checkpoints resumed and evaluated with --device cpu" "$t"
    else
        line resume-on-cpu FAIL "see $OUT/logs/resume_cpu.log" "$t"
    fi
elif (( RUN_CUDA )); then
    line resume-on-cpu FAIL "no CUDA run folder of $GPU_RUN to resume (the tasks step failed or ran out of time)" "$t"
else
    skip_or_fail resume-on-cpu "$t" "${METADYN[*]} run $GPU_RUN --quick --device cpu on a copy of its CUDA run folder"
fi

# --------------------------------------------------------------------------- 8. the test suite's verdict
if [[ -n "$TESTS_PID" ]]; then
    wait "$TESTS_PID"
    code=$?
    tail_line=$(grep -E "passed|failed|error" "$OUT/logs/tests.log" | tail -1)
    if (( code == 0 )); then line tests PASS "${tail_line:-done}" "$t_tests"
    elif (( code == 124 )); then line tests FAIL "time budget reached; ${tail_line:-see logs/tests.log}" "$t_tests"
    else line tests FAIL "${tail_line:-see logs/tests.log}; failures listed in $OUT/logs/tests.log" "$t_tests"; fi
else
    t=$SECONDS
    if n=$("$PY" -m pytest -q --collect-only -p no:cacheprovider 2>"$OUT/logs/tests.log" | grep -cE "::"); then
        if (( DRY )); then line tests SKIP "dry run: $n tests collected; would run ${TEST_CMD[*]} (cuda tests included)" "$t"
        else line tests SKIP "no CUDA device ($n tests collected)" "$t"; fi
    else
        line tests FAIL "the tests cannot be collected; see $OUT/logs/tests.log" "$t"
    fi
fi

echo "gpu_check: done in $((SECONDS - START))s; summary in $SUMMARY"
exit $FAILED
