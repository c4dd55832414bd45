#!/usr/bin/env bash
# The next device session's plan (bench/README.md, "Next device session") as three calls that
# each fit the device tool's 600 s limit; every stage has its own timeout, so a slow stage
# leaves the others' results under $OUT. From the repo root, carrying .whl:
#   bash bench/gpu/next_calls.sh 1     # GPU tests of session 22's kernels, decode caps, NF4 A/B
#   bash bench/gpu/next_calls.sh 2     # GGUF wide-K A/B, W3 AWQ (the W4 GEMV caps), W1 A/B
#   bash bench/gpu/next_calls.sh 3     # W2 through the HTTP server
# DECODE_CAP overrides the 16-bit decode config tried in call 2 (default: the r96 cap from
# batch bucket 128; pick the winner of call 1's decode-ragged rows).
set -uo pipefail
cd "$(dirname "$0")/../.."
run() { local t=$1; shift; echo "### $* (timeout ${t}s)"; timeout "$t" "$@"; echo "### rc=$?"; }
case ${1:-1} in
  1) run 280 bash bench/gpu/run_all.sh s22-tests
     run 150 env DECODE_RAGGED_ALL=1 DECODE_RAGGED_ROPE=1 DECODE_RAGGED_BATCHES="256 128" \
       DECODE_RAGGED_SPLITS=0 bash bench/gpu/run_all.sh decode-ragged
     run 120 bash bench/gpu/run_all.sh nf4-ab ;;
  2) run 130 bash bench/gpu/run_all.sh wide-k-ab
     run 130 env W3_EXTRA="--quantization awq" W3_ENVS="MODELPORT_PDL=1" bash bench/gpu/run_all.sh w3-env
     run 300 env W1_ENVS="MODELPORT_PDL=1 MODELPORT_DECODE_CONFIG=${DECODE_CAP:-16bit@128:n32w4s3k0v0p264r96}" \
       bash bench/gpu/run_all.sh w1-env ;;
  3) run 560 bash bench/gpu/run_all.sh w2 ;;
  *) echo "usage: $0 1|2|3" >&2; exit 2 ;;
esac
