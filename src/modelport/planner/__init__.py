"""Capacity planner: sizes weights, KV cache and parallelism before a deploy (`modelport plan`).

    modelport plan --model llama-3.1-8b --gpu h100-80gb --max-model-len 8192 --max-num-seqs 256
    modelport plan --model ./my-model --gpu l4 --num-gpus 2 --kv-cache-dtype fp8 --json
    modelport plan --gpu cpu --memory 16 --kv-cache-memory 512MiB   # the embedded default model

Modules: presets (offline JSON), model_source / gguf_source (what --model names), tensors +
weights + gguf_mix (bytes per tensor in each format), hardware, memory (budget and KV capacity
through modelport.config's accounting, the one the engine allocates with), parallel, roofline,
plan (validated request -> Plan), advisor (warnings, remedies, the serve command), report.
"""
