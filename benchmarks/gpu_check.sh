#!/usr/bin/env bash
# One GPU check: every `-m gpu` test and every benchmark's CUDA run, sized for ~8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh                 # from anywhere; PYTHON=/path/to/python to pick the interpreter
#   QUICK=1 bash benchmarks/gpu_check.sh         # without sae-defaults and similar, a smaller scale grid (~5 min)
#
# Run it whenever a GPU is at hand (README, docs/scale.md). It writes the benchmarks' *-gpu reports
# (benchmarks/reports/*-gpu.{json,md}; similar-gpu-host.*: FAISS on the GPU host) and a summary,
# benchmarks/reports/gpu-check.md, with each step's status and seconds. A failing step does not stop
# the others; the exit status is 1 when any step failed. Nothing here downloads weights: every
# backbone is random-init (the figures are speed and memory, not quality).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
REPORTS="$ROOT/benchmarks/reports"
SUMMARY="$REPORTS/gpu-check.md"
LOGDIR="$REPORTS/gpu-check-logs"
QUICK="${QUICK:-0}"
mkdir -p "$LOGDIR"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device (python: $PY); nothing to check" >&2
    exit 2
fi
GPU="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"

failed=0
{
    echo "# GPU check ($GPU)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')," \
        "QUICK=$QUICK. Logs: benchmarks/reports/gpu-check-logs/."
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
} >"$SUMMARY"

# step NAME TIMEOUT_S COMMAND...: run one step under a time limit, log it, add a summary row.
step() {
    local name="$1" limit="$2"
    shift 2
    local log="$LOGDIR/$name.log" start rc
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local secs=$(($(date +%s) - start))
    if [ "$rc" -eq 0 ]; then
        echo "| $name | ok | $secs |" >>"$SUMMARY"
    else
        failed=1
        [ "$rc" -eq 124 ] && rc="timeout"
        echo "| $name | FAILED ($rc) | $secs |" >>"$SUMMARY"
        tail -n 20 "$log"
    fi
    echo "   $name: rc=$rc, ${secs} s"
}

# 1. every test marked gpu (they skip without CUDA elsewhere; here none may skip)
step pytest-gpu 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests

# 2. benchmarks with a CUDA path (each writes its *-gpu report)
if "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("dictionary_learning") is None)'; then
    baseline=()
else
    baseline=(--skip-baseline)  # dictionary_learning not installed: our trainer only
fi
step throughput 90 "$PY" benchmarks/throughput.py --device cuda --sae-steps 30 "${baseline[@]}"
step msae 60 "$PY" benchmarks/msae.py --device cuda --steps 20
step pipeline 90 "$PY" benchmarks/pipeline.py --device cuda --n-images 64 --batch 32 --stats-patches 200000
step evals 90 "$PY" benchmarks/evals.py --device cuda --images 2048 --batch 64
step probe 90 "$PY" benchmarks/probe.py --device cuda --train-images 20000
step vocab-embed 60 "$PY" benchmarks/vocab_embed.py --device cuda --seconds 15 --skip-name  # name: scale.py
step timm-layers 60 "$PY" benchmarks/timm_layers.py --device cuda --images 256 --batch 64
if [ "$QUICK" = "1" ]; then
    step scale 150 "$PY" benchmarks/scale.py --device cuda --n-images 500 2000 --dict-sizes 8192 32768 \
        --grid 14 --name scale-gpu --note "gpu_check.sh QUICK grid"
else
    step sae-defaults 90 "$PY" benchmarks/sae_defaults.py --device cuda --no-paper-settings
    step similar-gpu-host 60 "$PY" benchmarks/similar.py --sizes 100000 --name similar-gpu-host
    step scale 200 "$PY" benchmarks/scale.py --device cuda --n-images 1000 4000 --dict-sizes 8192 32768 \
        --grid 14 --name scale-gpu --note "gpu_check.sh grid (sized for its 8-minute budget)"
fi

echo >>"$SUMMARY"
echo "Reports: benchmarks/reports/*-gpu.{json,md}, similar-gpu-host.*, scale-gpu.*." >>"$SUMMARY"
cat "$SUMMARY"
exit "$failed"
