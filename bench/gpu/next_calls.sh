#!/usr/bin/env bash
# The next device session's plan (bench/README.md, "Next device session") as calls that each
# fit the device tool's 600 s limit; every stage has its own timeout, so a slow stage leaves
# the others' results under $OUT. From the repo root, carrying .whl, on the H200:
#   bash bench/gpu/next_calls.sh 1   # W3 bf16 and AWQ; NF4 and GGUF Q8_0 decode (new defaults)
#   bash bench/gpu/next_calls.sh 2   # session 25's GPU tests (embeddings, grammar in graph
#                                    # batches, the engine); W1 bf16 (profiled) and FP8 weights + KV
#   bash bench/gpu/next_calls.sh 3   # W2 through the HTTP server
# Session 24's H100 timings (stage lengths there): w3 18 s, AWQ w3 96 s (84 s of it packing
# the dummy weights), one quant-decode format ~110 s, two W1 runs 73 s.
set -uo pipefail
cd "$(dirname "$0")/../.."
run() { local t=$1; shift; echo "### $* (timeout ${t}s)"; timeout "$t" "$@"; echo "### rc=$?"; }
# the carried wheels into /tmp/site (as run_all.sh does), for the stages run without it
wheels() {
  [ -d .whl ] || return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
}
# MoE AWQ single stream with OLD_MOE_QUANT (a triton_moe_quant.py) in a copy of src/, if set
old_tree_moe_awq() {
  [ -f "${OLD_MOE_QUANT:-}" ] || return 0
  rm -rf /tmp/old && mkdir -p /tmp/old && cp -r src /tmp/old/
  cp "$OLD_MOE_QUANT" /tmp/old/src/modelport/layers/triton_moe_quant.py
  run "$1" env SRC_DIR=/tmp/old/src MODELPORT_AB_TREE=old MOE_QUANTS=awq bash bench/gpu/run_all.sh moe-w3
}
case ${1:-1} in
  1) run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
     run 170 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
     run 330 env QD_FORMATS="bitsandbytes gguf-q8_0" bash bench/gpu/run_all.sh quant-decode ;;
  2) run 180 bash bench/gpu/run_all.sh s25-tests
     run 190 bash bench/gpu/run_all.sh w1
     run 200 env W1_EXTRA="--quantization fp8 --kv-cache-dtype fp8" bash bench/gpu/run_all.sh w1-env ;;
  3) run 560 bash bench/gpu/run_all.sh w2 ;;
  # session 25 on the H100: the GPU tests again, W3 bf16 + AWQ, GGUF Q8_0 decode
  s25) run 120 bash bench/gpu/run_all.sh s25-tests
       run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
       run 170 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
       run 200 env QD_FORMATS="gguf-q8_0" bash bench/gpu/run_all.sh quant-decode ;;
  # session 26: GPU tests of its engine changes (structured outputs after the reasoning,
  # kv_cache_memory on CUDA), then W2 at 16 req/s (never run on a GPU)
  s26) run 200 bash bench/gpu/run_all.sh s26-tests
       run 330 env W2_RATES=16 bash bench/gpu/run_all.sh w2 ;;
  # session 27: GPU tests of the new model families (MoE's Triton grouped GEMM, sliding
  # windows and soft-caps in the Triton attention kernels, Gemma, Phi-3, Granite, OLMo 2,
  # BERT); then, only where the card is an H200, W3 bf16 and AWQ (the targets' card)
  s27) run 330 bash bench/gpu/run_all.sh s27-tests
       if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
         run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
         run 170 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
       fi ;;
  # session 27, second call: the OLMo 2 bf16 test again (near-tie aware), then MoE single
  # stream (W3's shape of request) on the Qwen1.5-MoE-A2.7B shape with dummy weights, ours
  # then HF transformers
  s27b) run 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_models_more.py
        run 150 python3 -m modelport.bench.latency --model-config bench/configs/qwen1.5-moe-a2.7b.json \
            --load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 8 \
            --input-len 1024 --output-len 128 --batch-size 1 --num-iters 3 --backend modelport
        run 200 python3 -m modelport.bench.latency --model-config bench/configs/qwen1.5-moe-a2.7b.json \
            --load-format dummy --dtype bfloat16 --max-model-len 2048 --input-len 1024 \
            --output-len 32 --batch-size 1 --num-iters 1 --num-iters-warmup 1 --backend hf ;;
  # session 29: GPU tests never run (BERT token types, CUDA shared memory) and those of the
  # files session 28 changed (MoE, the engine; TP skips on one GPU); then, on an H200, W3 bf16
  # and AWQ
  s29) run 300 bash bench/gpu/run_all.sh s29-tests
       if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
         run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
         run 170 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
       fi ;;
  # session 29, second call: the GPU tests of quantized MoE on CUDA (restacked FP8 / AWQ
  # experts in the grouped kernels, graphs vs eager) and of the sliding-window block release;
  # then MoE single stream (Qwen1.5-MoE-A2.7B shape) bf16 and online FP8 in one process kind
  s29b) run 330 bash bench/gpu/run_all.sh s29b-tests
        run 250 bash bench/gpu/run_all.sh moe-w3 ;;
  # session 30 (H200), after W3 AWQ with the shipped and the half2 W4 GEMV (2.306 vs 2.251 ms)
  # made half2 the default: its GPU tests, the AWQ MoE tests with the near-tie check, the
  # GEMV / GGUF engine tests; then W3 bf16 and AWQ again
  s30c) run 300 bash bench/gpu/run_all.sh s30-tests
        run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
        run 170 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env ;;
  # session 31: the GPU tests never run (EAGLE / EAGLE-3 on CUDA, OLMoE / GraniteMoE against
  # HF and graphs vs eager, the GEMV / kept-GGUF engine tests cut in session 30), then MoE
  # single stream bf16 and online FP8
  s31) run 360 bash bench/gpu/run_all.sh s31-tests
       run 220 bash bench/gpu/run_all.sh moe-w3 ;;
  # session 31, second call: the spec-decoding CUDA tests again (session 31's first call:
  # EAGLE fp32 passed, the rest ran out of memory beside earlier tests' engines), MoE single
  # stream online FP8 (it ran out of memory allocating the KV cache), W1 bf16 profiled (with
  # the running rows and cached tokens of the profiled steps), then FP8 weights + KV with the
  # activation codes from the norm / SiLU kernels off and on (a tree with branch
  # wip/s29-half2-fp8-act's fp8_act_quant applied; on main the knob does nothing)
  s31b) run 150 env PYTEST_FILES="tests/test_spec_eagle.py tests/test_spec_eagle3.py tests/test_spec_decode.py" \
          bash bench/gpu/run_all.sh gpu-files
        run 100 env MOE_QUANTS=fp8 bash bench/gpu/run_all.sh moe-w3
        run 130 bash bench/gpu/run_all.sh w1
        run 170 env W1_EXTRA="--quantization fp8 --kv-cache-dtype fp8" \
          W1_ENVS="MODELPORT_FP8_FUSED_ACT_QUANT=0 MODELPORT_FP8_FUSED_ACT_QUANT=1" \
          bash bench/gpu/run_all.sh w1-env ;;
  # session 31, third call: FP8 W1 with the activation codes from the norm / SiLU kernels
  # on, then off (startup ~90 s each: online quantization and autotuning); MoE online FP8
  # with the KV budget that leaves out part-used allocator segments
  s31c) run 300 env W1_EXTRA="--quantization fp8 --kv-cache-dtype fp8" \
          W1_ENVS="MODELPORT_FP8_FUSED_ACT_QUANT=1 MODELPORT_FP8_FUSED_ACT_QUANT=0" \
          bash bench/gpu/run_all.sh w1-env
        run 150 env MOE_QUANTS=fp8 bash bench/gpu/run_all.sh moe-w3 ;;
  # session 32, MoE: the few-token path (route_topk + the two expert GEMVs) on CUDA: its GPU
  # tests and the MoE models' / quantized MoE engine tests, then MoE single stream (profiled)
  # with the grouped GEMM for every batch (MODELPORT_MOE_GEMV_MAX=0) and with the new path,
  # bf16 (s32b) and online FP8 (s32c), one process after the other
  s32b) run 200 env PYTEST_FILES="tests/test_moe_few_tokens.py tests/test_models_moe.py tests/test_moe_quantized_cuda.py" \
          bash bench/gpu/run_all.sh gpu-files
        run 80 env MODELPORT_MOE_GEMV_MAX=0 MOE_QUANTS=none MOE_EXTRA=--profile bash bench/gpu/run_all.sh moe-w3
        run 90 env MOE_QUANTS=none MOE_EXTRA=--profile bash bench/gpu/run_all.sh moe-w3 ;;
  s32c) run 140 env MODELPORT_MOE_GEMV_MAX=0 MOE_QUANTS=fp8 MOE_EXTRA=--profile bash bench/gpu/run_all.sh moe-w3
        run 160 env MOE_QUANTS=fp8 MOE_EXTRA=--profile bash bench/gpu/run_all.sh moe-w3 ;;
  # session 32, fourth call: the router / shared-expert gate on the Triton GEMV at one row
  # (MODELPORT_GEMV_GATES=0 then 1), and where the few-token threshold sits: MoE decode at
  # batch 8 (32 assignments) grouped vs GEMVs, batch 16 (64) grouped vs GEMVs (MAX=64)
  s32d) run 150 env PYTEST_FILES="tests/test_moe_few_tokens.py tests/test_gpu_gemv.py" bash bench/gpu/run_all.sh gpu-files
        for v in MODELPORT_GEMV_GATES=0 MODELPORT_GEMV_GATES=1; do
          run 60 env $v MOE_QUANTS=none MOE_EXTRA=--profile bash bench/gpu/run_all.sh moe-w3
        done
        for v in "8 MODELPORT_MOE_GEMV_MAX=0" "8 MODELPORT_MOE_GEMV_MAX=32" "16 MODELPORT_MOE_GEMV_MAX=32" \
                 "16 MODELPORT_MOE_GEMV_MAX=64"; do
          set -- $v
          run 50 env $2 MOE_QUANTS=none MOE_EXTRA="--batch-size $1" bash bench/gpu/run_all.sh moe-w3
        done ;;
  # prepared in session 32 after its device time ran out, not yet run: the few-token GEMVs
  # for 4-bit integer experts (AWQ / GPTQ, opt-in MODELPORT_MOE_GEMV_INT=1): their GPU test,
  # then one MoE layer's routed experts at 1 and 8 tokens, grouped vs GEMVs, for bf16, FP8
  # and int4 (bench/gpu/moe_layer_bench.py)
  s32e) wheels
        run 90 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_moe_few_tokens.py -k integer
        run 130 env PYTHONPATH=/tmp/site:src python3 bench/gpu/moe_layer_bench.py \
          --json "${OUT:-bench/results}/moe_layer.jsonl" ;;
  # session 33: s32e's integer-code MoE GEMVs (test + one-layer bench); then on an H200 W3
  # bf16 and AWQ (the targets' card), elsewhere MoE single stream with AWQ experts, the
  # integer GEMVs (MODELPORT_MOE_GEMV_INT=1) then the grouped GEMM (=0)
  s33) bash "$0" s32e
       if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
         run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
         run 170 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
       else
         run 200 env MODELPORT_MOE_GEMV_INT=1 MOE_QUANTS=awq bash bench/gpu/run_all.sh moe-w3
         run 160 env MODELPORT_MOE_GEMV_INT=0 MOE_QUANTS=awq bash bench/gpu/run_all.sh moe-w3
       fi ;;
  # session 33, second call: the integer-code MoE GEMVs rewritten (words loaded once, codes
  # made floats by a LOP3): their GPU tests, one MoE layer int4 / bf16, MoE AWQ single stream
  # with them, then (OLD_MOE_QUANT=FILE: the previous triton_moe_quant.py) with the old ones
  s33b) wheels
        run 120 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_moe_few_tokens.py -k "integer or graph"
        run 120 env PYTHONPATH=/tmp/site:src python3 bench/gpu/moe_layer_bench.py --kinds int4 bf16 \
          --json "${OUT:-bench/results}/moe_layer.jsonl"
        run 150 env MOE_QUANTS=awq bash bench/gpu/run_all.sh moe-w3
        old_tree_moe_awq 150 ;;
  # session 33, third call: the grouped integer-code kernel rewritten for prefill (words once,
  # magic codes, one FMA a code, tl.join to natural order): the quantized MoE GPU tests (AWQ
  # in graphs and eager), its launch configs against bf16 at 256 / 1,024 tokens, then MoE AWQ
  # single stream with the fastest config at 1,024 tokens, and (OLD_MOE_QUANT=FILE) the
  # session's starting triton_moe_quant.py (grouped + GEMVs) in the same call
  s33c) wheels
        run 130 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_moe_quantized_cuda.py -k awq
        run 120 env PYTHONPATH=/tmp/site:src python3 bench/gpu/moe_layer_bench.py --grouped \
          --kinds int4 --tokens 256 1024 --json "${OUT:-bench/results}/moe_layer_grouped.jsonl"
        best=$(python3 -c "
import json, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
rs = [r for r in rs if r['tokens'] == 1024 and r['variant'] != 'int4 gather']
print(min(rs, key=lambda r: r['us'])['variant'].split()[1] if rs else 'n64k128w4')
" "${OUT:-bench/results}/moe_layer_grouped.jsonl" 2>/dev/null || echo n64k128w4)
        echo "### fastest grouped config at 1,024 tokens: $best"
        run 150 env MODELPORT_MOE_WINT_CONFIG=$best MOE_QUANTS=awq bash bench/gpu/run_all.sh moe-w3
        old_tree_moe_awq 120 ;;
  # session 33, fourth call: the GPU tests of the new grouped integer kernel (Qwen shape, every
  # config and the gather kernel, 4 and 8 bits), the AWQ / GPTQ MoE engine tests and the
  # few-token integer test; then where the integer GEMVs stop paying: one layer at 8, 16
  # and 32 tokens, GEMVs vs the new grouped kernel
  s33d) wheels
        run 240 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_moe_wint_grouped.py tests/test_moe_few_tokens.py tests/test_moe_quantized_cuda.py \
          -k "integer or awq or gptq" 2>&1 | tee "${OUT:-bench/results}/s33d-tests.log" | tail -15
        run 90 env PYTHONPATH=/tmp/site:src python3 bench/gpu/moe_layer_bench.py --kinds int4 bf16 \
          --tokens 8 16 32 --json "${OUT:-bench/results}/moe_layer.jsonl" ;;
  # session 33, fifth call: the FP8 grouped MoE kernel's launch configs (prefill; it ran
  # 32-deep K steps, never timed) against bf16 at 256 / 1,024 tokens, then MoE single stream
  # with online FP8, the fastest config at 1,024 tokens against the default n64k32w4
  s33e) wheels
        run 100 env PYTHONPATH=/tmp/site:src python3 bench/gpu/moe_layer_bench.py --grouped \
          --kinds fp8 --tokens 256 1024 --json "${OUT:-bench/results}/moe_layer_grouped_fp8.jsonl"
        best=$(python3 -c "
import json, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
rs = [r for r in rs if r['tokens'] == 1024]
print(min(rs, key=lambda r: r['us'])['variant'].split()[1] if rs else 'n64k32w4')
" "${OUT:-bench/results}/moe_layer_grouped_fp8.jsonl" 2>/dev/null || echo n64k32w4)
        echo "### fastest FP8 grouped config at 1,024 tokens: $best"
        for c in $best n64k32w4; do
          run 130 env MODELPORT_MOE_FP8_CONFIG=$c MOE_QUANTS=fp8 bash bench/gpu/run_all.sh moe-w3
        done ;;
  # prepared in session 33 after its device time ran out, not yet run: GPTQ act-order MoE
  # experts on CUDA (perm13 gathers in the grouped kernel and the few-token GEMV): the
  # engine test against the dequantized checkpoint in graphs and eager, and the kernels'
  # GPU tests again
  s34) run 300 env PYTEST_FILES="tests/test_moe_quantized_cuda.py tests/test_moe_wint_grouped.py tests/test_moe_few_tokens.py" \
         bash bench/gpu/run_all.sh gpu-files ;;
  # session 35: on an H200 W3 bf16 and AWQ (the targets' card); then the GPU tests of what
  # sessions 33-35 wrote without a GPU: GPTQ act-order MoE experts (s34), expert parallelism's
  # shares on CUDA, sleep mode (graphs replay after wake-up), custom logits processors on
  # CUDA (the CPU test file, run where the device is cuda); s35b: W1 bf16 (profiled) and FP8
  s35) if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
         run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
         run 170 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
       fi
       wheels
       run 100 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
         tests/test_gpu_engine.py tests/test_expert_parallel.py tests/test_logits_processors.py \
         -k "sleep or shares or cuda" \
         2>&1 | tee "${OUT:-bench/results}/s35-tests.log" | tail -15
       run 300 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
         tests/test_moe_quantized_cuda.py tests/test_moe_wint_grouped.py tests/test_moe_few_tokens.py \
         2>&1 | tee "${OUT:-bench/results}/s35-moe-tests.log" | tail -15 ;;
  # session 35's H100 call failed 4 tests, fixed after it (38b980e): the sleep-mode tests
  # (the test held the old graphs, so the KV cache stayed) and the GPTQ act-order MoE engine
  # tests (g_idx compared across devices at load)
  s35c) wheels
        run 110 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_gpu_engine.py -k sleep 2>&1 | tee "${OUT:-bench/results}/s35c-sleep-tests.log" | tail -8
        run 160 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_moe_quantized_cuda.py -k act-order 2>&1 | tee "${OUT:-bench/results}/s35c-act-order-tests.log" | tail -8 ;;
  s35b) run 190 bash bench/gpu/run_all.sh w1
        run 200 env W1_EXTRA="--quantization fp8 --kv-cache-dtype fp8" bash bench/gpu/run_all.sh w1-env ;;
  # session 36: the targets' figures on whichever card comes (H200 for the targets; an H100
  # gives ratios only): W3 bf16 and AWQ, W1 bf16 (profiled) and FP8 weights + KV at the
  # 2,048-token budget, then W1 bf16 at 8,192 (vLLM's offline LLM defaults to 16,384 on
  # such cards; the third round's 8,192 A/B was on older code)
  s36) run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
       run 150 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
       run 150 bash bench/gpu/run_all.sh w1
       run 140 env W1_EXTRA="--quantization fp8 --kv-cache-dtype fp8" bash bench/gpu/run_all.sh w1-env
       run 90 env W1_BUDGET=8192 bash bench/gpu/run_all.sh w1-env ;;
  # session 36, second call: the profiling forward's attention in query chunks (its [heads,
  # t, t] scores had cost 9,109 KV blocks at an 8,192-token budget on the H100): its GPU test,
  # then W1 bf16 at budgets 2,048 / 8,192 / 16,384 and FP8 weights + KV at 2,048 / 16,384
  s36b) wheels
        run 60 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_gpu_attention.py -k profiling 2>&1 | tail -3
        env PYTHONPATH=/tmp/site:src python3 -c "
