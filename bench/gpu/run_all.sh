#!/usr/bin/env bash
# Everything the GPU fast path is checked and measured with, on one H200 (the device tool's
# machine: torch 2.11, triton 3.6, transformers 5.17, no network). From the repo root:
#   bash bench/gpu/run_all.sh [stage ...]      stages: tests kernels w3 w1 hf-w3 hf-w1 (default: all);
#   also w3-sync w1-sync (async scheduling off), w3-fp8kv w1-fp8kv (FP8 KV cache), w1-fp8
#   (FP8 weights + KV), w3-awq w3-gptq w3-fp8 (quantized weights), w3-eager, quant-tests, quant-bench,
#   quant-decode (decode tok/s at batch 1 and 64 per weight format, bench/quant_decode.py;
#   QD_FORMATS="none awq ..." picks formats), w4-sweep (every W4 GEMV launch config on the 8B shapes; SWEEP_BATCHES, default 1; SWEEP_EXTRA="--half2": the half2 GEMV, the one-row default, too),
#   host-prof (cProfile of FP8 W1 engine steps: bench/gpu/host_profile.py), prefill-prof (the
#   same for W3's eager 1,024-token prefill step: its host launch time), launch-cost (host time
#   per launch of each op of that step: bench/gpu/launch_cost.py), decode-ragged (decode
#   attention on W1-like ragged batches, more splits: kernel_bench.py decode-ragged),
#   piecewise-tests (the opt-in piecewise prefill graphs' GPU tests and the engine's; pw-tests: only
#   the piecewise ones), s18-tests (the GPU tests of what session 18 wrote without a GPU: NF4
#   kernels, GGUF dummy packing and kept GGUF on CUDA, the new FP8 W8A8 configs), s19-tests
#   (speculative decoding on CUDA: greedy tokens equal to plain decoding), s20-tests (`modelport
#   quantize --device cuda` against the CPU's checkpoint, --calib-from-model on CUDA; the TP test
#   skips on one GPU), s22-tests (session 22's: the NF4 word GEMV, the W4 GEMV with its capped
#   configs, decode-config names with register caps and per-bucket overrides), nf4-ab (NF4
#   decode at batch 1 and 64 as shipped, then with the word GEMV and the split-K GEMM), wide-k-ab (GGUF Q4_K
#   and Q8_0 decode with MODELPORT_W_GEMM_WIDE_K=0, then 1), qd-env (the same for QD_FORMATS under
#   each entry of QD_ENVS, comma-joined VAR=VAL lists), pdl-check (the GPU
#   tests that had not run with PDL when it landed: bf16 GEMV, FP8, W4 GEMM, split decode), decode-sweep
#   (decode attention launch configs; DECODE_SWEEP_KINDS=fp8, DECODE_SWEEP_MATCH=regex),
#   w3-nofuse (W3 with MODELPORT_FUSED_DECODE=0: the unfused single-row decode layers),
#   w3-env (one W3 run per entry of W3_ENVS, each a comma-joined list of VAR=VAL; W3_EXTRA: more
#   latency arguments, e.g. "--quantization awq"), w1-env (the same for W1: W1_ENVS, W1_EXTRA,
#   e.g. "--quantization fp8 --kv-cache-dtype fp8"), tp2 (on the 2-GPU kind: NCCL tensor
#   parallelism's GPU test, then W3 with --tensor-parallel-size 2), w2 (online serving through the HTTP
#   server, bench/gpu/w2_serve.py: 1,000 x 1,024 -> 128 at W2_RATES, default "inf 16";
#   W2_EXTRA: more serve arguments; needs the HTTP stack as wheels: ../shared/tools/device-wheels.sh
#   fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn msgspec gguf
#   opentelemetry-api sniffio: fastapi 0.165 imports the first, the GPU image lacks both; without
#   tritonclient `serve` leaves the KServe frontend out and says so)
# gpu-files runs the `gpu`-marked tests of the files PYTEST_FILES names. moe-w3: MoE single
# stream (Qwen1.5-MoE-A2.7B's shape) per MOE_QUANTS (default "none fp8"); MOE_EXTRA: more
# latency arguments (e.g. "--profile", "--batch-size 8").
# SRC_DIR=DIR imports modelport from DIR instead of src/ (an A/B against another tree).
# W1_BUDGET=N sets the W1 stages' --max-num-batched-tokens (default 2048).
# Results (one JSON object a line) go to $OUT (the device tool's folder) or bench/results/.
# Pure-python deps missing there travel as wheels: ../shared/tools/device-wheels.sh msgspec gguf
# into .whl/, then carry ".whl" (this script installs them when the folder is there).
# Structured outputs (s25-tests) need xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 there too.
# The repository / TorchServe GPU test files (gpu_sweep.sh) need tritonclient==2.73.0
# python-rapidjson==1.25 gevent==26.9.0 geventhttpclient==2.6.1 greenlet==3.3.2 zope.event==6.2
# zope.interface==8.7 brotli==1.2.1 protobuf==6.33.6 grpcio==1.85.4 torch-model-archiver==0.12.0
# enum-compat==0.0.3 (the image's grpcio / protobuf may be older than tritonclient's stubs),
# and torchserve==0.12.0 (its `ts` package for handlers) with ts/frontend/model-server.jar
# (46 MB, unused by modelport) deleted from the wheel and its RECORD line, to fit the carry.
# Before a device session, `.venv/bin/python bench/gpu/preflight.py` runs every stage's entry
# points here on the CPU with only the image's packages and .whl's importable.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${SRC_DIR:-src}
else
  export PYTHONPATH=${SRC_DIR:-src}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=python3
