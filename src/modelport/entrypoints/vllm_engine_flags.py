"""vLLM's engine arguments that are not fields of modelport's EngineArgs, as `serve` flags
and as `LLM(...)` keyword arguments, handled in one place.

Each is one of:
  implemented -- mapped onto a modelport setting (-O 0 is --enforce-eager, --rope-scaling
                 is an hf_overrides key, --max-cudagraph-capture-size is --cuda-graph-sizes);
  accepted    -- modelport already behaves as the value asks, or the value only tunes
                 something modelport does not have (a multimodal cache for text models);
                 the flag's help says which;
  refused     -- at start-up, naming what to use instead, when the value asks for what
                 modelport does not do. A flag at vLLM's default value is never refused.
`ENGINE_REFUSALS` holds the refused ones' accepted values as data; `apply(ns)` maps the
implemented ones onto EngineArgs' fields; `llm_kwargs` does both for `LLM(**kwargs)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("modelport.serve")

_SAME = "accepted: modelport already "  # help text of an accepted no-op
_TEXT = "accepted and unused: modelport serves text-only models (no images, audio or video)"
_KERNEL = ("accepted with a warning: a kernel choice; modelport picks its own kernels "
           "(Triton / torch), whose outputs agree")


# -- argument types ------------------------------------------------------------------------
def json_list(text: str) -> list[Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({e})") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list, e.g. '[\"*\"]', got {text!r}")
    return value


def json_dict(text: str) -> dict[str, Any]:
    from modelport.engine.arg_utils import parse_json_dict

    return parse_json_dict(text)


def mm_limits(text: str) -> dict[str, Any]:
    """--limit-mm-per-prompt: JSON ('{"image": 2}') or vLLM's older 'image=2,video=1'."""
    if text.strip().startswith("{"):
        return json_dict(text)
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected JSON or KEY=N[,KEY=N], got {text!r}")
        out[key.strip()] = int(value)
    return out


def _opt_level(text: str) -> Any:
    """-O / --compilation-config: a level (0-3) or a JSON object."""
    if text.strip().lstrip("-").isdigit():
        return int(text)
    return json_dict(text)


def _optional_str(text: str) -> str | None:
    return None if text in ("", "None") else text


_BOOL = argparse.BooleanOptionalAction  # vLLM's bool flags all have a --no- form


