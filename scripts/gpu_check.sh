#!/usr/bin/env bash
# Exercise every CUDA path the CPU test suite cannot reach, on one GPU, in under 10 minutes:
# bf16 and fp16 (GradScaler) autocast training, torch.compile on and off, fused AdamW, the
# out-of-memory message, KV-cache sampling under autocast, torchrun --nproc_per_node=1 with
# NCCL (DDP and FSDP2), and a short GPT-2 124M run that prints tokens/s and MFU.
#
#   scripts/gpu_check.sh            # from the repository root, with the package installed
#   PYTHON=.venv/bin/python scripts/gpu_check.sh
#
# Prints one PASS/FAIL line per check (the tests marked `gpu`, most in tests/test_gpu.py) and exits
# non-zero when any check fails or none ran.
set -u

PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.." || exit 2

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "FAIL cuda-available: torch sees no CUDA device (torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    exit 1
fi
"$PYTHON" -c 'import torch; print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")'

report=$(mktemp)
trap 'rm -f "$report"' EXIT
# -rA lists every test's outcome; -s lets the throughput test print its line.
timeout 600 "$PYTHON" -m pytest -m gpu -q -s -rA -p no:cacheprovider tests >"$report" 2>&1
status=$?

grep -E '^GPT-2 124M on ' "$report"
failed=0
passed=0
while read -r outcome name _; do
    case $outcome in
        PASSED) echo "PASS ${name#tests/}"; passed=$((passed + 1)) ;;
        FAILED | ERROR) echo "FAIL ${name#tests/}"; failed=$((failed + 1)) ;;
        SKIPPED) echo "FAIL skipped: $name"; failed=$((failed + 1)) ;;
    esac
done < <(grep -E '^(PASSED|FAILED|ERROR|SKIPPED) ' "$report")

if [ "$status" -eq 124 ]; then
    echo "FAIL time: the checks ran past 10 minutes"
    failed=$((failed + 1))
fi
if [ "$failed" -gt 0 ] || [ "$passed" -eq 0 ] || [ "$status" -ne 0 ]; then
    echo "gpu_check: $passed passed, $failed failed (pytest exit $status); details:"
    tail -n 60 "$report"
    exit 1
fi
echo "gpu_check: all $passed checks passed"