CFG=bench/configs/llama-3.1-8b.json
COMMON="--model-config $CFG --load-format dummy --dtype bfloat16 --max-model-len 2048"
stages=${*:-tests kernels w3 w1 hf-w3 hf-w1}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
$PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
qd_print() {  # one line a bench/quant_decode.py result
  python3 -c 'import json,sys
for l in sys.stdin: d=json.loads(l); print(d["format"], d["env"].get("knobs") or "", d["batch"], d["weights_mb"], "MB ITL", d["itl_ms"], "tok/s", d["decode_tok_s"])'
}
rc=0
for s in $stages; do
  echo "=== $s $(date -u +%T)"
  case $s in
    tests)   $PY -m pytest -q -p no:cacheprovider tests/test_gpu_attention.py tests/test_gpu_engine.py tests/test_gpu_gemv.py \
               2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || rc=1 ;;
    kernels) $PY bench/gpu/kernel_bench.py | tee "$OUT/kernels.jsonl" || rc=1 ;;
    w3)      $PY -m modelport.bench.latency $COMMON --max-num-seqs 8 \
               --batch-size 1 --input-len 1024 --output-len 128 --num-iters 5 --profile \
               --output-json "$OUT/w3.jsonl" 2>"$OUT/w3.err" || { rc=1; tail -20 "$OUT/w3.err"; } ;;
    w3-sync) $PY -m modelport.bench.latency $COMMON --max-num-seqs 8 --no-async-scheduling \
               --batch-size 1 --input-len 1024 --output-len 128 --num-iters 5 \
               --output-json "$OUT/w3.jsonl" 2>"$OUT/w3s.err" || { rc=1; tail -20 "$OUT/w3s.err"; } ;;
    w3-fp8kv) $PY -m modelport.bench.latency $COMMON --max-num-seqs 8 --kv-cache-dtype fp8 \
               --batch-size 1 --input-len 1024 --output-len 128 --num-iters 5 \
               --output-json "$OUT/w3.jsonl" 2>"$OUT/w3f.err" || { rc=1; tail -20 "$OUT/w3f.err"; } ;;
    w1-sync) $PY -m modelport.bench.throughput $COMMON --num-prompts 256 --no-async-scheduling \
               --max-num-seqs 256 --max-num-batched-tokens ${W1_BUDGET:-2048} \
               --output-json "$OUT/w1.jsonl" 2>"$OUT/w1s.err" || { rc=1; tail -20 "$OUT/w1s.err"; } ;;
    w1-fp8kv) $PY -m modelport.bench.throughput $COMMON --num-prompts 256 --kv-cache-dtype fp8 \
               --max-num-seqs 256 --max-num-batched-tokens ${W1_BUDGET:-2048} --profile-steps 20 \
               --output-json "$OUT/w1.jsonl" 2>"$OUT/w1f.err" || { rc=1; tail -20 "$OUT/w1f.err"; } ;;
    w1-fp8)  $PY -m modelport.bench.throughput $COMMON --num-prompts 256 --kv-cache-dtype fp8 \
               --quantization fp8 --max-num-seqs 256 --max-num-batched-tokens ${W1_BUDGET:-2048} \
               --profile-steps 20 --output-json "$OUT/w1.jsonl" 2>"$OUT/w1q.err" || { rc=1; tail -20 "$OUT/w1q.err"; } ;;
    w3-awq|w3-gptq|w3-fp8) q=${s#w3-}
             $PY -m modelport.bench.latency $COMMON --max-num-seqs 8 --quantization $q \
               --batch-size 1 --input-len 1024 --output-len 128 --num-iters 5 --profile \
               --output-json "$OUT/w3.jsonl" 2>"$OUT/w3$q.err" || { rc=1; tail -20 "$OUT/w3$q.err"; } ;;
    pdl-check) { $PY -m pytest -q -p no:cacheprovider tests/test_gpu_gemv.py tests/test_quant_fp8_gpu.py \
               "tests/test_gpu_attention.py::test_decode_split_k_matches_reference" \
               && $PY -m pytest -q -p no:cacheprovider tests/test_quant_gpu.py -k "gemm or scaled_mm"; } \
               2>&1 | tee "$OUT/pdl_check.log" | tail -25 || rc=1 ;;
    quant-tests) $PY -m pytest -q -p no:cacheprovider tests/test_quant_gpu.py tests/test_quant_fp8_gpu.py \
               2>&1 | tee "$OUT/quant_tests.log" | tail -25 || rc=1 ;;
    quant-bench) $PY bench/quant_gpu_linear.py --batch ${QUANT_BATCHES:-1 4 16 64 256 2048} ${QUANT_FORMATS:+--formats $QUANT_FORMATS} \
               --json "$OUT/quant_linear.json" 2>&1 | grep -v '^ ' | grep -vx '[{}]' || rc=1 ;;
    quant-decode) for f in ${QD_FORMATS:-none awq gptq fp8 bitsandbytes gguf-q4_k gguf-q8_0}; do  # a process each
               $PY bench/quant_decode.py $COMMON --max-num-seqs 64 --formats $f \
                 --output-json "$OUT/quant_decode.jsonl" 2>"$OUT/qd.err" | qd_print \
                 || { rc=1; tail -20 "$OUT/qd.err"; }
             done ;;
    w4-sweep) $PY bench/gpu/w4_gemv_sweep.py --batch ${SWEEP_BATCHES:-1} ${SWEEP_EXTRA:-} --out "$OUT/w4_gemv_sweep.jsonl" \
               | grep '"best"' || rc=1 ;;
    host-prof) $PY bench/gpu/host_profile.py $COMMON --num-prompts 256 --kv-cache-dtype fp8 \
               --quantization fp8 --max-num-seqs 256 --max-num-batched-tokens ${W1_BUDGET:-2048} \
               > "$OUT/host_prof.txt" 2>"$OUT/hostprof.err" || { rc=1; tail -20 "$OUT/hostprof.err"; }
             tail -1 "$OUT/host_prof.txt" ;;
    piecewise-tests) $PY -m pytest -q -p no:cacheprovider tests/test_gpu_piecewise.py tests/test_gpu_engine.py \
               tests/test_triton_offline.py::test_decode_config_names_table_and_env_override \
               2>&1 | tee "$OUT/piecewise_tests.log" | tail -5 || rc=1 ;;
    s18-tests) $PY -m pytest -q -p no:cacheprovider tests/test_quant_gpu.py tests/test_quant_fp8_gpu.py \
               tests/test_gpu_attention.py -k "nf4 or gguf or every_program or triton_fp8_gemm_path or decode_config_names or n128w4s3k1v5" \
               2>&1 | tee "$OUT/s18_tests.log" | tail -15 || rc=1 ;;
    s22-tests) $PY -m pytest -q -p no:cacheprovider tests/test_quant_gpu.py tests/test_gpu_attention.py \
               tests/test_triton_offline.py -k "nf4_triton or triton_gemm_matches or decode_config_names or rope_in_decode" \
               2>&1 | tee "$OUT/s22_tests.log" | tail -15 || rc=1 ;;
    qd-env|nf4-ab|wide-k-ab)  # quant-decode per format under each comma-joined VAR=VAL list
             case $s in
               nf4-ab)    envs="MODELPORT_NF4_GEMV=bytes MODELPORT_NF4_GEMV=words,MODELPORT_NF4_GEMM_SPLIT=1"
                          fmts=bitsandbytes ;;
               wide-k-ab) envs="MODELPORT_W_GEMM_WIDE_K=0 MODELPORT_W_GEMM_WIDE_K=1"
                          fmts="gguf-q4_k gguf-q8_0" ;;
               *)         envs=${QD_ENVS:-MODELPORT_PDL=1}; fmts=${QD_FORMATS:-none} ;;
             esac
             for v in $envs; do
               for f in $fmts; do
                 env ${v//,/ } $PY bench/quant_decode.py $COMMON --max-num-seqs 64 --formats $f \
                   --output-json "$OUT/quant_decode.jsonl" 2>"$OUT/qd.err" | qd_print \
                   || { rc=1; tail -20 "$OUT/qd.err"; }
               done
             done ;;
    s19-tests) $PY -m pytest -q -p no:cacheprovider tests/test_spec_decode.py -k "cuda or verify or sampling" \
               2>&1 | tee "$OUT/s19_tests.log" | tail -15 || rc=1 ;;
    s25-tests) $PY -m pytest -q -p no:cacheprovider tests/test_gpu_features.py tests/test_gpu_engine.py \
               2>&1 | tee "$OUT/s25-tests.log" | tail -8 ;;
    s27-tests) $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_models_moe.py \
               tests/test_models_gemma.py tests/test_attention_window_triton.py \
               tests/test_models_more.py tests/test_phi3_rope_decode_triton.py \
               tests/test_models_bert.py 2>&1 | tee "$OUT/s27-tests.log" | tail -25 ;;
    s29-tests) $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_bert_token_types.py \
               tests/test_triton_cuda_shm.py tests/test_models_moe.py tests/test_gpu_engine.py \
               tests/test_tensor_parallel_gpu.py 2>&1 | tee "$OUT/s29-tests.log" | tail -25 ;;
    s29b-tests) $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_moe_quantized_cuda.py \
               tests/test_sliding_window_kv.py tests/test_models_moe.py 2>&1 \
               | tee "$OUT/s29b-tests.log" | tail -25 ;;
    moe-w3)  for q in ${MOE_QUANTS:-none fp8}; do
               $PY -m modelport.bench.latency --model-config bench/configs/qwen1.5-moe-a2.7b.json \
                 --load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 8 \
                 --input-len 1024 --output-len 128 --batch-size 1 --num-iters 3 --backend modelport \
                 --quantization "$q" ${MOE_EXTRA:-} --output-json "$OUT/moe-w3.jsonl" 2>"$OUT/moe-w3-$q.err" \
                 || { rc=1; tail -20 "$OUT/moe-w3-$q.err"; }
             done ;;
    s30-tests) $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_w4_gemv_half2.py \
               tests/test_moe_quantized_cuda.py -k "half2 or awq" 2>&1 | tee "$OUT/s30-tests.log" | tail -25
               $PY -m pytest -q -p no:cacheprovider tests/test_quant_gpu.py -k "gemv or gguf_kept" 2>&1 \
               | tee "$OUT/s30-quant-tests.log" | tail -8 ;;
    s31-tests) $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_spec_eagle.py \
               tests/test_spec_eagle3.py tests/test_spec_decode.py tests/test_models_moe_more.py 2>&1 \
               | tee "$OUT/s31-tests.log" | tail -15
               $PY -m pytest -q -p no:cacheprovider tests/test_quant_gpu.py -k "every_config or graph or gguf_kept" \
               2>&1 | tee "$OUT/s31-quant-tests.log" | tail -8 ;;
    gpu-files) $PY -m pytest -q -p no:cacheprovider -m gpu ${PYTEST_FILES:?PYTEST_FILES names the test files} \
               2>&1 | tee "$OUT/gpu-files.log" | tail -15 ;;
    s26-tests) $PY -m pytest -q -p no:cacheprovider tests/test_gpu_features.py \
               tests/test_reasoning_structured.py 2>&1 | tee "$OUT/s26-tests.log" | tail -8 ;;
    s20-tests) $PY -m pytest -q -p no:cacheprovider tests/test_quant_tools_gpu.py \
               tests/test_tensor_parallel_gpu.py 2>&1 | tee "$OUT/s20_tests.log" | tail -15 || rc=1 ;;
    pw-tests) $PY -m pytest -q -p no:cacheprovider tests/test_gpu_piecewise.py 2>&1 \
               | tee "$OUT/pw_tests.log" | tail -15 || rc=1 ;;
    launch-cost) $PY bench/gpu/launch_cost.py | tee "$OUT/launch_cost.jsonl" || rc=1 ;;
    decode-ragged) $PY bench/gpu/kernel_bench.py decode-ragged | tee "$OUT/decode_ragged.jsonl" || rc=1 ;;
    prefill-prof) $PY bench/gpu/host_profile.py $COMMON --max-num-seqs 8 --w3-prefill 1024 --steps 10 \
               > "$OUT/prefill_prof.txt" 2>"$OUT/prefillprof.err" || { rc=1; tail -20 "$OUT/prefillprof.err"; }
             tail -1 "$OUT/prefill_prof.txt" ;;
    decode-sweep) $PY bench/gpu/kernel_bench.py decode-sweep | tee "$OUT/decode_sweep.jsonl" \
               | grep -E 'best|^#' || rc=1 ;;
    w3-nofuse) MODELPORT_FUSED_DECODE=0 $PY -m modelport.bench.latency $COMMON --max-num-seqs 8 \
               --batch-size 1 --input-len 1024 --output-len 128 --num-iters 5 \
               --output-json "$OUT/w3.jsonl" 2>"$OUT/w3n.err" || { rc=1; tail -20 "$OUT/w3n.err"; } ;;
    w3-env)  for v in ${W3_ENVS:-MODELPORT_PDL=1}; do  # one W3 run per comma-joined VAR=VAL list
               echo "--- $v"
               env ${v//,/ } $PY -m modelport.bench.latency $COMMON --max-num-seqs 8 ${W3_EXTRA:-} \
                 --batch-size 1 --input-len 1024 --output-len 128 --num-iters 5 \
                 --output-json "$OUT/w3_env.jsonl" 2>"$OUT/w3v.err" || { rc=1; tail -20 "$OUT/w3v.err"; }
               tail -1 "$OUT/w3_env.jsonl" | python3 -c 'import json,sys; d=json.load(sys.stdin); r=d["runs"][0]; fs=sorted(r.get("first_step_ms_all") or [0]); print(d["env"].get("knobs"), "ITL", r["itl_ms"], r["itl_ms_all"], "TTFT", r["ttft_ms"], r.get("ttft_ms_all"), "first-step host ms", fs[len(fs)//2])'
             done ;;
    w1-env)  for v in ${W1_ENVS:-MODELPORT_PDL=1}; do  # one W1 run per comma-joined VAR=VAL list
               echo "--- $v"
               env ${v//,/ } $PY -m modelport.bench.throughput $COMMON --num-prompts 256 ${W1_EXTRA:-} \
                 --max-num-seqs 256 --max-num-batched-tokens ${W1_BUDGET:-2048} \
                 --output-json "$OUT/w1_env.jsonl" 2>"$OUT/w1v.err" || { rc=1; tail -20 "$OUT/w1v.err"; }
               tail -1 "$OUT/w1_env.jsonl" | python3 -c 'import json,sys; d=json.load(sys.stdin); r=d["runs"][0]; print(d["env"].get("knobs"), r["output_tok_s"], "tok/s", r["seconds"], "s admission", r["admission_phase"], "decode", r["decode_phase"], "startup", r["startup_s"])'
             done ;;
    tp2)     $PY -m pytest -q -m gpu tests/test_tensor_parallel_gpu.py 2>&1 | tee "$OUT/tp2-tests.log" | tail -5
             [ "${PIPESTATUS[0]}" = 0 ] || rc=1
             $PY -m modelport.bench.latency $COMMON --max-num-seqs 8 --tensor-parallel-size 2 \
               --batch-size 1 --input-len 1024 --output-len 128 --num-iters 3 \
               --output-json "$OUT/w3-tp2.jsonl" 2>"$OUT/w3-tp2.err" || { rc=1; tail -20 "$OUT/w3-tp2.err"; } ;;
    w2)      W2_SEQS=${W2_SEQS-256}  # W2_SEQS= (empty): the server's default max_num_seqs
             $PY bench/gpu/w2_serve.py --out "$OUT" --rates ${W2_RATES:-inf 16} \
               -- --dtype bfloat16 ${W2_SEQS:+--max-num-seqs $W2_SEQS} ${W2_EXTRA:-} \
               || { rc=1; tail -30 "$OUT/w2-server.log"; } ;;
    w3-eager) $PY -m modelport.bench.latency $COMMON --max-num-seqs 8 --enforce-eager \
               --batch-size 1 --input-len 1024 --output-len 128 --num-iters 3 \
               --output-json "$OUT/w3.jsonl" 2>"$OUT/w3e.err" || { rc=1; tail -20 "$OUT/w3e.err"; } ;;
    w1)      $PY -m modelport.bench.throughput $COMMON --num-prompts 256 \
               --max-num-seqs 256 --max-num-batched-tokens ${W1_BUDGET:-2048} --profile-steps 20 \
               --output-json "$OUT/w1.jsonl" 2>"$OUT/w1.err" || { rc=1; tail -20 "$OUT/w1.err"; } ;;
    hf-w3)   $PY -m modelport.bench.latency $COMMON --backend hf \
               --batch-size 1 --input-len 1024 --output-len 128 --num-iters 3 --num-iters-warmup 1 \
               --output-json "$OUT/w3.jsonl" 2>"$OUT/hfw3.err" || { rc=1; tail -20 "$OUT/hfw3.err"; } ;;
    hf-w1)   $PY -m modelport.bench.throughput $COMMON --backend hf --hf-mode continuous \
               --num-prompts 256 --output-json "$OUT/w1.jsonl" 2>"$OUT/hfw1.err" || { rc=1; tail -20 "$OUT/hfw1.err"; } ;;
    *) echo "unknown stage $s"; rc=2 ;;
  esac
done
echo "=== done $(date -u +%T) rc=$rc"
exit $rc