# -- the flags -----------------------------------------------------------------------------
def add_engine_compat_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's engine flags that are not EngineArgs flags; flags already added are kept."""
    g = parser.add_argument_group("vLLM engine compatibility")

    def a(*flags: str, **kw: Any) -> None:
        if not any(f in parser._option_string_actions for f in flags):
            g.add_argument(*flags, **kw)

    # model and loading
    a("--download-dir", default=None,
      help=_SAME + "reads local folders, .gguf files and the HF cache and downloads nothing; "
           "accepted and unused")
    a("--revision", type=_optional_str, default=None,
      help="main (or none): " + _SAME + "serves the cached snapshot refs/main names; others "
           "refused")
    a("--code-revision", default=None,
      help=_SAME + "loads no model code from checkpoints; accepted and unused")
    a("--tokenizer-revision", type=_optional_str, default=None,
      help="main (or none): the tokenizer of --tokenizer / the model's folder; others refused")
    a("--tokenizer-mode", default="auto", choices=["auto", "hf", "slow", "mistral", "custom"],
      help="auto / hf: " + _SAME + "uses the model's (fast) tokenizer; others refused")
    a("--model-impl", default="auto", choices=["auto", "vllm", "transformers", "terratorch"],
      help="auto / vllm: " + _SAME + "runs its built-in implementations; others refused")
    a("--config-format", default="auto", choices=["auto", "hf", "mistral"],
      help="auto / hf: " + _SAME + "reads config.json (or the GGUF metadata); mistral refused")
    a("--hf-config-path", default=None, help="refused: config.json is read from the model")
    a("--hf-token", nargs="?", const=True, default=None, metavar="TOKEN",
      help=_SAME + "downloads nothing, so needs no token; accepted and unused")
    a("--rope-scaling", type=json_dict, default=None, metavar="JSON",
      help="vLLM's older flag: config.json's rope_scaling replaced (as --hf-overrides "
           "'{\"rope_scaling\": ...}')")
    a("--rope-theta", type=float, default=None,
      help="vLLM's older flag: config.json's rope_theta replaced (as --hf-overrides)")
    a("--max-parallel-loading-workers", type=int, default=None,
      help="accepted and ignored, as vLLM V1 does (warned at start-up)")
    a("--safetensors-load-strategy", default=None,
      help="accepted and unused: how vLLM reads safetensors files; the weights are the same")
    a("--ignore-patterns", nargs="+", default=None,
      help=_SAME + "loads only the weights its architectures name from the folder's "
           "safetensors (or the .gguf file); accepted and unused")
    a("--use-tqdm-on-load", action=_BOOL, default=True, help="accepted and unused")
    a("--pt-load-map-location", default=None,
      help=_SAME + "loads no .pt / .bin weights; accepted and unused")
    a("--model-loader-extra-config", type=json_dict, default=None, metavar="JSON",
      help="refused unless empty: no pluggable model loaders here")
    a("--skip-tokenizer-init", action=_BOOL, default=False,
      help="refused: the server detokenizes every output")
    a("--enable-prompt-embeds", action=_BOOL, default=False,
      help="refused: prompts are text or token ids (prompt_embeds get a 400)")
    a("--logprobs-mode", default="raw_logprobs",
      choices=["raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"],
      help="raw_logprobs (vLLM's default): " + _SAME + "returns the log-softmax of the "
           "model's logits before any processing; others refused")
    a("--disable-cascade-attn", action=_BOOL, default=False,
      help=_SAME + "runs no cascade attention; accepted and unused")
    a("--override-attention-dtype", default=None, help="refused: attention runs in --dtype")
    a("--logits-processor-pattern", default=None,
      help="refused: per-request logits processors by name are vLLM V0's; use "
           "--logits-processors")
    a("--io-processor-plugin", default=None, help="refused: no IO processor plugins")
    # memory and scheduling
    a("--swap-space", type=float, default=4,
      help=_SAME + "recomputes preempted requests (as vLLM V1) and swaps nothing to the "
           "host; accepted and unused")
    a("--cpu-offload-gb", type=float, default=0,
      help="0 only: weights are not offloaded to the host (refused otherwise)")
    a("--kv-offloading-size", type=float, default=None,
      help="refused: the KV cache is not offloaded to host memory")
    a("--kv-offloading-backend", default=None,
      help="accepted without --kv-offloading-size (which is refused)")
    a("--calculate-kv-scales", action=_BOOL, default=False,
      help="refused: an fp8 KV cache is written with scale 1.0 (--kv-cache-dtype fp8)")
    a("--kv-sharing-fast-prefill", action=_BOOL, default=False,
      help="refused: no cross-layer KV sharing")
    a("--mamba-cache-dtype", default="auto", help="auto only: no Mamba models here")
    a("--mamba-ssm-cache-dtype", default="auto", help="auto only: no Mamba models here")
    a("--mamba-block-size", type=int, default=None, help="refused: no Mamba models here")
    a("--num-gpu-blocks-override", type=int, default=None,
      help="the number of KV cache blocks, in place of the one the memory budget gives")
    a("--max-seq-len-to-capture", "--max-context-len-to-capture", type=int, default=None,
      help=_SAME + "replays its decode CUDA graphs at every length up to max_model_len; "
           "accepted and unused")
    a("--cuda-graph-sizes", type=int, nargs="+", default=None,
      help="one size N (default 512): decode batches up to N (and --max-num-seqs) replay "
           "CUDA graphs, captured at 1, 2, 4, 8, 16, 32, ... up to N; wider ones run eagerly. "
           "A ladder of several sizes is refused (--enforce-eager: no graphs)")
    a("--cudagraph-capture-sizes", type=int, nargs="+", default=None,
      help="vLLM's newer name of --cuda-graph-sizes (one size only)")
    a("--max-cudagraph-capture-size", type=int, default=None,
      help="the largest decode batch captured in a CUDA graph (as --cuda-graph-sizes N)")
    a("--compilation-config", "-O", type=_opt_level, default=None, dest="compilation_config",
      metavar="LEVEL_OR_JSON",
      help="vLLM's levels 1-3 and {} accepted: " + _SAME + "captures CUDA graphs; 0 (or "
           "cudagraph_mode NONE) runs without them, as --enforce-eager; "
           "max_cudagraph_capture_size as --cuda-graph-sizes; other keys are refused. The "
           "dotted form (-O.level 0, --compilation-config.cudagraph_mode NONE) works for "
           "every JSON flag")
    a("--prefix-caching-hash-algo", default="sha256",
      choices=["builtin", "sha256", "sha256_cbor", "sha256_cbor_64bit", "xxhash", "xxhash_cbor"],
      help=_SAME + "keys cached blocks by their exact tokens (a sha256 digest of the "
           "parent and the block's ids, checked token by token); any value is accepted")
    a("--num-lookahead-slots", type=int, default=0,
      help="accepted and unused: speculative decoding sizes its own slots here")
    a("--disable-chunked-mm-input", action=_BOOL, default=False, help=_TEXT)
    a("--disable-hybrid-kv-cache-manager", action=_BOOL, default=False,
      help="accepted and unused: sliding-window layers keep every block here (the outputs "
           "are the same)")
    a("--scheduler-cls", default=None,
      help="refused unless vLLM's own: modelport runs its own scheduler")
    a("--attention-backend", type=_optional_str, default=None, help=_KERNEL)
    a("--gdn-prefill-backend", default=None, help=_KERNEL)
    # parallelism and processes
    a("--distributed-executor-backend", default=None,
      choices=["mp", "uni", "ray", "external_launcher"],
      help="mp / uni: " + _SAME + "runs the engine and its tensor-parallel workers as local "
           "processes; ray and external_launcher refused")
    a("--disable-custom-all-reduce", action=_BOOL, default=False,
      help=_SAME + "all-reduces with NCCL (torch.distributed); accepted and unused")
    a("--decode-context-parallel-size", "-dcp", type=int, default=1,
      help="1 only: no context parallelism (refused otherwise)")
    a("--data-parallel-size-local", "-dpl", type=int, default=None,
      help="equal to --data-parallel-size only: all replicas on this host")
    a("--data-parallel-address", "-dpa", default=None,
      help="this host only (127.0.0.1 / localhost): no multi-node data parallelism")
    a("--data-parallel-rpc-port", "-dpp", type=int, default=None,
      help=_SAME + "reaches its local replicas through pipes and opens no RPC port; "
           "accepted and unused")
    a("--data-parallel-rank", "-dpn", type=int, default=None,
      help="refused: no external load-balancer mode (one server runs every replica)")
    a("--data-parallel-start-rank", "-dpr", type=int, default=None,
      help="0 only: no multi-node data parallelism")
    a("--data-parallel-backend", "-dpb", default="mp", choices=["mp", "ray"],
      help="mp: " + _SAME + "runs the replicas as local processes; ray refused")
    a("--data-parallel-hybrid-lb", action=_BOOL, default=False,
      help="refused: no multi-node data parallelism")
    a("--all2all-backend", default=None,
      help="accepted and unused: experts are not exchanged between data-parallel replicas here")
    a("--disable-nccl-for-dp-synchronization", action=_BOOL, default=False,
      help="accepted and unused: data-parallel replicas do not synchronize here")
    a("--enable-dbo", action=_BOOL, default=False, help="refused: no dual-batch overlap")
    a("--dbo-decode-token-threshold", type=int, default=None,
      help="accepted and unused (only with --enable-dbo, which is refused)")
    a("--dbo-prefill-token-threshold", type=int, default=None,
      help="accepted and unused (only with --enable-dbo, which is refused)")
    a("--enable-eplb", action=_BOOL, default=False, help="refused: no expert load balancing")
    a("--eplb-config", type=json_dict, default=None, metavar="JSON",
      help="refused unless empty (no expert load balancing)")
    a("--num-redundant-experts", type=int, default=None,
      help="0 only: no redundant experts (refused otherwise)")
    for flag in ("--eplb-window-size", "--eplb-step-interval"):
        a(flag, type=int, default=None, help="accepted and unused (only with --enable-eplb)")
    a("--eplb-log-balancedness", action=_BOOL, default=False,
      help="accepted and unused (only with --enable-eplb)")
    a("--expert-placement-strategy", default="linear", choices=["linear", "round_robin"],
      help="linear: " + _SAME + "gives each expert-parallel rank a contiguous range of "
           "experts; round_robin refused")
    a("--ray-workers-use-nsight", action=_BOOL, default=False, help="refused: no Ray here")
    a("--worker-cls", default="auto", help="auto only: modelport runs its own workers")
    a("--worker-extension-cls", default="",
      help="refused unless empty: no worker extensions (collective_rpc)")
    a("--kv-transfer-config", type=json_dict, default=None, metavar="JSON",
      help="refused: no disaggregated prefill / KV transfer")
    a("--kv-events-config", type=json_dict, default=None, metavar="JSON",
      help="refused unless empty: KV cache events are not published")
    a("--additional-config", type=json_dict, default=None, metavar="JSON",
      help="refused unless empty: no platform plugins")
    a("--enable-sleep-mode", action=_BOOL, default=False,
      help="sleep mode: POST /sleep?level=1|2 frees the KV cache (level 1 also moves the "
      "weights to host memory, level 2 drops them), POST /wake_up restores them (level 2 "
      "reloads the checkpoint), GET /is_sleeping")
    # observability
    a("--otlp-traces-endpoint", default=None,
      help="refused: no OpenTelemetry tracing (metrics are at /metrics)")
    a("--collect-detailed-traces", default=None,
      help="refused: no OpenTelemetry tracing (metrics are at /metrics)")
    a("--show-hidden-metrics-for-version", default=None,
      help=_SAME + "hides no deprecated metrics; accepted and unused")
    a("--aggregate-engine-logging", action="store_true", default=False,
      help=_SAME + "logs no per-replica statistics; accepted and unused")
    a("--fail-on-environ-validation", action=_BOOL, default=False,
      help="accepted and unused: modelport reads no VLLM_* environment variables")
    # LoRA
    a("--lora-dtype", default="auto",
      help="auto: " + _SAME + "runs adapters in the model's dtype; others refused")
    a("--long-lora-scaling-factors", type=float, nargs="+", default=None,
      help="refused: no long-context LoRA")
    a("--fully-sharded-loras", action=_BOOL, default=False,
      help="accepted and unused: under --tensor-parallel-size each rank keeps its part of "
           "every adapter (B's rows of its q/k/v and gate/up outputs, A's columns of its "
           "o/down inputs) and the whole other factor; the results are the same")
    a("--lora-extra-vocab-size", type=int, default=None,
      help="accepted and unused (vLLM V1 ignores it too)")
    a("--default-mm-loras", type=json_dict, default=None, metavar="JSON",
      help="refused unless empty: no multimodal models here")
    a("--enable-lora-bias", action=_BOOL, default=False,
      help="refused: adapters with bias terms are not supported")
    # multimodal: text-only models here
    a("--limit-mm-per-prompt", type=mm_limits, default=None, metavar="JSON", help=_TEXT)
    a("--mm-processor-kwargs", type=json_dict, default=None, metavar="JSON",
      help="refused unless empty: no multimodal processors here")
    a("--disable-mm-preprocessor-cache", action="store_true", default=False, help=_TEXT)
    a("--enable-mm-embeds", action=_BOOL, default=False,
      help="refused: no multimodal embeddings input")
    for flag in ("--allowed-local-media-path", "--media-io-kwargs", "--mm-processor-cache-gb",
                 "--mm-processor-cache-type", "--mm-shm-cache-max-object-size-mb",
                 "--mm-encoder-tp-mode", "--mm-encoder-attn-backend", "--video-pruning-rate"):
        a(flag, default=None, help=_TEXT)
    a("--allowed-media-domains", nargs="+", default=None, help=_TEXT)
    for flag in ("--interleave-mm-strings", "--skip-mm-profiling",
                 "--enable-multimodal-encoder-data-parallel"):
        a(flag, action=_BOOL, default=False, help=_TEXT)
    # structured outputs and reasoning
    a("--guided-decoding-backend", default=None,
      help="auto / xgrammar: " + _SAME + "runs structured outputs on xgrammar; others "
           "refused (also --structured-outputs-config backend)")
    a("--guided-decoding-disable-fallback", action=_BOOL, default=None,
      help=_SAME + "runs xgrammar alone, with no fallback; accepted")
    a("--guided-decoding-disable-any-whitespace", action=_BOOL, default=None,
      help="as --structured-outputs-config '{\"disable_any_whitespace\": true}': JSON "
           "constraints allow no free whitespace")
    a("--guided-decoding-disable-additional-properties", action=_BOOL, default=None,
      help="accepted and unused: vLLM applies it to its guidance backend only")
    a("--enable-reasoning", action=_BOOL, default=False,
      help="vLLM 0.7-0.9's flag: accepted with --reasoning-parser, which alone turns "
           "reasoning on (refused without it)")
    # vLLM V0 flags that older launch scripts carry
    a("--use-v2-block-manager", action="store_true", default=False,
      help=_SAME + "runs one (paged) block manager; accepted and unused")
    a("--num-scheduler-steps", type=int, default=1,
      help="1 only: multi-step scheduling was removed in vLLM V1 (modelport's "
           "--async-scheduling overlaps steps); refused otherwise")
    a("--multi-step-stream-outputs", action=_BOOL, default=True,
      help="accepted and unused (only with --num-scheduler-steps, which must be 1)")
    a("--disable-async-output-proc", action="store_true", default=False,
      help="accepted and unused: vLLM V0's output overlap (outputs are the same)")
    a("--preemption-mode", default=None, choices=["recompute", "swap"],
      help="recompute: " + _SAME + "recomputes preempted requests; swap refused")
    a("--scheduler-delay-factor", type=float, default=0.0,
      help="0 only: requests are scheduled at once (refused otherwise)")
    a("--tokenizer-pool-size", type=int, default=0,
      help="0 only: the server tokenizes in its own process (refused otherwise)")
    a("--tokenizer-pool-type", default=None, help="accepted and unused (see --tokenizer-pool-size)")
    a("--speculative-model", default=None,
      help="refused: vLLM replaced it with --speculative-config (the message gives the JSON)")
    for flag in ("--num-speculative-tokens", "--ngram-prompt-lookup-max",
                 "--ngram-prompt-lookup-min", "--speculative-max-model-len"):
        a(flag, type=int, default=None, help="refused: see --speculative-model")
    a("--spec-decoding-acceptance-method", default=None,
      choices=["rejection_sampler", "typical_acceptance_sampler"],
      help="rejection_sampler: " + _SAME + "verifies drafts by rejection sampling (greedy: "
           "exact match); typical_acceptance_sampler refused")
    a("--enable-prompt-adapter", action=_BOOL, default=False,
      help="refused: prompt adapters were removed in vLLM V1")
    a("--prompt-adapters", nargs="+", default=None,
      help="refused: prompt adapters were removed in vLLM V1")
    a("--qlora-adapter-name-or-path", default=None,
      help="refused: load a merged checkpoint, or serve the adapter with --enable-lora")
    a("--worker-use-ray", action="store_true", default=False, help="refused: no Ray here")
    a("--engine-use-ray", action="store_true", default=False, help="refused: no Ray here")


