#!/usr/bin/env bash
# Every gpu-marked test, file by file (each file under its own timeout, so a slow file leaves
# the others' results), on the device machine from the repo root, carrying .whl:
#   bash bench/gpu/gpu_sweep.sh a    # the kernel-heavy files (quant, attention, GEMV)
#   bash bench/gpu/gpu_sweep.sh b    # every other file with gpu-marked tests
# Each file's pytest summary goes to $OUT/sweep-<group>.log (bench/results without $OUT).
set -uo pipefail
cd "$(dirname "$0")/../.."
o=${OUT:-bench/results}
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
big="tests/test_quant_gpu.py tests/test_gpu_attention.py tests/test_gpu_gemv.py"
case ${1:-a} in
  a) files=$big ;;
  b) files=$(grep -l "mark.gpu" tests/*.py | grep -v -F -x -e ${big// / -e }) ;;
  *) echo "usage: $0 a|b" >&2; exit 2 ;;
esac
log="$o/sweep-$1.log"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$log"
for f in $files; do
  start=$(date +%s)
  out=$(PYTHONPATH=/tmp/site:src timeout "${FILE_TIMEOUT:-300}" python3 -m pytest -q \
        -p no:cacheprovider -m gpu -rfE "$f" 2>&1)
  rc=$?
  { echo "### $f rc=$rc $(( $(date +%s) - start ))s"
    echo "$out" | grep -E "^(FAILED|ERROR)|passed|failed|error|no tests ran" | tail -15; } | tee -a "$log"
done
