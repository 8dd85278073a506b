#!/usr/bin/env bash
# One call on a lent GPU: build the extensions in place, time the Triton variants while they build,
# then parity and the target cases for reference / triton / cuda, then the GPU-side tests.
#
#   bash benchmarks/device_check.sh [sweep-args...]     # results under $OUT (default bench_out/)
#
# Stages are bounded by STAGE_* seconds (environment) so that one slow stage cannot eat the
# others' time; every stage's output lands under $OUT even when a stage is cut short.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
} > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

# The C++/CUDA extensions, built on the CPUs while the GPU times Triton.
( start=$(date +%s); timeout "${STAGE_BUILD:-240}" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build exit $? after $(( $(date +%s) - start )) s" >> "$OUT/build.log" ) &
BUILD_PID=$!

if [ "${SKIP_VARIANTS:-0}" != 1 ]; then
  echo "== triton variants"
  timeout "${STAGE_VARIANTS:-150}" $PY benchmarks/triton_variants.py --budget-s "${VARIANTS_BUDGET:-110}" \
    --out "$OUT" 2>&1 | tee "$OUT/variants.log" | grep -v Warning
fi

wait $BUILD_PID
tail -3 "$OUT/build.log"

echo "== sweep"
timeout "${STAGE_SWEEP:-150}" $PY benchmarks/gpu_sweep.py --commit "$COMMIT" --out "$OUT" "$@" > /dev/null 2>&1
tail -40 "$OUT/gpu_sweep.log"

echo "== tests on the GPU"
# shellcheck disable=SC2086 - TESTS is a list of paths
timeout "${STAGE_TESTS:-100}" $PY -m pytest -q -p no:cacheprovider -rfE --durations=5 \
  ${TESTS:-tests/test_cpp.py tests/test_triton.py} > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"
tail -25 "$OUT/pytest.log"