# -- refusals as data ----------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    flag: str
    ok: Callable[[Any, argparse.Namespace], bool]  # (value, args) -> served as asked
    instead: str | Callable[[argparse.Namespace], str]  # what to use instead / why

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    def why(self, args: argparse.Namespace) -> str:
        return self.instead(args) if callable(self.instead) else self.instead


def _falsy(v: Any, _a: argparse.Namespace) -> bool:
    return not v


def _is(*values: Any) -> Callable[[Any, argparse.Namespace], bool]:
    return lambda v, _a: v in values


_EMPTY = _is(None, {}, [], "")


def _graph_sizes_ok(v: Any, _a: argparse.Namespace) -> bool:
    return v is None or (len(v) == 1 and v[0] >= 1)


_COMPILE_MODES = (0, 1, 2, 3, "NONE", "STOCK_TORCH_COMPILE", "DYNAMO_TRACE_ONCE", "VLLM_COMPILE")
_GRAPH_MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")


def _compilation_ok(v: Any, _a: argparse.Namespace) -> bool:
    """Levels / modes 0-3, cudagraph_mode and max_cudagraph_capture_size: 0 (or NONE) runs
    without CUDA graphs, as --enforce-eager; the size is --cuda-graph-sizes'; any other asks
    for what modelport does by default."""
    if v is None or v in (0, 1, 2, 3) or v == {}:
        return True
    size = v.get("max_cudagraph_capture_size") if isinstance(v, dict) else None
    return isinstance(v, dict) and set(v) <= {"level", "mode", "cudagraph_mode",
                                              "max_cudagraph_capture_size"} \
        and v.get("level", 3) in _COMPILE_MODES and v.get("mode", 3) in _COMPILE_MODES \
        and v.get("cudagraph_mode", "FULL") in _GRAPH_MODES \
        and (size is None or (isinstance(size, int) and size >= 1))


