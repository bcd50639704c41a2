#!/usr/bin/env bash
# The GPU half of the test suite, file by file, on a CUDA machine (CI has no GPU: there these tests are skipped).
# Each file runs in its own pytest process (one file's leftover GPU state cannot fail the next), with a junit report
# and a log under LOGS; a summary line per file is printed as each ends, so a run cut short still says what passed.
#
#   tools/gpu_tests.sh                          every file that holds GPU tests, in the order below
#   tools/gpu_tests.sh tests/ops/test_moba_gpu.py -k head_dim     one file, extra pytest arguments
#   LOGS=/tmp/gpu-logs TIMEOUT=900 tools/gpu_tests.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-gpu-test-logs}
TIMEOUT=${TIMEOUT:-900}        # seconds per test (pytest-timeout)
PY=${PY:-python}
mkdir -p "$LOGS"
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these tests would all be skipped')" \
  || exit 2

# Every test file that marks tests `gpu`: decoding first (what most users run), then the training kernels, then
# the rest in name order.
FIRST=(tests/models/test_decode_gpu.py tests/ops/test_moba_decode_triton_gpu.py tests/ops/test_moba_gpu.py)
FILES=("${FIRST[@]}")
for f in $(grep -rl "pytest.mark.gpu" tests --include="*.py" | sort); do
  [[ " ${FIRST[*]} " == *" $f "* ]] || FILES+=("$f")
done
EXTRA=()
if [ $# -gt 0 ] && [ -f "$1" ]; then FILES=("$1"); shift; fi
EXTRA=("$@")

status=0
for f in "${FILES[@]}"; do
  name=$(basename "$f" .py)
  start=$(date +%s)
  $PY -m pytest -p no:cacheprovider "$f" -m "gpu and not exhaustive" -q -rfE --timeout "$TIMEOUT" --junitxml "$LOGS/$name.xml" \
      ${EXTRA[@]+"${EXTRA[@]}"} > "$LOGS/$name.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1            # 5: no test selected
  summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran" "$LOGS/$name.log" | tail -1)
  echo "$name: ${summary:-no summary (see $LOGS/$name.log)} [$(( $(date +%s) - start )) s]"
done
exit $status
