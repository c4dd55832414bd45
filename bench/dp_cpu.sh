#!/usr/bin/env bash
# Data parallelism on a CPU box: `modelport serve --data-parallel-size 1` then `2` (the embedded
# default model), each driven by `modelport bench serve` with 32 requests at once, 64-token
# prompts, 64 new tokens (BENCH.md's C2 shape). From the repo root:
#   bash bench/dp_cpu.sh [OUT_DIR]        # one JSON result per size in OUT_DIR (default /tmp)
set -u
out=${1:-/tmp}
for dp in 1 2; do
  port=$((8100 + dp))
  .venv/bin/modelport serve --port $port --data-parallel-size $dp > "$out/serve-dp$dp.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 1; done
  .venv/bin/modelport bench serve --url http://127.0.0.1:$port --num-prompts 32 --input-len 64 \
    --output-len 64 --ignore-eos --output-json "$out/dp$dp.json" > /dev/null
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('dp', sys.argv[2], round(d['output_throughput'], 1), 'output tok/s', round(d['duration_s'], 2), 's, mean TPOT', round(d['mean_tpot_ms']), 'ms,', d['completed'], 'completed,', d['failed'], 'failed')" "$out/dp$dp.json" $dp
  kill -INT $pid; wait $pid
done