def compilation_means_eager(v: Any) -> bool:
    """-O 0 / level or mode 0 / cudagraph_mode NONE: no CUDA graphs (vLLM's -O0)."""
    if isinstance(v, dict):
        return (v.get("level") in (0, "NONE") or v.get("mode") in (0, "NONE")
                or v.get("cudagraph_mode") == "NONE")
    return v == 0


def _dp_local_ok(v: Any, a: argparse.Namespace) -> bool:
    return v is None or v == getattr(a, "data_parallel_size", 1)


def _reasoning_ok(v: Any, a: argparse.Namespace) -> bool:
    so = getattr(a, "structured_outputs_config", None) or {}
    return not v or bool(getattr(a, "reasoning_parser", None) or so.get("reasoning_parser"))


_SPEC_FLAGS = {"speculative_model": "model", "num_speculative_tokens": "num_speculative_tokens",
               "ngram_prompt_lookup_max": "prompt_lookup_max",
               "ngram_prompt_lookup_min": "prompt_lookup_min",
               "speculative_max_model_len": "max_model_len"}


def _speculative_config_for(a: argparse.Namespace) -> str:
    """The --speculative-config that vLLM 0.8 replaced the separate flags with."""
    spec = {key: getattr(a, dest) for dest, key in _SPEC_FLAGS.items()
            if getattr(a, dest, None) is not None}
    if spec.get("model") in ("[ngram]", "ngram"):
        spec = {"method": "ngram", **{k: v for k, v in spec.items() if k != "model"}}
    return ("vLLM 0.8 replaced the separate speculative decoding flags with one; give "
            f"--speculative-config '{json.dumps(spec)}'")


LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "bfloat16", "float16", "float32")


def _load_format_ok(v: Any, a: argparse.Namespace) -> bool:
    """vLLM's bitsandbytes load format is its bitsandbytes quantization's; other formats
    (pt, npcache, tensorizer, runai_streamer, sharded_state, mistral, ...) are not read."""
    if v == "bitsandbytes":
        return getattr(a, "quantization", None) in (None, "bitsandbytes", "bnb", "nf4")
    return v is None or v in LOAD_FORMATS


ENGINE_REFUSALS: tuple[Refusal, ...] = (
    Refusal("--load-format", _load_format_ok, "modelport reads safetensors folders and .gguf "
            "files (--load-format auto | safetensors | gguf | dummy); convert .bin / .pt "
            "weights to safetensors; bitsandbytes goes with --quantization bitsandbytes"),
    Refusal("--kv-cache-dtype", lambda v, _a: v is None or v in KV_CACHE_DTYPES,
            "the fp8 KV cache is e4m3 (--kv-cache-dtype fp8); or auto, bfloat16, float16, "
            "float32"),
    # also refused by EngineArgs, but only once the server listens: say it before that
    Refusal("--pipeline-parallel-size", _is(1), "pipeline parallelism is not implemented; "
            "split the model with --tensor-parallel-size, replicate it with "
            "--data-parallel-size"),
    Refusal("--decode-context-parallel-size", _is(1, None), "context parallelism is not "
            "implemented; split the model with --tensor-parallel-size"),
    Refusal("--cpu-offload-gb", _is(0, 0.0), "weights are not offloaded to host memory here; "
            "use a quantized checkpoint (--quantization) or more GPUs (--tensor-parallel-size)"),
    Refusal("--kv-offloading-size", _is(None, 0, 0.0), "the KV cache is not offloaded to host "
            "memory here; size it with --gpu-memory-utilization or --kv-cache-memory-bytes"),
    Refusal("--data-parallel-address", _is(None, "127.0.0.1", "localhost"),
            "multi-node data parallelism is not supported; --data-parallel-size runs the "
            "replicas on this host"),
    Refusal("--data-parallel-size-local", _dp_local_ok, "all data-parallel replicas run on "
            "this host: give --data-parallel-size alone"),
    Refusal("--data-parallel-rank", _is(None), "one server runs every data-parallel replica "
            "(no external load balancer mode): give --data-parallel-size alone"),
    Refusal("--data-parallel-start-rank", _is(None, 0), "multi-node data parallelism is not "
            "supported; --data-parallel-size runs the replicas on this host"),
    Refusal("--data-parallel-backend", _is("mp"), "the data-parallel replicas are local "
            "processes; use --data-parallel-backend mp"),
    Refusal("--data-parallel-hybrid-lb", _falsy, "multi-node data parallelism is not "
            "supported; --data-parallel-size runs the replicas on this host"),
    Refusal("--kv-transfer-config", _EMPTY, "disaggregated prefill (KV transfer) is not "
            "supported"),
    Refusal("--kv-events-config", lambda v, _a: not v or v.get("enable_kv_cache_events") is False,
            "KV cache events are not published; scrape /metrics"),
    Refusal("--additional-config", _EMPTY, "there are no platform plugins to configure"),
    Refusal("--tokenizer-mode", _is("auto", "hf"), "modelport uses the model's fast "
            "tokenizer (tokenizer.json or the GGUF vocabulary); use --tokenizer-mode auto"),
    Refusal("--model-impl", _is("auto", "vllm"), "only modelport's built-in model "
            "implementations run; use --model-impl auto"),
    Refusal("--config-format", _is("auto", "hf"), "the model's config.json (or GGUF metadata) "
            "is read; use --config-format auto"),
    Refusal("--skip-tokenizer-init", _falsy, "the server tokenizes prompts and detokenizes "
            "every output"),
    Refusal("--enable-prompt-embeds", _falsy, "prompts are text or token ids"),
    Refusal("--logprobs-mode", _is("raw_logprobs"), "logprobs are the log-softmax of the "
            "model's logits before any processing; use --logprobs-mode raw_logprobs"),
    Refusal("--override-attention-dtype", _is(None, "", "auto"), "attention runs in the "
            "model's --dtype"),
    Refusal("--logits-processor-pattern", _is(None, ""), "custom logits processors are given "
            "at start-up with --logits-processors"),
    Refusal("--io-processor-plugin", _is(None, ""), "there are no IO processor plugins"),
    Refusal("--model-loader-extra-config", _EMPTY, "there are no pluggable model loaders"),
    Refusal("--calculate-kv-scales", _falsy, "an fp8 KV cache (--kv-cache-dtype fp8) is "
            "written with scale 1.0"),
    Refusal("--kv-sharing-fast-prefill", _falsy, "no layers share KV caches here"),
    Refusal("--mamba-cache-dtype", _is("auto"), "no Mamba models are served here"),
    Refusal("--mamba-ssm-cache-dtype", _is("auto"), "no Mamba models are served here"),
    Refusal("--mamba-block-size", _is(None), "no Mamba models are served here"),
    Refusal("--cuda-graph-sizes", _graph_sizes_ok, "the decode CUDA graphs use a fixed ladder "
            "(1, 2, 4, 8, 16, 32, ...): give one size, the largest batch to capture, or "
            "--enforce-eager for none"),
    Refusal("--cudagraph-capture-sizes", _graph_sizes_ok, "the decode CUDA graphs use a fixed "
            "ladder (1, 2, 4, 8, 16, 32, ...): give one size, the largest batch to capture "
            "(or --max-cudagraph-capture-size), or --enforce-eager for none"),
    Refusal("--max-cudagraph-capture-size", lambda v, _a: v is None or v >= 1,
            "give the largest decode batch to capture, at least 1, or --enforce-eager"),
    Refusal("--compilation-config", _compilation_ok, "modelport captures CUDA graphs (vLLM's "
            "level 3 effect) and takes no other compilation settings; -O 0 (or --enforce-eager) "
            "runs without CUDA graphs, max_cudagraph_capture_size sets the largest captured "
            "batch"),
    Refusal("--scheduler-cls", _is(None, "", "vllm.core.scheduler.Scheduler",
                                   "vllm.v1.core.sched.scheduler.Scheduler"),
            "modelport runs its own scheduler"),
    Refusal("--distributed-executor-backend", _is(None, "mp", "uni"), "the engine and its "
            "tensor-parallel workers are local processes; use --distributed-executor-backend mp"),
    Refusal("--enable-dbo", _falsy, "dual-batch overlap is not implemented"),
    Refusal("--enable-eplb", _falsy, "expert load balancing is not implemented; "
            "--enable-expert-parallel shares the experts out evenly"),
    Refusal("--eplb-config", _EMPTY, "expert load balancing is not implemented"),
    Refusal("--num-redundant-experts", _is(None, 0), "expert load balancing (redundant "
            "experts) is not implemented"),
    Refusal("--expert-placement-strategy", _is("linear"), "expert-parallel ranks hold "
            "contiguous ranges of experts; use --expert-placement-strategy linear"),
    Refusal("--ray-workers-use-nsight", _falsy, "no Ray workers run here"),
    Refusal("--worker-cls", _is("auto", None, ""), "modelport runs its own workers"),
    Refusal("--worker-extension-cls", _is("", None), "there are no worker extensions "
            "(collective_rpc); update weights with the sleep-mode endpoints or reload"),
    Refusal("--otlp-traces-endpoint", _is(None), "OpenTelemetry tracing is not supported; "
            "scrape /metrics"),
    Refusal("--collect-detailed-traces", _is(None), "OpenTelemetry tracing is not supported; "
            "scrape /metrics"),
    Refusal("--lora-dtype", _is("auto", None), "adapters run in the model's dtype; use "
            "--lora-dtype auto"),
    Refusal("--long-lora-scaling-factors", _is(None, []), "long-context LoRA is not supported"),
    Refusal("--default-mm-loras", _EMPTY, "no multimodal models are served here"),
    Refusal("--enable-lora-bias", _falsy, "LoRA adapters with bias terms are not supported"),
    Refusal("--mm-processor-kwargs", _EMPTY, "no multimodal models are served here"),
    Refusal("--enable-mm-embeds", _falsy, "no multimodal models are served here"),
    Refusal("--guided-decoding-backend", _is(None, "auto", "xgrammar"), "structured outputs "
            "run on xgrammar; use --guided-decoding-backend xgrammar"),
    Refusal("--enable-reasoning", _reasoning_ok, "give --reasoning-parser NAME (e.g. "
            "deepseek_r1 or qwen3), which alone turns reasoning on"),
    Refusal("--num-scheduler-steps", _is(1, None), "multi-step scheduling was removed in "
            "vLLM V1; modelport's --async-scheduling overlaps the host's work with the GPU's"),
    Refusal("--preemption-mode", _is(None, "recompute"), "preempted requests are recomputed "
            "(as vLLM V1); use --preemption-mode recompute"),
    Refusal("--scheduler-delay-factor", _is(0, 0.0, None), "waiting requests are scheduled "
            "at once"),
    Refusal("--tokenizer-pool-size", _is(0, None), "the server tokenizes in its own process "
            "(no Ray tokenizer pool)"),
    *(Refusal("--" + dest.replace("_", "-"), _is(None), _speculative_config_for)
      for dest in _SPEC_FLAGS),
    Refusal("--spec-decoding-acceptance-method", _is(None, "rejection_sampler"), "drafts "
            "are verified by rejection sampling; use --spec-decoding-acceptance-method "
            "rejection_sampler"),
    Refusal("--enable-prompt-adapter", _falsy, "prompt adapters were removed in vLLM V1; "
            "serve LoRA adapters with --enable-lora"),
    Refusal("--prompt-adapters", _is(None, []), "prompt adapters were removed in vLLM V1; "
            "serve LoRA adapters with --enable-lora --lora-modules"),
    Refusal("--qlora-adapter-name-or-path", _is(None), "load a merged checkpoint, or serve "
            "the adapter with --enable-lora --lora-modules"),
    Refusal("--worker-use-ray", _falsy, "no Ray here: the engine and its workers are local "
            "processes"),
    Refusal("--engine-use-ray", _falsy, "no Ray here: the engine and its workers are local "
            "processes"),
    Refusal("--revision", _is(None, "main"), "the HF cache snapshot refs/main names is served; "
            "give the snapshot's folder as --model"),
    Refusal("--tokenizer-revision", _is(None, "main"), "give the tokenizer's folder as "
            "--tokenizer"),
    Refusal("--hf-config-path", _is(None), "config.json is read from the model's folder"),
)


