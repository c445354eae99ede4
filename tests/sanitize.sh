#!/usr/bin/env bash
# compute-sanitizer memcheck over a fast, representative subset of the CUDA tests.
#
# How to run (GPU machine, repository root, extension built in place, e.g. by tests/run_gpu.sh):
#     bash tests/sanitize.sh
# The whole report (pytest's output with the sanitizer's findings in between, each next to
# the test that caused it) goes to ${OUT:-.}/sanitizer.log; the script prints the final
# "ERROR SUMMARY" line and exits non-zero on any memcheck error (--error-exitcode 1) or test
# failure. Memcheck slows kernels 10-100x: the subset below (~1200 tests) is meant to take a few
# minutes on an H100 (not yet measured); SANITIZE_TIMEOUT caps it.
# Knobs: SANITIZE_K (pytest -k expression), SANITIZE_ALSO (a -k expression that narrows the selection
# below, e.g. "Q8_0 or Q4_0"), SANITIZE_TIMEOUT (seconds, default 300), PYTHON.
# A SANITIZE_K of your own replaces the selection below: leave out graph capture ("not graph") and the
# launch-count tests ("not one_launch"), whose torch.profiler cannot attach CUPTI beside compute-sanitizer.
#
# What runs: the CUDA cases (and the CUDA-only test_qgemm.py) of every test module except
# test_compile.py and test_opcheck.py
# (they mostly exercise tracing on the host, and inductor/triton compilation under the
# sanitizer is slow), minus
#   graph       CUDA-graph capture needs PyTorch's caching allocator, which is off here;
#   side_stream times a sleep kernel against host work that the sanitizer slows down;
#   huge, 2_31  the > 2^31-byte weight: minutes under memcheck;
#   cuda1       multi-GPU memory accounting, meaningless without the caching allocator;
#   no_host_sync
#   real_shapes  qmatmul_id at Qwen3-30B-A3B / gpt-oss-20B sizes: minutes under memcheck;
# and of test_matmul.py (but all of test_matmul_id.py, whose name -k's "test_matmul" also matches) only the exact-activation parity (every format and shape), aligned-row,
# non-finite and empty-batch cases; of test_errors.py only the cases where a bad-looking input
# must work ("works": 2-byte-aligned Q6_K rows, flat weights, an op called after an error).
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so a read or write
# just past a tensor's end is caught instead of landing in a neighbour inside the caching
# allocator's pooled blocks.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-.}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/sanitizer.log"
PYTHON=${PYTHON:-python3}
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ ! -x "$SANITIZER" ]; then
  echo "compute-sanitizer not found" | tee "$LOG"
  exit 2
fi

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

K_EXPR=${SANITIZE_K:-"(cuda or test_qgemm) and not graph and not side_stream and not huge and not 2_31 and not cuda1 and not no_host_sync and not real_shapes \
and (not test_matmul or test_matmul_id or exact_activations or aligned or non_finite or empty) and (not test_errors or works)"}
[ -n "${SANITIZE_ALSO:-}" ] && K_EXPR="($K_EXPR) and ($SANITIZE_ALSO)"
mapfile -t FILES < <(ls tests/test_*.py | grep -v -e test_compile.py -e test_opcheck.py)

start=$(date +%s)
timeout "${SANITIZE_TIMEOUT:-300}" "$SANITIZER" --tool memcheck --leak-check no --error-exitcode 1 \
  "$PYTHON" -m pytest -x -v -p no:cacheprovider "${FILES[@]}" -k "$K_EXPR" > "$LOG" 2>&1
rc=$?
echo "sanitize.sh: exit code $rc after $(( $(date +%s) - start )) s (124 = timed out)" >> "$LOG"

grep -E "^=+ .* in [0-9.]+s" "$LOG" | tail -1  # pytest's summary line
summary=$(grep -h "ERROR SUMMARY" "$LOG" | tail -1)
echo "${summary:-no ERROR SUMMARY line in $LOG}"
exit $rc
