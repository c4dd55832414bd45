"""EngineArgs: the user-facing knobs (vLLM's names), resolved into a frozen EngineConfig."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import re
from dataclasses import dataclass
from typing import Any

from modelport.argtypes import parse_json_dict  # noqa: F401 - where the CLIs import it
from modelport.config import (
    DEFAULT_MAX_GRAPH_BATCH,
    CacheConfig,
    LoadConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    cpu_kv_cache_space,
    default_max_num_batched_tokens,
    is_large_gpu,
)
from modelport.engine.gpu_info import total_memory_and_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    model_source: Any  # modelport.loader.ModelSource
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    load_config: LoadConfig
    device: str  # "cpu" | "cuda" | "cuda:N"
    dtype: str  # resolved torch dtype name, e.g. "float32", "bfloat16"
    enforce_eager: bool
    seed: int
    served_model_name: str
    # prepare step N+1 on the host while the device runs step N (see engine/core.py)
    async_scheduling: bool = False
    speculative_config: SpeculativeConfig | None = None
    max_logprobs: int = 20
    # "generate", or "pooling": an embedding model (vLLM's --runner pooling / --convert embed)
    runner_type: str = "generate"
    pooler_config: Any = None  # modelport.pooling_params.PoolerConfig when pooling
    # structured outputs with a reasoning model (vLLM's --reasoning-parser): the grammar
    # constrains only the answer after the reasoning, unless enable_in_reasoning
    reasoning_parser: str | None = None
    enable_in_reasoning: bool = False
    # vLLM's structured_outputs_config.disable_any_whitespace: every request's JSON
    # constraint allows no free whitespace (a request may also ask for it alone)
    disable_any_whitespace: bool = False
    # multi-LoRA (vLLM's --enable-lora): modelport.lora.config.LoRAConfig, None when off
    lora_config: Any = None
    # sampling defaults from the generation config (vLLM's get_diff_sampling_param:
    # temperature, top_p, top_k, min_p, repetition_penalty, max_tokens); {} when none
    default_sampling_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    # vLLM's disable_sliding_window: model_config has no window already; the runner turns a
    # draft model's off as well
    disable_sliding_window: bool = False
    # vLLM's sleep mode: sleep(level) gives the KV cache (and the weights) back between
    # generation phases, wake_up restores them (runner/sleep.py)
    enable_sleep_mode: bool = False
    # custom logits processor classes (modelport/logits_processor.py), built by the runner
    logits_processors: tuple[type, ...] = ()
    # decode batches up to this size (and max_num_seqs, max_num_batched_tokens) replay CUDA
    # graphs; wider ones run eagerly
    max_graph_batch: int = DEFAULT_MAX_GRAPH_BATCH
    # set in the core process before it touches CUDA (EngineArgs.cuda_visible_devices)
    cuda_visible_devices: str | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.90
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    # vLLM's flag: 1 (the default) is accepted, more is refused with the alternatives
    pipeline_parallel_size: int = 1
    # replicas of the whole engine behind one server (`modelport serve` only)
    data_parallel_size: int = 1
    # MoE models under tensor parallelism: each rank keeps a share of the experts, whole
    enable_expert_parallel: bool = False
    load_format: str = "auto"
    # 256 on every device: vLLM's 1,024 on GPUs of 70 GiB or more measured slower here (W2 on
    # an H200: 3,402 vs 3,770 output tok/s, TPOT 140 vs 57 ms; bench/README.md, session 37)
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    # vLLM's cuda_graph_sizes: one value, the largest decode batch captured in a CUDA graph
    # (None: 512); a ladder of its own is refused (the graphs use a fixed one)
    cuda_graph_sizes: list[int] | None = None
    # vLLM's usage context, which picks the default budgets (config's tables): "offline"
    # (LLM(...), the benchmarks) or "server"
    usage_context: str = "server"
    # vLLM's flag: None / True chunk long prompts (the default); False runs each prompt whole
    enable_chunked_prefill: bool | None = None
    block_size: int = 16
    seed: int | None = 0  # None: a random seed
    quantization: str | None = None
    served_model_name: str | None = None
    device: str = "auto"
    kv_cache_dtype: str = "auto"
    max_waiting_requests: int | None = None
    # vLLM's: "fcfs" (priority must be 0) or "priority" (lower priority value first)
    scheduling_policy: str = "fcfs"
    # None: on for a single CUDA device, where the host work overlaps the GPU's
    async_scheduling: bool | None = None
    # vLLM's dict, e.g. {"method": "ngram", "num_speculative_tokens": 4}
    speculative_config: dict[str, Any] | None = None
    # most logprobs a request may ask for (sample or prompt), as vLLM's
    max_logprobs: int = 20
    # vLLM's flag; no model code is ever loaded from a checkpoint here, so it changes nothing
    trust_remote_code: bool = False
    # vLLM's: config.json keys replaced, e.g. {"architectures": ["BgeM3EmbeddingModel"]}
    hf_overrides: dict[str, Any] | None = None
    # vLLM's: sampling defaults from "auto" (the model folder's generation_config.json),
    # "vllm" (none) or a folder's; override_generation_config is merged over them
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None
    # pooling (embedding) models, vLLM's names: runner auto | generate | pooling, convert
    # auto | none | embed, the older task generate | embed, and the pooler's settings
    runner: str = "auto"
    convert: str = "auto"
    task: str | None = None
    pooler_config: dict[str, Any] | None = None
    override_pooler_config: dict[str, Any] | None = None
    # vLLM's: the reasoning parser whose end of thinking starts a request's grammar (the
    # OpenAI server's --reasoning-parser reaches the engine through this)
    reasoning_parser: str | None = None
    # vLLM's StructuredOutputsConfig as a dict: reasoning_parser, enable_in_reasoning (the
    # grammar constrains the reasoning too), backend (auto | xgrammar)
    structured_outputs_config: dict[str, Any] | None = None
    # vLLM's multi-LoRA serving: requests may name a PEFT adapter (LoRARequest)
    enable_lora: bool = False
    # vLLM's: LLM.sleep / wake_up (and the server's /sleep, /wake_up, /is_sleeping)
    enable_sleep_mode: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # vLLM's: this many KV cache blocks, in place of what the memory budget gives
    num_gpu_blocks_override: int | None = None
    # vLLM's: every layer attends to the whole sequence; max_model_len is capped to the
    # model's sliding window (so the output is the windowed model's)
    disable_sliding_window: bool = False
    # vLLM V1's chunked-prefill knobs: a request gets at most long_prefill_token_threshold
    # new tokens a step (0: no cap; with max_num_partial_prefills > 1 it defaults to 4 % of
    # max_model_len), so that several prompts prefill side by side in one step's budget
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1
    long_prefill_token_threshold: int = 0
    # vLLM's: custom logits processors, as classes or fully-qualified names
    # ("pkg.mod:Class" / "pkg.mod.Class"); see modelport/logits_processor.py
    logits_processors: list[str | type] | None = None
    # the engine core's (and its tensor-parallel ranks') CUDA_VISIBLE_DEVICES, e.g. "2,5":
    # Triton's vllm backend's GPU_DEVICE_IDS pins a model's engine to those GPUs; None keeps
    # the server's
    cuda_visible_devices: str | None = None

    # -- command line --------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineArgs()
        g = parser.add_argument_group("engine")
        g.add_argument("--model", default=None,
                       help="local HF folder (config.json + safetensors), a .gguf file, or a name in "
                            "the local HF cache; default: the embedded SmolLM2-135M-Instruct")
        g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        g.add_argument("--dtype", default=d.dtype,
                       choices=["auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16", "fp32"])
        g.add_argument("--max-model-len", type=parse_human_int, default=None,
                       help="context length in tokens; as vLLM's also 1k / 25.6k (powers of "
                            "1000) or 1K / 32K (powers of 1024)")
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        g.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", type=_parse_bytes,
                       default=None, dest="kv_cache_memory",
                       help="bytes for the KV cache (e.g. 1073741824, 512MiB, 2GiB); CPU default "
                            "1 GiB; on CUDA it replaces --gpu-memory-utilization's share")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=d.enable_prefix_caching)
        g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
        g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        g.add_argument("--enable-expert-parallel", "-ep", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="MoE models: the tensor-parallel ranks share out the experts, "
                            "whole (tensor-parallel-size must divide their number), instead "
                            "of each rank holding a slice of every expert")
        g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                       help="1 only: pipeline parallelism is not implemented (split a model "
                            "with --tensor-parallel-size, replicate it with "
                            "--data-parallel-size)")
        g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                       help="replicas of the engine (each on its own GPUs: cuda:0.., then the "
                            "next tensor-parallel-size GPUs; on a CPU each gets its share of "
                            "the cores) behind one server; a request goes to the replica with "
                            "the fewest in flight")
        g.add_argument("--load-format", default=d.load_format,
                       metavar="{auto,safetensors,gguf,dummy}",
                       help="how the weights are read (dummy: random, for benchmarks); "
                            "vLLM's bitsandbytes is --quantization bitsandbytes, its other "
                            "formats (pt, npcache, tensorizer, ...) are refused")
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                       help="sequences a step may run (default 256 on every device; vLLM's "
                            "1024 on large GPUs measured slower here)")
        g.add_argument("--max-num-batched-tokens", type=parse_human_int, default=None,
                       help="tokens a step may run (default, as vLLM: 8192 served and 16384 "
                            "offline on GPUs of 70 GiB or more other than the A100, 2048 "
                            "served and 8192 offline on other GPUs, 512 on a CPU)")
        g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="chunk long prompts over steps (default: on); "
                            "--no-enable-chunked-prefill runs each prompt whole, the step "
                            "budget at least --max-model-len")
        g.add_argument("--block-size", type=int, default=d.block_size)
        g.add_argument("--seed", type=int, default=d.seed)
        g.add_argument("--quantization", "-q", default=None,
                       help="awq | gptq | fp8 | bitsandbytes | gguf | compressed-tensors | none "
                       "(default: what the checkpoint declares; compressed-tensors: the "
                       "checkpoint's own compressed-tensors config; a Q4 GGUF file stays "
                       "quantized on an AVX2 CPU; none loads a GGUF file as floats)")
        g.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
        g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype,
                       help="auto (the model's dtype) | fp8 (= fp8_e4m3, scale 1.0) | "
                            "bfloat16 | float16 | float32")
        g.add_argument("--max-waiting-requests", type=int, default=None,
                       help="bound on queued requests; past it requests get 503")
        g.add_argument("--scheduling-policy", default=d.scheduling_policy,
                       choices=["fcfs", "priority"],
                       help="fcfs (default): first come, first served, a request's priority "
                            "must be 0; priority: waiting requests are admitted by (priority, "
                            "arrival), lower values first, and a running request short of KV "
                            "blocks preempts the running one with the largest (priority, "
                            "arrival), which is recomputed later")
        g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                       help="prepare step N+1 while the device runs step N "
                            "(default: on for one CUDA device)")
        g.add_argument("--speculative-config", type=parse_json_dict, default=None,
                       help='speculative decoding, e.g. \'{"method": "ngram", '
                            '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}\' '
                            "(n-gram prompt lookup: drafts from the request's own text, no draft "
                            "model)")
        g.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                       help="most logprobs (and prompt_logprobs) one request may ask for; "
                            "-1: no cap (requests may ask for -1, the whole vocabulary)")
        g.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="accepted for vLLM command lines; no effect (no model code is "
                            "loaded from checkpoints: the architectures are built in)")
        g.add_argument("--runner", default=d.runner, choices=["auto", "generate", "pooling"],
                       help="pooling: serve the model as an embedding model (/v1/embeddings; "
                            "LAST-token pooling, L2-normalized), or a *ForSequenceClassification "
                            "checkpoint as a classifier (/classify, /score, /rerank)")
        g.add_argument("--convert", default=d.convert,
                       choices=["auto", "none", "embed", "classify"],
                       help="embed: adapt the generative model into an embedding model; "
                            "classify: a *ForSequenceClassification checkpoint's head")
        g.add_argument("--task", default=None,
                       help="vLLM's older flag: generate | embed | classify | score "
                            "(all but generate = --runner pooling)")
        g.add_argument("--hf-overrides", type=parse_json_dict, default=None,
                       help='config.json keys to replace, e.g. \'{"architectures": '
                            '["BgeM3EmbeddingModel"]}\'')
        g.add_argument("--generation-config", default=d.generation_config,
                       metavar="auto|vllm|FOLDER",
                       help="sampling defaults for what a request leaves out: auto (default) "
                            "takes temperature, top_p, top_k, min_p, repetition_penalty and "
                            "max_new_tokens (the default max_tokens) from the model folder's "
                            "generation_config.json; vllm: none (temperature 1, ...); a folder: "
                            "its generation_config.json")
        g.add_argument("--override-generation-config", type=parse_json_dict, default=None,
                       metavar="JSON",
                       help='sampling defaults merged over the generation config\'s, e.g. '
                            '\'{"temperature": 0.5}\'')
        g.add_argument("--pooler-config", type=parse_json_dict, default=None,
                       help='pooling settings, e.g. \'{"pooling_type": "MEAN", "normalize": '
                            'true}\' (pooling_type LAST | MEAN | CLS)')
        g.add_argument("--override-pooler-config", type=parse_json_dict, default=None,
                       help="older name of --pooler-config")
        g.add_argument("--structured-outputs-config", type=parse_json_dict, default=None,
                       help='structured outputs settings, e.g. \'{"enable_in_reasoning": '
                            "true}' (with --reasoning-parser, constrain the thinking too; "
                            "by default the grammar starts after </think>, as vLLM's); keys: "
                            "backend (auto / xgrammar), reasoning_parser, enable_in_reasoning, "
                            "disable_any_whitespace (JSON without free whitespace), and "
                            "disable_fallback / disable_additional_properties (accepted: "
                            "xgrammar alone, no fallback)")
        g.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=False,
                       help="serve LoRA adapters (PEFT folders) beside the base model")
        g.add_argument("--max-loras", type=int, default=d.max_loras,
                       help="most adapters in one batch (default 1)")
        g.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank,
                       help="largest adapter rank served (default 16)")
        g.add_argument("--max-cpu-loras", type=int, default=None,
                       help="adapters kept loaded on the host (default: --max-loras)")
        g.add_argument("--disable-sliding-window", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="turn sliding-window attention off on every layer and cap "
                            "--max-model-len to the model's (smallest) window, as vLLM does; "
                            "within that length the output is the windowed model's")
        g.add_argument("--max-num-partial-prefills", type=int,
                       default=d.max_num_partial_prefills,
                       help="as vLLM V1: above 1, --long-prefill-token-threshold defaults to "
                            "4%% of --max-model-len, so a long prompt takes at most that many "
                            "tokens a step and others prefill beside it")
        g.add_argument("--max-long-partial-prefills", type=int,
                       default=d.max_long_partial_prefills,
                       help="at most --max-num-partial-prefills; checked and otherwise unused, "
                            "as by vLLM V1's scheduler")
        g.add_argument("--long-prefill-token-threshold", type=int,
                       default=d.long_prefill_token_threshold,
                       help="most new tokens a request gets in one step (0: no cap); a longer "
                            "prompt prefills in chunks of this size, leaving the rest of the "
                            "step's budget to other requests")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    # -- resolution ----------------------------------------------------------------------
    def _max_graph_batch(self) -> int:
        sizes = self.cuda_graph_sizes
        if sizes is None:
            return DEFAULT_MAX_GRAPH_BATCH
        if len(sizes) != 1 or sizes[0] < 1:
            raise ValueError(
                f"cuda_graph_sizes {list(sizes)}: give one size, the largest decode batch to "
                "capture (the CUDA graphs cover 1, 2, 4, 8, 16, 32, ... up to it); a ladder of "
                "your own is not supported; enforce_eager=True turns the graphs off")
        return sizes[0]

    def create_engine_config(self) -> EngineConfig:
        import torch

        if self.pipeline_parallel_size != 1:  # before the model is read: nothing else matters
            raise ValueError(
                f"pipeline_parallel_size {self.pipeline_parallel_size}: pipeline parallelism "
                "is not implemented in modelport; split the model's layers over GPUs with "
                "tensor_parallel_size (--tensor-parallel-size) instead, and run replicas with "
                "--data-parallel-size"
            )

        from modelport.loader import load_model_config, resolve_dtype, resolve_model

        src = resolve_model(self.model)
        model_config = load_model_config(src)
        from modelport.models.bge_m3_config import apply_hf_overrides, select_bge_m3, token_tasks

        model_dir = src.path if src.kind == "hf" else None
        model_config = select_bge_m3(apply_hf_overrides(model_config, self.hf_overrides),
                                     model_dir)
        if {"rope_scaling", "rope_theta", "rope_parameters"} & set(self.hf_overrides or {}):
            _check_rope_override(model_config)
        from modelport.models.moe_config import check_moe_options

        # MoE models: tp must divide the intermediate sizes, no LoRA (a ValueError naming
        # the option); quantized ones: whole groups per rank, below
        if self.enable_expert_parallel and self.data_parallel_size > 1:
            raise ValueError(
                "enable_expert_parallel with data_parallel_size > 1: modelport's data-parallel "
                "replicas are independent engines and do not exchange tokens between MoE "
                "layers; shard the experts over one replica's GPUs with tensor_parallel_size "
                "and enable_expert_parallel, or replicate with data_parallel_size alone")
        check_moe_options(model_config, tensor_parallel_size=self.tensor_parallel_size,
                          quantization=self.quantization, enable_lora=self.enable_lora,
                          expert_parallel=self.enable_expert_parallel)
        from modelport.models.encoder_config import encoder_settings

        # a BERT-family encoder: its real length, its sentence-transformers pooling
        encoder = encoder_settings(src.path if src.kind == "hf" else None,
                                   model_config.hf_config)
        if encoder is not None and self.tensor_parallel_size != 1:
            raise ValueError(f"{model_config.architecture}: tensor_parallel_size > 1 is not "
                             "supported for encoder models")
        if encoder is not None and (self.quantization is not None
                                    or model_config.hf_config.get("quantization_config")):
            raise ValueError(f"{model_config.architecture}: quantization is not supported for "
                             "encoder models (they run in the checkpoint's float dtype)")
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        parallel = ParallelConfig(self.tensor_parallel_size, self.data_parallel_size,
                                  enable_expert_parallel=self.enable_expert_parallel)
        tp = parallel.tensor_parallel_size
        if tp != 1:
            for what, n in (("num_attention_heads", model_config.num_attention_heads),
                            ("num_key_value_heads", model_config.num_key_value_heads)):
                if n % tp:
                    raise ValueError(f"tensor_parallel_size {tp} must divide {what} ({n})")
            from modelport.models.registry import get_model_class

            refusal = getattr(get_model_class(model_config.architecture),
                              "tensor_parallel_refusal", None)  # e.g. models/olmo2.py
            if refusal:
                raise ValueError(refusal)
        if device.startswith("cuda") and parallel.world_size > 1:
            first = torch.device(device).index or 0
            if torch.cuda.device_count() < first + parallel.world_size:
                raise ValueError(
                    f"tensor_parallel_size {tp} x data_parallel_size "
                    f"{parallel.data_parallel_size} needs {parallel.world_size} GPUs from "
                    f"cuda:{first}; {torch.cuda.device_count()} visible"
                )
        if self.quantization is not None or model_config.hf_config.get("quantization_config"):
            from modelport.quantization.loading import resolve_quantization

            # fail here, before the engine starts, with the format's own message
            plan = resolve_quantization(self.quantization, src, model_config, device,
                                        self.load_format)
            if plan is not None and tp != 1:  # MoE experts: whole groups per rank
                from modelport.models.moe_config import moe_quant_tp_refusal

                why = moe_quant_tp_refusal(model_config, tp, _group_size(plan), plan.name,
                                           self.enable_expert_parallel)
                if why:
                    raise ValueError(f"{model_config.architecture}: {why}")
        spec = (SpeculativeConfig.from_dict(self.speculative_config)
                if self.speculative_config is not None else None)
        if self.max_logprobs < -1:  # -1: no cap (vLLM), requests may ask for -1 (all)
            raise ValueError(f"max_logprobs must be non-negative or -1, got {self.max_logprobs}")
        runner_type, pooler, pooling_kw = self._resolve_pooling(model_config, spec, encoder)
        if pooler is not None and model_config.architecture == "BgeM3EmbeddingModel":
            # its heads replace the plain per-token tasks (dummy weights: no head files read)
            pooler = dataclasses.replace(pooler, token_tasks=token_tasks(model_dir)
                                         if self.load_format != "dummy" else ())
        lora = self._resolve_lora(runner_type)
        sampling_defaults: dict[str, Any] = {}
        if runner_type == "generate":
            from modelport.engine.generation_config import default_sampling_params

            sampling_defaults = default_sampling_params(src, self.generation_config,
                                                        self.override_generation_config)
        reasoning_parser, in_reasoning = self._resolve_structured_outputs()
        logits_processors = self._resolve_logits_processors(runner_type, spec)
        seed = self.seed
        if seed is None:  # as vLLM: no seed, a different run each time
            seed = random.SystemRandom().randrange(2**31)
        dtype = resolve_dtype(self.dtype, model_config, torch.device(device))
        max_len = _max_model_len(model_config, self.max_model_len)
        if self.usage_context not in ("offline", "server"):
            raise ValueError(f"usage_context must be 'offline' or 'server', got {self.usage_context!r}")
        batched = self.max_num_batched_tokens
        if batched is None:
            on_cuda = device.startswith("cuda")
            # the GPU the core will see: an instance's own (cuda_visible_devices) or ours
            gpu = total_memory_and_name(device, self.cuda_visible_devices) if on_cuda else None
            batched = default_max_num_batched_tokens(
                on_cuda, offline=self.usage_context == "offline",
                large_gpu=gpu is not None and is_large_gpu(*gpu))
            if on_cuda:
                logger.info("max_num_batched_tokens %d (the %s default on %s)", batched,
                            self.usage_context,
                            f"{gpu[1]}, {gpu[0] / 2**30:.1f} GiB" if gpu else "an unknown GPU")
        max_graph_batch = self._max_graph_batch()
        if encoder is not None:  # one whole prompt per step: no chunks (vLLM does the same)
            if self.max_model_len is not None and self.max_model_len > encoder.max_positions:
                raise ValueError(f"max_model_len ({self.max_model_len}) is larger than the "
                                 f"encoder's {encoder.max_positions} positions")
            max_len = self.max_model_len or encoder.max_len
            if self.max_num_batched_tokens is None:
                batched = max(batched, max_len)
            elif batched < max_len:
                raise ValueError(f"max_num_batched_tokens ({batched}) must be >= max_model_len "
                                 f"({max_len}) for an encoder model: it runs each prompt "
                                 "whole (no chunked prefill)")
        if self.disable_sliding_window:
            model_config, max_len = self._without_sliding_window(model_config, max_len, spec)
        if spec is not None and spec.model is not None:  # at the length the engine will have
            if self.max_model_len is None:
                max_len = _default_len_within_draft(spec, max_len)
            _check_draft_model(spec, model_config, self.tensor_parallel_size, max_len)
        chunked = encoder is None and self.enable_chunked_prefill is not False
        if not chunked and self.max_num_batched_tokens is None:  # vLLM's default then
            batched = max(batched, max_len)
        # the model sees the engine's length (LongRoPE picks its factors by it: longrope.py)
        model_config = dataclasses.replace(model_config, max_model_len=max_len)
        kv_memory = self.kv_cache_memory
        if kv_memory is None and device == "cpu":  # vLLM's VLLM_CPU_KVCACHE_SPACE (GiB)
            kv_memory = cpu_kv_cache_space()
        cache = CacheConfig(
            block_size=self.block_size,
            kv_cache_memory=kv_memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=pooling_kw.get("enable_prefix_caching",
                                                 self.enable_prefix_caching),
            kv_cache_dtype=self.kv_cache_dtype,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
        )
        sched = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=batched,
            max_model_len=max_len,
            max_waiting_requests=self.max_waiting_requests,
            enable_chunked_prefill=chunked,
            policy=self.scheduling_policy,
            long_prefill_token_threshold=self._long_prefill_token_threshold(max_len),
        )
        return EngineConfig(
            model_source=src,
            model_config=model_config,
            cache_config=cache,
            scheduler_config=sched,
            parallel_config=parallel,
            load_config=LoadConfig(load_format=self.load_format, quantization=self.quantization,
                                   seed=seed),
            device=device,
            dtype=str(dtype).removeprefix("torch."),
            enforce_eager=pooling_kw.get("enforce_eager", self.enforce_eager),
            max_graph_batch=max_graph_batch,
            seed=seed,
            served_model_name=self.served_model_name or src.name,
            async_scheduling=pooling_kw.get(
                "async_scheduling",
                # custom logits processors read each request's output ids: with async
                # scheduling those would lag the step in flight by one token
                device.startswith("cuda") and self.tensor_parallel_size == 1
                and not logits_processors
                if self.async_scheduling is None else self.async_scheduling),
            speculative_config=spec,
            max_logprobs=self.max_logprobs,
            runner_type=runner_type,
            pooler_config=pooler,
            reasoning_parser=reasoning_parser,
            enable_in_reasoning=in_reasoning,
            disable_any_whitespace=bool((self.structured_outputs_config or {}).get(
                "disable_any_whitespace", False)),
            lora_config=lora,
            default_sampling_params=sampling_defaults,
            disable_sliding_window=self.disable_sliding_window,
            enable_sleep_mode=self.enable_sleep_mode,
            logits_processors=logits_processors,
            cuda_visible_devices=self.cuda_visible_devices,
        )

    def _resolve_logits_processors(self, runner_type: str, spec: Any) -> tuple[type, ...]:
        """The processor classes (a ValueError for an unknown name or a non-processor), at
        start-up, refused where they cannot run (vLLM refuses the same two)."""
        if not self.logits_processors:
            return ()
        from modelport.logits_processor import load_logits_processors

        classes = load_logits_processors(self.logits_processors)
        if runner_type != "generate":
            raise ValueError("custom logits processors (logits_processors) are not supported "
                             "for pooling models: they sample nothing")
        if spec is not None:
            raise ValueError("custom logits processors (logits_processors) are not supported "
                             "with speculative decoding: drafts are verified against the "
                             "model's own logits; drop speculative_config to use them")
        if self.async_scheduling:
            logger.warning("async scheduling with custom logits processors: a request's "
                           "output_tok_ids may lack the token of the step still running")
        return classes

    def _resolve_lora(self, runner_type: str) -> Any:
        if not self.enable_lora:
            return None
        from modelport.lora.config import LoRAConfig

        if runner_type != "generate":
            raise ValueError("enable_lora is not supported yet for pooling models")
        return LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                          max_cpu_loras=self.max_cpu_loras)

    def _long_prefill_token_threshold(self, max_len: int) -> int:
        """vLLM's checks of the partial-prefill flags, and the per-step cap they give (V1's
        scheduler uses only the threshold; more partial prefills default it to 4 % of
        max_model_len)."""
        if self.max_num_partial_prefills < 1:
            raise ValueError("max_num_partial_prefills must be >= 1, got "
                             f"{self.max_num_partial_prefills}")
        if not 1 <= self.max_long_partial_prefills <= self.max_num_partial_prefills:
            raise ValueError(f"max_long_partial_prefills ({self.max_long_partial_prefills}) "
                             "must be >= 1 and at most max_num_partial_prefills "
                             f"({self.max_num_partial_prefills})")
        threshold = self.long_prefill_token_threshold
        if threshold < 0 or threshold > max_len:
            raise ValueError(f"long_prefill_token_threshold ({threshold}) must be >= 0 and "
                             f"at most max_model_len ({max_len})")
        if self.max_num_partial_prefills > 1 and threshold == 0:
            threshold = int(max_len * 0.04)
        return threshold

    def _without_sliding_window(self, model_config: ModelConfig, max_len: int,
                                spec: SpeculativeConfig | None) -> tuple[ModelConfig, int]:
        """vLLM's disable_sliding_window: no layer slides, and max_model_len is at most the
        window (a given larger one is an error), within which full attention sees what the
        window did. A draft model follows the same setting (vLLM gives its draft config the
        target's disable_sliding_window; the runner turns its window off): its window caps
        max_model_len too, as the draft proposes at every length here."""
        from modelport.models.sliding import model_window, without_sliding_window

        windows = [("the model's", "the", model_window(model_config))]
        if spec is not None and spec.method == "draft_model":
            windows.append(("the draft model's", "the draft model's",
                            model_window(_draft_source(spec)[1])))
        for whose, to, window in windows:
            if window is None:
                continue
            if self.max_model_len is not None and self.max_model_len > window:
                raise ValueError(
                    f"max_model_len ({self.max_model_len}) is larger than {whose} sliding "
                    f"window ({window}): with disable_sliding_window the context is at most "
                    "the window; lower max_model_len or keep the window")
            if max_len > window:
                logger.info("disable_sliding_window: max_model_len capped to %s %d-token "
                            "sliding window (was %d)", to, window, max_len)
                max_len = window
        return without_sliding_window(model_config), max_len

    def _resolve_structured_outputs(self) -> tuple[str | None, bool]:
        """(reasoning parser, enable_in_reasoning) from reasoning_parser and
        structured_outputs_config (vLLM's keys; a parser given in both must agree)."""
        from modelport.engine.structured_output import REASONING_TAGS

        so = dict(self.structured_outputs_config or {})
        known = {"reasoning_parser", "enable_in_reasoning", "backend", "disable_any_whitespace",
                 # xgrammar alone, no fallback; vLLM applies the other to guidance only
                 "disable_fallback", "disable_additional_properties"}
        unknown = set(so) - known
        if unknown:
            raise ValueError(f"structured_outputs_config: unsupported keys "
                             f"{', '.join(sorted(unknown))} (supported: "
                             f"{', '.join(sorted(known))})")
        for key in known - {"reasoning_parser", "backend"}:
            if not isinstance(so.get(key, False), bool):
                raise ValueError(f"structured_outputs_config.{key} must be a boolean")
        if so.get("backend") not in (None, "auto", "xgrammar"):
            raise ValueError(f"structured_outputs_config.backend {so['backend']!r} is not "
                             "supported: only xgrammar is")
        parser = self.reasoning_parser or so.get("reasoning_parser") or None
        if so.get("reasoning_parser") and parser != so["reasoning_parser"]:
            raise ValueError(f"reasoning_parser {self.reasoning_parser!r} and "
                             f"structured_outputs_config.reasoning_parser "
                             f"{so['reasoning_parser']!r} differ")
        if parser is not None and parser not in REASONING_TAGS:
            raise ValueError(f"unknown reasoning parser {parser!r}; choose from "
                             f"{', '.join(sorted(REASONING_TAGS))}")
        return parser, so.get("enable_in_reasoning", False)

    def _resolve_pooling(self, model_config: ModelConfig, spec: SpeculativeConfig | None,
                         encoder: Any = None) -> tuple[str, Any, dict[str, Any]]:
        """(runner type, PoolerConfig or None, engine settings a pooling runner forces).

        A pooling runner runs eagerly and synchronously (no CUDA graphs, no async
        scheduling: each request is one prefill whose pooled vector is read back at once),
        and, as vLLM, without prefix caching unless it pools the LAST token (MEAN and CLS
        need every prompt token's hidden state computed)."""
        import logging
        from dataclasses import replace

        from modelport.pooling_params import (
            PoolerConfig,
            default_token_tasks,
            resolve_pooling_task,
            resolve_runner,
        )

        runner_type = resolve_runner(self.runner, self.convert, self.task,
                                     model_config.architecture)
        if self.pooler_config is not None and self.override_pooler_config is not None:
            raise ValueError("give pooler_config or override_pooler_config (its older name), "
                             "not both")
        given = self.pooler_config if self.pooler_config is not None else \
            self.override_pooler_config
        if runner_type != "pooling":
            if given is not None:
                raise ValueError("pooler_config is only for pooling models: add "
                                 "runner='pooling' (or convert='embed')")
            return runner_type, None, {}
        if spec is not None:
            raise ValueError("speculative decoding is not supported for pooling models")
        if encoder is not None:  # the checkpoint's pooling (sentence-transformers) by default
            given = encoder.pooler_config(given)
        task = resolve_pooling_task(self.convert, self.task, model_config.architecture)
        pooler = replace(PoolerConfig.from_dict(given), task=task,
                         token_tasks=default_token_tasks(task))
        kw: dict[str, Any] = {"enforce_eager": True, "async_scheduling": False}
        if encoder is not None:  # each prompt runs whole, with no KV cache to share
            kw["enable_prefix_caching"] = False
        elif pooler.pooling_type != "LAST" and self.enable_prefix_caching:
            logging.getLogger(__name__).info(
                "prefix caching off: %s pooling needs every prompt token computed",
                pooler.pooling_type)
            kw["enable_prefix_caching"] = False
        return runner_type, pooler, kw


def _max_model_len(model_config: ModelConfig, given: int | None) -> int:
    """max_model_len as given or the model's default, within what its rotary reaches
    (max_position_embeddings; yarn / dynamic rope scaling reach further: layers/rotary.py).
    A yarn / dynamic config that cannot be built fails here, naming the bad key."""
    from modelport.layers.rotary import default_max_model_len, max_model_len_limit

    limit = max_model_len_limit(model_config)
    if given is None:
        return default_max_model_len(model_config)
    if given > limit:
        max_pos = model_config.max_position_embeddings
        if limit == max_pos:
            raise ValueError(f"max_model_len ({given}) is larger than the model's "
                             f"max_position_embeddings ({max_pos})")
        raise ValueError(f"max_model_len ({given}) is larger than the {limit} positions the "
                         "model's rope scaling reaches (max_position_embeddings "
                         f"{max_pos})")
    return given


def _check_rope_override(model_config: ModelConfig) -> None:
    """A rope scaling type given through hf_overrides (or vLLM's --rope-scaling) that the
    model code cannot build fails here, naming it, rather than when the engine builds it."""
    from modelport.layers.rotary import ROPE_TYPES, rope_settings

    scaling = rope_settings(model_config).scaling
    kind = scaling["rope_type"] if scaling else "default"
    phi3_long = model_config.architecture == "Phi3ForCausalLM" and kind in ("longrope", "su")
    if kind not in ROPE_TYPES and not phi3_long:
        raise ValueError(f"rope scaling type {kind!r} (hf_overrides / --rope-scaling) is not "
                         f"supported; supported: {', '.join(ROPE_TYPES)} (and Phi-3's "
                         "longrope)")


def _draft_source(spec: SpeculativeConfig) -> tuple[Any, ModelConfig]:
    """The draft model's (or EAGLE head's) source and config, its errors as the config's."""
    from modelport.loader import load_model_config, resolve_model

    try:
        src = resolve_model(spec.model)
        return src, load_model_config(src)
    except (OSError, ValueError) as e:
        raise ValueError(f"speculative_config.model {spec.model!r}: {e}") from None


def _check_draft_model(spec: SpeculativeConfig, target: ModelConfig, tp: int, max_len: int) -> None:
    """A draft model (or EAGLE head) must speak the target's vocabulary and reach
    max_model_len; an EAGLE(-3) head must also fit a Llama-family target of its width."""
    what = "an EAGLE head" if spec.method in ("eagle", "eagle3") else "a draft model"
    if tp != 1:
        raise ValueError(f"speculative decoding with {what} needs tensor_parallel_size 1 "
                         "(n-gram speculation works with any)")
    src, draft = _draft_source(spec)
    if spec.method in ("eagle", "eagle3"):
        from modelport.models.eagle_llama import check_eagle_head

        if src.kind != "hf":
            raise ValueError(f"an EAGLE head must be an HF-style folder (config.json and "
                             f"weights), got {src.path}")
        check_eagle_head(draft, target)
        if spec.method == "eagle3":
            from modelport.models.eagle3_llama import check_eagle3_head

            check_eagle3_head(draft, target)
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.vocab_size} tokens) differs from "
                         f"the target's ({target.vocab_size}): they must share one tokenizer")
    reach = _draft_reach(spec, draft)
    if spec.max_model_len is not None:  # vLLM: at most the draft's and the target's length
        if spec.max_model_len > min(reach, max_len):
            raise ValueError(f"speculative_config.max_model_len ({spec.max_model_len}) cannot be "
                             f"larger than the draft's ({reach}) or the "
                             f"target's max_model_len ({max_len})")
        if spec.max_model_len < max_len:
            raise ValueError(f"speculative_config.max_model_len ({spec.max_model_len}) below "
                             f"max_model_len ({max_len}) is not supported: the draft model "
                             "proposes at every length here")
    if reach < max_len:
        raise ValueError(f"the draft model reaches {reach} positions, "
                         f"below max_model_len ({max_len})")


