#!/usr/bin/env bash
# Every gpu-marked test, file by file (each file under its own timeout, so a slow file leaves
# the others' results), on the device machine from the repo root, carrying .whl:
#   bash bench/gpu/gpu_sweep.sh a    # the kernel-heavy files (quant, attention, GEMV)
#   bash bench/gpu/gpu_sweep.sh b    # every other file with gpu-marked tests (b1 + b2: halves)
#   bash bench/gpu/gpu_sweep.sh files tests/x.py tests/y.py   # these files only
# JOBS=N runs each file on N pytest-xdist workers (Triton compiles in parallel; .whl carries
# pytest-xdist and execnet); only for `a`: engine tests size their KV cache from free memory,
# so two at once on one GPU starve each other. Each file's pytest summary goes to
# $OUT/sweep-<group>.log (bench/results without $OUT).
set -uo pipefail
cd "$(dirname "$0")/../.."
o=${OUT:-bench/results}
[ -d .whl ] && python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl
big="tests/test_quant_gpu.py tests/test_gpu_attention.py tests/test_gpu_gemv.py"
case ${1:-a} in
  a) files=$big ;;
  b|b1|b2) files=$(grep -l "mark.gpu" tests/*.py | grep -v -F -x -e ${big// / -e })
     n=$(echo "$files" | wc -l)
     case $1 in  # b1 / b2: the first / second half of b, for two shorter calls
       b1) files=$(echo "$files" | head -n $(( (n + 1) / 2 ))) ;;
       b2) files=$(echo "$files" | tail -n +$(( (n + 1) / 2 + 1 ))) ;;
     esac ;;
  files) shift; files="$*"; set -- files ;;
  *) echo "usage: $0 a|b|b1|b2|files FILE..." >&2; exit 2 ;;
esac
log="$o/sweep-$1.log"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$log"
for f in $files; do
  start=$(date +%s)
  out="$o/sweep-$(basename "$f" .py).out"  # the file's whole pytest output, kept on a timeout
  PYTHONPATH=/tmp/site:src timeout "${FILE_TIMEOUT:-300}" python3 -m pytest -v \
    -p no:cacheprovider -m gpu -rfE ${JOBS:+-n $JOBS} "$f" > "$out" 2>&1
  rc=$?
  { echo "### $f rc=$rc $(( $(date +%s) - start ))s"
    grep -E "^(FAILED|ERROR)|passed|failed|error|no tests ran" "$out" | tail -15
    if [ $rc = 124 ]; then grep -E " (PASSED|FAILED|ERROR|SKIPPED)" "$out" | tail -15; fi
  } | tee -a "$log"
done