def first_refusal(args: argparse.Namespace, refusals: tuple[Refusal, ...]
                  ) -> tuple[Refusal, Any] | None:
    """The first refusal whose flag is set to a value it refuses, with that value."""
    for r in refusals:
        if hasattr(args, r.dest):
            value = getattr(args, r.dest)
            if not r.ok(value, args):
                return r, value
    return None


# -- the implemented ones: onto EngineArgs' fields -----------------------------------------
def apply(args: argparse.Namespace) -> None:
    """Map the implemented vLLM flags onto EngineArgs' fields in `args` (after the refusals
    were checked): -O 0 is enforce_eager, the rope flags are hf_overrides keys, the capture
    sizes are cuda_graph_sizes, the --guided-decoding-* flags structured_outputs_config keys."""
    if getattr(args, "load_format", None) == "bitsandbytes":  # vLLM 0.6-0.9 asked for both
        args.load_format = "auto"
        args.quantization = getattr(args, "quantization", None) or "bitsandbytes"
    comp = getattr(args, "compilation_config", None)
    if compilation_means_eager(comp):
        args.enforce_eager = True  # vLLM's -O0: no compilation, no CUDA graphs
    size = getattr(args, "max_cudagraph_capture_size", None)
    if size is None and isinstance(comp, dict):
        size = comp.get("max_cudagraph_capture_size")
    given = [(flag, s) for flag, s in (
        ("--cuda-graph-sizes", getattr(args, "cuda_graph_sizes", None)),
        ("--cudagraph-capture-sizes", getattr(args, "cudagraph_capture_sizes", None)),
        ("--max-cudagraph-capture-size", [size] if size is not None else None)) if s]
    if len({tuple(s) for _, s in given}) > 1:
        raise ValueError(" and ".join(f"{f} {' '.join(map(str, s))}" for f, s in given)
                         + " differ: give one")
    if given:
        args.cuda_graph_sizes = list(given[0][1])
    overrides = {k: getattr(args, k) for k in ("rope_scaling", "rope_theta")
                 if getattr(args, k, None) is not None}
    if overrides:
        hf = dict(getattr(args, "hf_overrides", None) or {})
        clash = sorted(k for k in overrides if k in hf and hf[k] != overrides[k])
        if clash:
            raise ValueError(f"--{clash[0].replace('_', '-')} and --hf-overrides' {clash[0]} "
                             "differ: give one")
        args.hf_overrides = {**hf, **overrides}
    so = dict(getattr(args, "structured_outputs_config", None) or {})
    for flag in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
        value = getattr(args, "guided_decoding_" + flag, None)
        if value is not None:
            so.setdefault(flag, value)
    if so:
        args.structured_outputs_config = so
    if getattr(args, "max_parallel_loading_workers", None) is not None:
        logger.warning("--max-parallel-loading-workers is ignored (as vLLM V1 does)")
    for flag in ("attention_backend", "gdn_prefill_backend"):
        if getattr(args, flag, None) not in (None, "auto", "AUTO"):
            logger.warning("--%s %s is ignored: modelport picks its own kernels",
                           flag.replace("_", "-"), getattr(args, flag))