import torch
from modelport.engine.gpu_info import total_memory_and_name
from modelport.config import default_max_num_batched_tokens, is_large_gpu
g = total_memory_and_name('cuda'); print('NVML', g, 'CUDA initialized', torch.cuda.is_initialized())
print('default budget offline / server', *(default_max_num_batched_tokens(True, offline=o, large_gpu=bool(g) and is_large_gpu(*g)) for o in (True, False)))"
        for v in "2048 bf16" "16384 bf16" "2048 fp8" "16384 fp8" "8192 bf16"; do
          set -- $v
          extra=""; [ "$2" = fp8 ] && extra="--quantization fp8 --kv-cache-dtype fp8"
          run 100 env W1_BUDGET=$1 W1_EXTRA="$extra" bash bench/gpu/run_all.sh w1-env
        done ;;
  # session 37: on an H200 W3 bf16, W1 bf16 and FP8 weights + KV at the new offline default
  # budget (16,384), W3 AWQ; on an H100 W2 at rate inf with --max-num-seqs 256, then at the
  # server's new default (1,024 on such a card); on either the planner against the engine's
  # KV blocks on CUDA (not run since session 36's profiling changes; a 16,384-token budget
  # added) and the decode-graph limit test (last on the H200, first on an H100)
  s37) wheels
       s37_tests() {
         run 150 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
           tests/test_planner_gpu.py tests/test_gpu_engine.py -k "planner or graph_limit" \
           2>&1 | tee "${OUT:-bench/results}/s37-tests.log" | tail -8
       }
       if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
         run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
         run 90 env W1_BUDGET=16384 bash bench/gpu/run_all.sh w1-env
         run 100 env W1_BUDGET=16384 W1_EXTRA="--quantization fp8 --kv-cache-dtype fp8" bash bench/gpu/run_all.sh w1-env
         run 150 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
         s37_tests
       else
         s37_tests
         run 150 env W2_RATES=inf W2_SEQS=256 bash bench/gpu/run_all.sh w2
         run 150 env W2_RATES=inf W2_SEQS= bash bench/gpu/run_all.sh w2
         grep -h "max_num_seqs\|KV cache\|graphs" "${OUT:-bench/results}"/w2-server.log | head -5
       fi ;;
  # session 37, second call: where the engine's memory goes before the KV cache is sized, next
  # to the planner's model (the first call's planner test: the planner 0.7-2.0 % below the
  # engine's blocks)
  s37b) wheels
        run 240 env PYTHONPATH=/tmp/site:src python3 bench/gpu/planner_probe.py \
          --out "${OUT:-bench/results}/planner_probe.jsonl" ;;
  # session 37, third call: the planner test again after its fix (one rotary table for the
  # model, the larger of the forward's and the sampler's peaks rather than their sum)
  s37c) wheels
        run 150 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_planner_gpu.py 2>&1 | tee "${OUT:-bench/results}/s37c-planner-tests.log" | tail -8 ;;
  # session 38: the 4-bit GEMM on raw codes (5..255 rows): its GPU tests, then the linear
  # layers of an 8B decode step per row count: bf16 (cuBLAS), the engine's path (the GEMV up
  # to 4 rows, the affine GEMM - each weight dequantized before tl.dot - to 255, expanded to
  # bf16 + cuBLAS from 256), the codes GEMM with the group sums computed before the launch,
  # two dots a step or one on x copied into pair order
  s38) run 70 env PYTHONPATH=src python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quant_gpu.py -k "codes and 128" \
         2>&1 | tee "${OUT:-bench/results}/s38-codes-tests.log" | tail -8
       run 220 env QUANT_FORMATS="${S38_FORMATS:-bf16 awq-w4 awq-w4-codes-pair awq-w4-codes-xsum}" \
         QUANT_BATCHES="${S38_BATCHES:-16 64 128 256}" bash bench/gpu/run_all.sh quant-bench ;;
  # session 38, second call: AWQ decode at batch 1 and 64 with the affine and the codes GEMM,
  # one process after the other; then the engine's GPU tests whole and the embeddings on CUDA
  # (the pooling model's profile no longer runs the LM head)
  s38b) wheels
        run 300 env QD_FORMATS=awq QD_ENVS="MODELPORT_W4_GEMM=affine MODELPORT_W4_GEMM=codes${S38_CODES_EXTRA:-}" \
          bash bench/gpu/run_all.sh qd-env
        run 280 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_gpu_engine.py tests/test_gpu_features.py -k "not tensor_parallel" \
          2>&1 | tee "${OUT:-bench/results}/s38b-tests.log" | tail -8 ;;
  # session 41 (H200): the plan's items 1 and 2: W2 at Poisson 16 req/s through the server, then
  # NF4 and GGUF Q8_0 decode at batch 1 and 64 with session 24's defaults
  s41) run 210 env W2_RATES=16 bash bench/gpu/run_all.sh w2
       run 340 env QD_FORMATS="bitsandbytes gguf-q8_0" bash bench/gpu/run_all.sh quant-decode ;;
  # session 41, second call: W2 at 16 req/s again, now with the warm-up request and each
  # request's send time and TTFT (where the first run's 3.4 s p99 TTFT sits); W3 bf16 first
  # where the card is an H200
  s41b) if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
          run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
        fi
        run 230 env W2_RATES=16 bash bench/gpu/run_all.sh w2 ;;
  # session 41, third call: the start-up warm-up of mixed prefill / decode steps (one per
  # decode batch bucket), W2 at 16 req/s without it, then with it (one machine), then its GPU
  # test and the engine's graph / HF equality tests
  s41c) wheels
        o=${OUT:-bench/results}
        run 170 env MODELPORT_WARMUP_STEPS=0 W2_RATES=16 bash bench/gpu/run_all.sh w2
        cp "$o/w2-server.log" "$o/w2-server-warmup-off.log"
        run 190 env W2_RATES=16 bash bench/gpu/run_all.sh w2
        grep -h "warmed up\|captured" "$o"/w2-server*.log
        run 200 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          tests/test_gpu_engine.py -k "mixed_step or single_stream_greedy or cuda_graph_replay" \
          2>&1 | tee "$o/s41c-tests.log" | tail -8 ;;
  # session 41, fourth call: the same A/B, each server with an empty Triton cache (the third
  # call's second run found the first run's compiled kernels on disk)
  s41d) o=${OUT:-bench/results}
        for w in 0 1; do
          run 200 env TRITON_CACHE_DIR="$(mktemp -d)" MODELPORT_WARMUP_STEPS=$w W2_RATES=16 \
            bash bench/gpu/run_all.sh w2
          cp "$o/w2-server.log" "$o/w2-server-cold-warmup-$w.log"
        done
        grep -h "warmed up\|captured\|ready" "$o"/w2-server-cold*.log ;;
  # session 41, fifth call: the warm-up with the eager step sizes too, empty Triton cache
  s41e) o=${OUT:-bench/results}
        run 200 env TRITON_CACHE_DIR="$(mktemp -d)" W2_RATES=16 bash bench/gpu/run_all.sh w2
        grep -h "warmed up\|captured\|ready" "$o"/w2-server.log ;;
  # session 42: session 41's GPU tests never run (GGUF Q2_K / Q3_K on the Triton W4 kernels;
  # the mixed-step warm-up's last changes), then, only on an H200, W3 bf16 + AWQ and W1 bf16
  s42) wheels
       o=${OUT:-bench/results}
       run 200 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
         tests/test_gguf_q2k_q3k.py tests/test_gpu_engine.py -k "q2_k or q3_k or mixed_step" \
         2>&1 | tee "$o/s42-tests.log" | tail -8
       if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
         run 60 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
         run 170 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
         run 150 env W1_BUDGET=16384 bash bench/gpu/run_all.sh w1
       fi ;;
  # session 42, second call: the GPU tests of this session's changes (rope scaling past
  # max_position_embeddings, the new architectures), then the engine's and the model
  # families' GPU tests as time allows
  s42b) wheels
        o=${OUT:-bench/results}
        new=$(ls tests/test_rope_scaling.py tests/test_models_new_archs.py 2>/dev/null)
        run 200 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          -rfE $new 2>&1 | tee "$o/s42b-tests.log" | tail -12
        run 200 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          -rfE tests/test_gpu_engine.py tests/test_models_more.py tests/test_spec_decode.py \
          2>&1 | tee "$o/s42b-engine-tests.log" | tail -12 ;;
  s43) wheels
        o=${OUT:-bench/results}
        # session 42's GPU tests (s42b) with session 43's torch-profiler trace on CUDA
        run 240 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          -rfE tests/test_rope_scaling.py tests/test_models_new_archs.py \
          tests/test_torch_profiler.py 2>&1 | tee "$o/s43-tests.log" | tail -12
        run 300 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider -m gpu \
          -rfE tests/test_gpu_engine.py tests/test_models_more.py tests/test_spec_decode.py \
          2>&1 | tee "$o/s43-engine-tests.log" | tail -12 ;;
  # session 46: on an H200, the plan's item 2 (NF4 and GGUF Q8_0 decode at batch 1 and 64);
  # on any card, the plan's item 5 (GPU test files not run since their last changes)
  s46) if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
         run 340 env QD_FORMATS="bitsandbytes gguf-q8_0" bash bench/gpu/run_all.sh quant-decode
       else
         run 570 env FILE_TIMEOUT=150 bash bench/gpu/gpu_sweep.sh files tests/test_sampler_argmax.py \
           tests/test_w4_gemv_half2.py tests/test_gpu_piecewise.py tests/test_logits_processors.py \
           tests/test_models_bert.py tests/test_models_gemma.py tests/test_sliding_window_kv.py \
           tests/test_triton_cuda_shm.py tests/test_repository_gpu.py tests/test_torchserve_gpu.py \
           tests/test_lora.py tests/test_quant_tools_gpu.py
       fi ;;
  s46b) run 570 env FILE_TIMEOUT=150 bash bench/gpu/gpu_sweep.sh files tests/test_models_moe.py \
          tests/test_models_moe_more.py tests/test_moe_few_tokens.py tests/test_moe_quantized_cuda.py \
          tests/test_quant_fp8_gpu.py tests/test_spec_eagle.py tests/test_spec_eagle3.py ;;
  # session 46, later calls: on an H200, W3 bf16 on current main and the plan's item 2; on any
  # card, the three files that lacked tritonclient / torch-model-archiver in s46, then s46b's
  s46c) three="tests/test_triton_cuda_shm.py tests/test_repository_gpu.py tests/test_torchserve_gpu.py"
        if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
          run 70 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
          run 330 env QD_FORMATS="bitsandbytes gguf-q8_0" bash bench/gpu/run_all.sh quant-decode
          run 150 env FILE_TIMEOUT=60 bash bench/gpu/gpu_sweep.sh files $three
        else
          run 570 env FILE_TIMEOUT=120 bash bench/gpu/gpu_sweep.sh files $three \
            tests/test_quant_fp8_gpu.py tests/test_spec_eagle.py tests/test_spec_eagle3.py \
            tests/test_moe_few_tokens.py tests/test_models_moe.py tests/test_models_moe_more.py \
            tests/test_moe_quantized_cuda.py
        fi ;;
  # session 47: the sweep files that timed out at 120 s or lacked torchserve's `ts` in s46c
  s47) run 570 env FILE_TIMEOUT=200 bash bench/gpu/gpu_sweep.sh files tests/test_torchserve_gpu.py \
         tests/test_moe_quantized_cuda.py tests/test_quant_fp8_gpu.py tests/test_models_moe.py ;;
  # session 47, later: the quantized-MoE file alone (timed out at 200 s in s47)
  s47b) run 560 env FILE_TIMEOUT=540 bash bench/gpu/gpu_sweep.sh files tests/test_moe_quantized_cuda.py ;;
  # session 47, later: the vLLM-backend instances (two engines on GPU 0) GPU test
  # (on an H200 first W3 bf16 on current main)
  s47c) if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
          run 80 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
        fi
        run 200 env FILE_TIMEOUT=180 bash bench/gpu/gpu_sweep.sh files tests/test_vllm_instances_gpu.py ;;
  # session 49: FP8 split-K in the Triton W8A8 GEMM (MODELPORT_FP8_SPLIT_K). s49: its GPU
  # tests, then the linear layers of a decode step at 16-256 rows, per shape, off / on
  s49) wheels
       run 190 env PYTHONPATH=/tmp/site:src python3 -m pytest -q -p no:cacheprovider \
         tests/test_quant_fp8_gpu.py -k "w8a8 or split or fp8_gemm_path or dispatch"
       for sk in 0 1; do
         run 160 env MODELPORT_FP8_SPLIT_K=$sk MODELPORT_FP8_TRITON_MAX_M=256 PYTHONPATH=/tmp/site:src \
           python3 bench/quant_gpu_linear.py --batch 16 64 128 256 --formats fp8 --per-shape --copies 4 \
           --json "${OUT:-bench/results}/fp8-split-$sk.json"
       done ;;
  # s49b: W1 with FP8 weights + KV at the 16,384-token default budget: split-K off, on, on
  # with full 256-row batches on the Triton GEMM, on with the GEMM under PDL
  s49b) run 560 env W1_BUDGET=16384 W1_EXTRA="--quantization fp8 --kv-cache-dtype fp8" \
          W1_ENVS="MODELPORT_FP8_SPLIT_K=0 MODELPORT_FP8_SPLIT_K=1 MODELPORT_FP8_SPLIT_K=1,MODELPORT_FP8_TRITON_MAX_M=256 MODELPORT_FP8_SPLIT_K=1,MODELPORT_FP8_W8A8_PDL=1" \
          bash bench/gpu/run_all.sh w1-env ;;
  # s49c: bf16 and _scaled_mm beside s49's linear figures, bf16 W1 (the ratio's base); on an
  # H200 also the targets' W3 bf16 and AWQ. s49d (H200): the NF4 / GGUF Q8_0 decode table
  s49c) wheels
        run 120 env PYTHONPATH=/tmp/site:src python3 bench/quant_gpu_linear.py --batch 16 64 128 256 \
          --formats bf16 fp8-mm --per-shape --copies 4 --json "${OUT:-bench/results}/fp8-split-peers.json"
        run 150 env W1_BUDGET=16384 W1_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w1-env
        if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
          run 70 env W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
          run 170 env W3_EXTRA="--quantization awq" W3_ENVS=MODELPORT_PDL=1 bash bench/gpu/run_all.sh w3-env
        fi ;;
  s49d) run 560 env QD_FORMATS="bitsandbytes gguf-q8_0" bash bench/gpu/run_all.sh quant-decode ;;
  *) echo "usage: $0 1|2|3|s25|s26|s27|s27b|s29|s29b|s30c|s31|s31b|s31c|s32b|s32c|s32d|s32e|s33|s33b|s33c|s33d|s33e|s34|s35|s35b|s35c|s36|s36b|s37|s37b|s37c|s38|s38b|s41|s41b|s41c|s41d|s41e|s42|s42b|s43|s46|s46b|s46c|s47|s47b|s47c|s49|s49b|s49c|s49d" >&2; exit 2 ;;
esac
