#!/usr/bin/env bash
# The side-stream L2 weight prefetch (layers/l2_prefetch.py, MODELPORT_L2_PREFETCH) on the
# device, from the repo root, carrying .whl (session 45):
#   bash bench/gpu/l2_calls.sh 1   # its GPU tests, bench/gpu/l2_probe.py, W3 bf16 per plan
#   bash bench/gpu/l2_calls.sh 2   # W3 AWQ per plan (each AWQ run packs the dummy weights)
# W3 (batch 1, 1,024-token prompt, 128 new tokens) is run once per entry of PLANS, plain
# first and last; each line of $OUT/l2-w3.jsonl names its plan in env.knobs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
[ -d .whl ] && python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
run() { local t=$1; shift; echo "### $* (timeout ${t}s)"; timeout "$t" "$@"; echo "### rc=$?"; }
w3() {  # w3 TIMEOUT PLAN KIND [latency args...]
  local t=$1 plan=$2 kind=$3; shift 3
  echo "--- plan '$plan' kind $kind $*"
  MODELPORT_L2_PREFETCH=$plan MODELPORT_L2_PREFETCH_KIND=$kind timeout "$t" \
    python3 -m modelport.bench.latency --model-config bench/configs/llama-3.1-8b.json \
    --load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 8 --batch-size 1 \
    --input-len 1024 --output-len 128 --num-iters 5 --output-json "$OUT/l2-w3.jsonl" "$@" \
    2>"$OUT/l2-w3.err" || { echo "rc=$?"; tail -20 "$OUT/l2-w3.err"; return; }
  tail -1 "$OUT/l2-w3.jsonl" | python3 -c 'import json,sys; d=json.load(sys.stdin); r=d["runs"][0]; print("ITL", r["itl_ms"], r["itl_ms_all"], "TTFT", r["ttft_ms"])'
}
PLANS_BF16=${PLANS_BF16:-"attn:o attn:o,down:next_qkv attn:o,norm2:gate_up,act:down,down:next_qkv"}
PLANS_AWQ=${PLANS_AWQ:-"attn:o qkv:o,attn:gate_up,gate_up:down,down:next_qkv"}
case ${1:-1} in
  1) run 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests/test_l2_prefetch.py \
       2>&1 | tail -15
     run 120 python3 bench/gpu/l2_probe.py --shapes o qkv --cycles 0 16000 --mb 16 40 \
       | tee "$OUT/l2-probe.jsonl"
     w3 60 "" bulk
     for p in $PLANS_BF16; do w3 60 "$p" bulk; done
     w3 60 attn:o load
     w3 60 "" bulk ;;
  2) w3 170 "" bulk --quantization awq
     for p in $PLANS_AWQ; do w3 170 "$p" bulk --quantization awq; done ;;
  *) echo "usage: $0 1|2" >&2; exit 2 ;;
esac