def _draft_reach(spec: SpeculativeConfig, draft: ModelConfig) -> int:
    """The positions a draft model (or EAGLE head) serves: its max_position_embeddings, or
    further where its rope scaling reaches (layers/rotary.py)."""
    from modelport.layers.rotary import max_model_len_limit

    try:
        return max_model_len_limit(draft)
    except ValueError as e:
        raise ValueError(f"speculative_config.model {spec.model!r}: {e}") from None


def _default_len_within_draft(spec: SpeculativeConfig, max_len: int) -> int:
    """A defaulted max_model_len (e.g. a yarn target's original x factor) the draft cannot
    reach is lowered to the draft's reach, logged; a given one stays and is checked."""
    reach = _draft_reach(spec, _draft_source(spec)[1])
    if reach >= max_len:
        return max_len
    logger.info("max_model_len defaults to %d, the positions the draft model reaches (the "
                "target reaches %d; --max-model-len up to the draft's reach)", reach, max_len)
    return reach




_HUMAN = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_human_int(text: str) -> int:
    """An argparse type: a token count as vLLM takes it, 2048, 1k, 25.6k (k / m / g: powers
    of 1000) or 32K (K / M / G: powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 8192, 8k, 25.6k, 32K)")
    num, unit = m.groups()
    if "." in num and unit not in ("k", "m", "g"):  # as vLLM: no 1.5K, no 1.5
        raise argparse.ArgumentTypeError(f"not a whole count: {text!r} (decimals only with "
                                         "k / m / g)")
    from decimal import Decimal

    return int(Decimal(num) * _HUMAN[unit])


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def _parse_bytes(text: str) -> int:
    s = text.strip().lower().replace("_", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1073741824, 512MiB, 2GiB)")
    value = int(float(num) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"byte size must be > 0: {text!r}")
    return value


def _group_size(plan: Any) -> int | None:
    """The quantization group along K that a tensor-parallel rank's slice must respect, as
    known before loading: AWQ / GPTQ / compressed-tensors integer weights from the
    checkpoint's config (-1: per channel); a GGUF file kept in its blocks: the widest
    unpacked group among its down projections' types.
    That is the group (one scale and zero) each type unpacks to, 32 columns (Q4_0 / Q8_0
    blocks, Q4_K / Q5_K sub-blocks) or 16 (Q2_K, Q3_K, Q6_K), not the 256-wide K-quant
    super-block: a rank keeps the blocks its columns overlap and trims them once unpacked."""
    if plan.name == "gguf":
        from modelport.quantization.gguf import group_width
        from modelport.quantization.gguf_types import GGML_TYPES

        types = getattr(plan.config, "tensor_types", None)
        if types is None:  # dummy weights: one type for every layer
            return group_width(plan.config.type_id)
        down = {t for name, t in types.items()
                if t in GGML_TYPES and re.search(r"\.(down_proj|w2)\.weight$", name)}
        return max(map(group_width, down), default=None)
    if plan.name in ("awq", "gptq", "compressed-tensors"):
        g = int(getattr(plan.config, "group_size", -1))
        return g if g > 0 else None
    return None
