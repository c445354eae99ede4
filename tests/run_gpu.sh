#!/usr/bin/env bash
# One device call: build the extension for the GPU present, run the whole test suite (CUDA tests
# included), the compute-sanitizer subset and, unless SKIP_BENCH=1, the benchmark.
# Logs go to $OUT (or ./gpu-logs). Usage on the GPU machine: bash tests/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # wheels carried to a machine without network (gguf, hypothesis, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

if [ "${PREBUILT:-0}" != "1" ] || ! ls torchext/_C*.so >/dev/null 2>&1; then
  TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  grep "torchext: built" "$OUT/build.log"
fi

python3 -m pytest tests -q -ra -x --durations=20 --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log" | tail -40
test_rc=${PIPESTATUS[0]}

bash tests/sanitize.sh > /dev/null 2>&1
grep -h "ERROR SUMMARY" "$OUT/sanitizer.log" | tail -1

if [ "${SKIP_BENCH:-0}" != "1" ]; then
  python3 bench/gemv.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  tail -60 "$OUT/bench.log"
fi
echo "pytest exit code: $test_rc"
exit $test_rc