# -- LLM(**kwargs) -------------------------------------------------------------------------
_LLM_FIELDS = ("enforce_eager", "cuda_graph_sizes", "hf_overrides", "load_format",
               "quantization", "structured_outputs_config")  # EngineArgs' fields apply() sets


def _as_kwarg(text: str) -> str:
    """A refusal's advice in LLM's terms: --tensor-parallel-size -> tensor_parallel_size."""
    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"),
                  text)


def llm_kwargs(given: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """vLLM's engine arguments given to ``LLM(**given)`` that are not LLM's own parameters:
    a TypeError for a name vLLM's EngineArgs does not have either, a ValueError for a value
    modelport cannot honour (naming it and the alternative), else the EngineArgs fields they
    set (``own``: the LLM's values of those fields and of the ones the checks read)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_engine_compat_args(parser)
    ns = parser.parse_args([])
    dests = {a.dest for a in parser._actions}
    if "max_context_len_to_capture" in given:  # vLLM V0's older name
        given = {**given, "max_seq_len_to_capture": given["max_context_len_to_capture"]}
        del given["max_context_len_to_capture"]
    unknown = sorted(set(given) - dests)
    if unknown:
        raise TypeError(f"LLM() got unexpected keyword arguments: {', '.join(unknown)}")
    for k, v in {**own, **given}.items():
        setattr(ns, k, v)
    hit = first_refusal(ns, ENGINE_REFUSALS)
    if hit is not None:
        r, value = hit
        raise ValueError(f"LLM({r.dest}={value!r}) is not supported: {_as_kwarg(r.why(ns))}")
    before = {k: getattr(ns, k, None) for k in _LLM_FIELDS}
    apply(ns)
    out = {k: getattr(ns, k) for k in _LLM_FIELDS if getattr(ns, k, None) != before[k]}
    if given.get("num_gpu_blocks_override") is not None:
        out["num_gpu_blocks_override"] = given["num_gpu_blocks_override"]
    return out
