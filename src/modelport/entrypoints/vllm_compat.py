"""vLLM `serve` flags that launch scripts carry over, in one place.

Each flag here is one of:
  implemented -- it does what vLLM's does (uvicorn, CORS, docs, middleware, ...; or an engine
                 field of the same name in EngineArgs);
  accepted    -- modelport already behaves as the flag asks (the help says so);
  refused     -- at start-up, naming what to use instead, when the value asks for something
                 modelport does not do. A flag at vLLM's default value is never refused.
`REFUSALS` holds the accepted values of the refused ones as data; `check(args)` applies it.
Both launch forms (`modelport serve`, `python -m modelport.entrypoints.openai.api_server`)
add these through add_openai_args, and parse `--config FILE` through `ConfigFileParser`.
"""

from __future__ import annotations

import argparse
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("modelport.serve")
request_logger = logging.getLogger("modelport.requests")


# -- --config FILE: vLLM's YAML file of flags ----------------------------------------------
class ConfigFileParser(argparse.ArgumentParser):
    """An ArgumentParser that reads `--config FILE` (vLLM's): a YAML mapping of flag names
    without the leading dashes (max-model-len or max_model_len) to values. Its flags go in
    front of the command line's, so a flag given on the command line wins. Subparsers made
    from this parser are of this class too (argparse's default parser_class)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        if args is not None and "--config" in self._option_string_actions:
            args = expand_config_file(self, list(args))
        if args is not None:
            args = expand_dotted(self, list(args))
        return super().parse_known_args(args, namespace)


def expand_dotted(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """vLLM's dotted form of a JSON flag: `--compilation-config.level 0` or
    `--structured-outputs-config.backend=xgrammar` set one key (nested: `.a.b`) of that
    flag's object; the keys given this way join the flag's own JSON, if also given."""
    merged: dict[str, dict[str, Any]] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        name, dot, key = a.partition(".")
        if not (a.startswith("-") and dot and key and name in parser._option_string_actions):
            rest.append(a)
            i += 1
            continue
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        else:
            parser.error(f"argument {a}: expected one argument")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        node = merged.setdefault(name, {})
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = parsed
    if not merged:
        return argv
    for name, keys in merged.items():  # the flag's own JSON, if given, then these keys
        for j in range(len(rest) - 1, -1, -1):
            if rest[j] == name and j + 1 < len(rest):
                own = rest.pop(j + 1)
                rest.pop(j)
                try:
                    keys = {**json.loads(own), **keys}
                except (ValueError, TypeError):
                    parser.error(f"argument {name}: not a JSON object: {own!r}")
                break
        rest += [name, json.dumps(keys)]
    return rest


def expand_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        if a == "--config" or a.startswith("--config="):
            if path is not None:
                parser.error("--config: give one file")
            if a == "--config":
                if i + 1 >= len(argv):
                    parser.error("argument --config: expected one argument")
                path, i = argv[i + 1], i + 2
            else:
                path, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    if path is None:
        return argv
    # as vLLM: a leading positional (`serve MODEL --config f`) stays first, so that a list in
    # the file (served-model-name: [a, b]) cannot swallow it, and the command line's model
    # wins over the file's
    lead = rest[:1] if rest and not rest[0].startswith("-") else []
    cli_model = lead or any(a == "--model" or a.startswith("--model=") for a in rest)
    skip = ("--model",) if cli_model else ()
    return lead + config_file_argv(parser, path, skip) + rest[len(lead):]


def config_file_argv(
    parser: argparse.ArgumentParser, path: str, skip: tuple[str, ...] = ()
) -> list[str]:
    """The YAML file's keys as command-line flags (true: the bare flag; false: --no-FLAG for a
    --FLAG/--no-FLAG pair, else left out; a list: its items; a mapping: JSON); the flags in
    `skip` (given on the command line) are left out."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        parser.error(f"--config {path}: {e.strerror or e}")
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not YAML: {e}")
    if data is None:
        return []
    if not isinstance(data, dict):
        parser.error(f"--config {path}: must be a mapping of flag names to values")
    argv: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if flag == "--config":
            parser.error(f"--config {path}: a config file cannot name another")
        if flag in skip:
            continue
        action = parser._option_string_actions.get(flag)
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            elif isinstance(action, argparse.BooleanOptionalAction):
                argv.append("--no-" + flag[2:])
            continue
        if value is None:
            continue
        argv.append(flag)
        if isinstance(value, list):
            argv += [json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value]
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


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


def _opt_level(text: str) -> Any:
    """-O / --compilation-config: a level (0-3) or a JSON object."""
    if text.strip().lstrip("-").isdigit():
        return int(text)
    return json_dict(text)


# -- the flags -----------------------------------------------------------------------------
_SAME = "accepted: modelport already "  # help text of an accepted no-op


def add_vllm_compat_args(parser: argparse.ArgumentParser) -> None:
    """vLLM flags that are not engine or server settings of modelport's own (see the module
    docstring for how each is handled); flags another frontend added are kept."""
    g = parser.add_argument_group("vLLM compatibility")

    def a(*flags: str, **kw: Any) -> None:
        if not any(f in parser._option_string_actions for f in flags):
            g.add_argument(*flags, **kw)

    a("--config", default=None, metavar="FILE",
      help="YAML file of flags (keys: flag names without the dashes); flags on the command "
           "line win over the file's")
    # server: uvicorn and the FastAPI app
    a("--uvicorn-log-level", default=None,
      choices=["critical", "error", "warning", "info", "debug", "trace"],
      help="uvicorn's log level (default: --log-level)")
    a("--log-config-file", default=None, metavar="FILE",
      help="logging configuration (JSON or YAML dictConfig file) given to uvicorn, which "
           "applies it to every logger at start-up")
    a("--root-path", default=None,
      help="the path prefix a proxy serves this server under (uvicorn's root_path)")
    a("--ssl-keyfile", default=None, help="serve HTTPS with this key file (uvicorn)")
    a("--ssl-certfile", default=None, help="serve HTTPS with this certificate file (uvicorn)")
    a("--ssl-ca-certs", default=None, help="CA certificates file (uvicorn)")
    a("--allowed-origins", type=json_list, default=None, metavar="JSON",
      help="CORS: allowed origins as a JSON list (default, as vLLM's: '[\"*\"]', with all "
           "methods and headers and no credentials)")
    a("--allowed-methods", type=json_list, default=None, metavar="JSON",
      help="CORS: allowed methods (JSON list; default [\"*\"])")
    a("--allowed-headers", type=json_list, default=None, metavar="JSON",
      help="CORS: allowed headers (JSON list; default [\"*\"])")
    a("--allow-credentials", action="store_true", default=False, help="CORS: allow credentials")
    a("--no-cors", action="store_true", default=False,
      help="send no CORS headers (modelport's own; vLLM always sends them)")
    a("--disable-fastapi-docs", action="store_true", default=False,
      help="no /docs, /redoc or /openapi.json")
    a("--middleware", action="append", default=[], metavar="MODULE.NAME",
      help="ASGI middleware to add (repeatable): a class is added with app.add_middleware, "
           "a function with @app.middleware('http')")
    a("--enable-request-id-headers", action="store_true", default=False,
      help="answer with an X-Request-Id header (the request's own, or a new one)")
    a("--enable-server-load-tracking", action="store_true", default=False,
      help="count the requests in flight under /v1 and serve the count at GET /load "
           '({"server_load": N})')
    a("--disable-log-requests", action="store_true", default=False,
      help=_SAME + "does not log requests unless --enable-log-requests")
    a("--enable-log-requests", action="store_true", default=False,
      help="log each /v1 request's JSON body (prompt and sampling parameters) at INFO on "
           "the modelport.requests logger")
    a("--max-log-len", type=int, default=None,
      help="with --enable-log-requests / --enable-log-outputs: log at most this many "
           "characters of a body")
    a("--disable-uvicorn-access-log", action="store_true", default=False,
      help="no access log line per HTTP request (uvicorn's)")
    a("--enable-log-outputs", action="store_true", default=False,
      help="log each /v1 response body, and each event of a stream, on the "
           "modelport.requests logger (cut to --max-log-len)")
    a("--disable-log-stats", action="store_true", default=False,
      help=_SAME + "logs no periodic engine statistics (they are at /metrics)")
    # OpenAI responses
    a("--response-role", default="assistant",
      help="role of the generated chat message when add_generation_prompt is true (else, as "
           "vLLM's, the last message's role)")
    a("--return-tokens-as-token-ids", action="store_true", default=False,
      help="logprobs name tokens as 'token_id:N' instead of their text")
    a("--enable-force-include-usage", action="store_true", default=False,
      help="every stream ends with a usage chunk, as if stream_options.include_usage")
    a("--enable-prompt-tokens-details", action="store_true", default=False,
      help="usage.prompt_tokens_details.cached_tokens in completions and chat answers: the "
           "prompt tokens found in the prefix cache (left out when none)")
    a("--chat-template-content-format", default="auto",
      choices=["auto", "string", "openai"],
      help="how a message's content reaches the chat template: string (its text as one "
           "string), openai (a list of {\"type\": \"text\", \"text\": ...} parts), auto "
           "(default: openai for a template that loops over message['content'], else string)")
    a("--tool-server", default=None,
      help="not served: the Responses API has no built-in tools here (refused)")
    # --generation-config / --override-generation-config are engine flags (EngineArgs)
    a("--logits-processors", nargs="+", default=None,
      help="custom logits processor classes by fully-qualified name (pkg.mod:Class or "
           "pkg.mod.Class; see modelport.logits_processor); a request passes them arguments "
           "in vllm_xargs")
    # model loading
    a("--download-dir", default=None,
      help=_SAME + "reads local folders, .gguf files and the HF cache and downloads nothing; "
           "accepted and unused")
    a("--revision", default=None,
      help="main (or none): " + _SAME + "serves the cached snapshot refs/main names; others "
           "refused")
    a("--code-revision", default=None,
      help=_SAME + "loads no model code from checkpoints; accepted and unused")
    a("--tokenizer-revision", default=None,
      help="main (or none): the tokenizer of --tokenizer / the model's folder; others refused")
    a("--tokenizer-mode", default="auto", choices=["auto", "hf", "slow", "mistral", "custom"],
      help="auto / hf: " + _SAME + "uses the model's (fast) tokenizer; others refused")
    a("--model-impl", default="auto", choices=["auto", "vllm", "transformers", "terratorch"],
      help="auto / vllm: " + _SAME + "runs its built-in implementations; others refused")
    a("--max-parallel-loading-workers", type=int, default=None,
      help="accepted and ignored, as vLLM V1 does (warned at start-up)")
    a("--hf-config-path", default=None, help="refused: config.json is read from the model")
    # memory and scheduling
    a("--swap-space", type=float, default=4,
      help=_SAME + "recomputes preempted requests (as vLLM V1) and swaps nothing to the "
           "host; accepted and unused")
    a("--cpu-offload-gb", type=float, default=0,
      help="0 only: weights are not offloaded to the host (refused otherwise)")
    a("--num-gpu-blocks-override", type=int, default=None,
      help="the number of KV cache blocks, in place of the one the memory budget gives")
    a("--max-seq-len-to-capture", type=int, default=None,
      help=_SAME + "replays its decode CUDA graphs at every length up to max_model_len; "
           "accepted and unused")
    a("--cuda-graph-sizes", type=int, nargs="+", default=None,
      help="one size N (default 512): decode batches up to N (and --max-num-seqs) replay "
           "CUDA graphs, captured at 1, 2, 4, 8, 16, 32, ... up to N; wider ones run eagerly. "
           "A ladder of several sizes is refused (--enforce-eager: no graphs)")
    a("--compilation-config", "-O", type=_opt_level, default=None, dest="compilation_config",
      metavar="LEVEL_OR_JSON",
      help="vLLM's levels 1-3 and {} accepted: " + _SAME + "captures CUDA graphs; 0 (or "
           "cudagraph_mode NONE) runs without them, as --enforce-eager; other keys are "
           "refused. The dotted form (-O.level 0, --compilation-config.cudagraph_mode NONE) "
           "works for every JSON flag")
    a("--prefix-caching-hash-algo", default="sha256",
      choices=["builtin", "sha256", "sha256_cbor", "sha256_cbor_64bit", "xxhash", "xxhash_cbor"],
      help=_SAME + "keys cached blocks by their exact tokens (a sha256 digest of the "
           "parent and the block's ids, checked token by token); any value is accepted")
    # parallelism and processes
    a("--distributed-executor-backend", default=None,
      choices=["mp", "uni", "ray", "external_launcher"],
      help="mp / uni: " + _SAME + "runs the engine and its tensor-parallel workers as local "
           "processes; ray and external_launcher refused")
    a("--disable-custom-all-reduce", action="store_true", default=False,
      help=_SAME + "all-reduces with NCCL (torch.distributed); accepted and unused")
    a("--disable-frontend-multiprocessing", action="store_true", default=False,
      help=_SAME + "runs the engine core in its own process, as vLLM V1 always does; "
           "accepted and unused")
    a("--data-parallel-size-local", "-dpl", type=int, default=None,
      help="equal to --data-parallel-size only: all replicas on this host")
    a("--data-parallel-address", "-dpa", default=None,
      help="this host only (127.0.0.1 / localhost): no multi-node data parallelism")
    a("--data-parallel-rpc-port", "-dpp", type=int, default=None,
      help=_SAME + "reaches its local replicas through pipes and opens no RPC port; "
           "accepted and unused")
    a("--api-server-count", "-asc", type=int, default=1,
      help="1 only: one API server process (refused otherwise)")
    a("--headless", action="store_true", default=False,
      help="refused: no multi-node serving (engines without an API server)")
    a("--kv-transfer-config", type=json_dict, default=None, metavar="JSON",
      help="refused: no disaggregated prefill / KV transfer")
    a("--enable-sleep-mode", action="store_true", default=False,
      help="sleep mode: POST /sleep?level=1|2 frees the KV cache (level 1 also moves the "
      "weights to host memory, level 2 drops them), POST /wake_up restores them (level 2 "
      "reloads the checkpoint), GET /is_sleeping")
    a("--otlp-traces-endpoint", default=None,
      help="refused: no OpenTelemetry tracing (metrics are at /metrics)")
    # LoRA, multimodal, structured outputs
    a("--lora-dtype", default="auto",
      help="auto: " + _SAME + "runs adapters in the model's dtype; others refused")
    a("--long-lora-scaling-factors", type=float, nargs="+", default=None,
      help="refused: no long-context LoRA")
    a("--fully-sharded-loras", action="store_true", default=False,
      help="accepted and unused: under --tensor-parallel-size each rank keeps its part of "
           "every adapter (B's rows of its q/k/v and gate/up outputs, A's columns of its "
           "o/down inputs) and the whole other factor; the results are the same")
    a("--limit-mm-per-prompt", type=json_dict, default=None, metavar="JSON",
      help=_SAME + "serves text-only models: a prompt holds no images, audio or video, "
           "within any limit; accepted and unused")
    a("--mm-processor-kwargs", type=json_dict, default=None, metavar="JSON",
      help="refused unless empty: no multimodal processors here")
    a("--disable-mm-preprocessor-cache", action="store_true", default=False,
      help=_SAME + "has no multimodal preprocessor (nothing to cache); accepted and unused")
    a("--guided-decoding-backend", default=None,
      help="auto / xgrammar: " + _SAME + "runs structured outputs on xgrammar; others "
           "refused (also --structured-outputs-config backend)")


# -- refusals as data ----------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    flag: str
    ok: Callable[[Any, argparse.Namespace], bool]  # (value, args) -> served as asked
    instead: str  # what to use instead / why


def _falsy(v: Any, _a: argparse.Namespace) -> bool:
    return not v


def _is(*values: Any) -> Callable[[Any, argparse.Namespace], bool]:
    return lambda v, _a: v in values


def _graph_sizes_ok(v: Any, _a: argparse.Namespace) -> bool:
    return v is None or (len(v) == 1 and v[0] >= 1)


_COMPILE_MODES = (0, 1, 2, 3, "NONE", "STOCK_TORCH_COMPILE", "DYNAMO_TRACE_ONCE", "VLLM_COMPILE")
_GRAPH_MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")


def _compilation_ok(v: Any, _a: argparse.Namespace) -> bool:
    """Levels / modes 0-3 and cudagraph_mode: 0 (or NONE) runs without CUDA graphs, as
    --enforce-eager; any other asks for what modelport does by default."""
    if v is None or v in (0, 1, 2, 3) or v == {}:
        return True
    return isinstance(v, dict) and set(v) <= {"level", "mode", "cudagraph_mode"} \
        and v.get("level", 3) in _COMPILE_MODES and v.get("mode", 3) in _COMPILE_MODES \
        and v.get("cudagraph_mode", "FULL") in _GRAPH_MODES


def compilation_means_eager(v: Any) -> bool:
    """-O 0 / level or mode 0 / cudagraph_mode NONE: no CUDA graphs (vLLM's -O0)."""
    if isinstance(v, dict):
        return (v.get("level") in (0, "NONE") or v.get("mode") in (0, "NONE")
                or v.get("cudagraph_mode") == "NONE")
    return v == 0


def _dp_local_ok(v: Any, a: argparse.Namespace) -> bool:
    return v is None or v == getattr(a, "data_parallel_size", 1)


REFUSALS: tuple[Refusal, ...] = (
    # also refused by EngineArgs, but only once the server listens: say it before that
    Refusal("--pipeline-parallel-size", _is(1), "pipeline parallelism is not implemented; "
            "split the model with --tensor-parallel-size, replicate it with "
            "--data-parallel-size"),
    Refusal("--cpu-offload-gb", _is(0, 0.0), "weights are not offloaded to host memory here; "
            "use a quantized checkpoint (--quantization) or more GPUs (--tensor-parallel-size)"),
    Refusal("--headless", _falsy, "multi-node serving is not supported; run one "
            "`modelport serve` per host behind a load balancer"),
    Refusal("--data-parallel-address", _is(None, "127.0.0.1", "localhost"),
            "multi-node data parallelism is not supported; --data-parallel-size runs the "
            "replicas on this host"),
    Refusal("--data-parallel-size-local", _dp_local_ok, "all data-parallel replicas run on "
            "this host: give --data-parallel-size alone"),
    Refusal("--api-server-count", _is(1), "one API server process serves all requests here"),
    Refusal("--kv-transfer-config", _is(None, {}), "disaggregated prefill (KV transfer) is not "
            "supported"),
    Refusal("--tokenizer-mode", _is("auto", "hf"), "modelport uses the model's fast "
            "tokenizer (tokenizer.json or the GGUF vocabulary); use --tokenizer-mode auto"),
    Refusal("--model-impl", _is("auto", "vllm"), "only modelport's built-in model "
            "implementations run; use --model-impl auto"),
    Refusal("--cuda-graph-sizes", _graph_sizes_ok, "the decode CUDA graphs use a fixed ladder "
            "(1, 2, 4, 8, 16, 32, ...): give one size, the largest batch to capture, or "
            "--enforce-eager for none"),
    Refusal("--compilation-config", _compilation_ok, "modelport captures CUDA graphs (vLLM's "
            "level 3 effect) and takes no other compilation settings; -O 0 (or --enforce-eager) "
            "runs without CUDA graphs"),
    Refusal("--distributed-executor-backend", _is(None, "mp", "uni"), "the engine and its "
            "tensor-parallel workers are local processes; use --distributed-executor-backend mp"),
    Refusal("--otlp-traces-endpoint", _is(None), "OpenTelemetry tracing is not supported; "
            "scrape /metrics"),
    Refusal("--lora-dtype", _is("auto"), "adapters run in the model's dtype; use "
            "--lora-dtype auto"),
    Refusal("--long-lora-scaling-factors", _is(None, []), "long-context LoRA is not supported"),
    Refusal("--mm-processor-kwargs", _is(None, {}), "no multimodal models are served here"),
    Refusal("--guided-decoding-backend", _is(None, "auto", "xgrammar"), "structured outputs "
            "run on xgrammar; use --guided-decoding-backend xgrammar"),
    Refusal("--tool-server", _is(None), "the Responses API has no built-in tool server; give "
            "the tools in the request"),
    Refusal("--revision", _is(None, "main"), "the HF cache snapshot refs/main names is served; "
            "give the snapshot's folder as --model"),
    Refusal("--tokenizer-revision", _is(None, "main"), "give the tokenizer's folder as "
            "--tokenizer"),
    Refusal("--hf-config-path", _is(None), "config.json is read from the model's folder"),
)


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def check(args: argparse.Namespace) -> None:
    """Refuse, at start-up, a vLLM flag whose value asks for what modelport does not do."""
    for r in REFUSALS:
        dest = _dest(r.flag)
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if not r.ok(value, args):
            shown = json.dumps(value) if isinstance(value, (dict, list)) else value
            shown = "" if value is True else f" {shown}"
            raise SystemExit(f"modelport serve: {r.flag}{shown} is not supported: {r.instead}")
    if compilation_means_eager(getattr(args, "compilation_config", None)):
        args.enforce_eager = True  # vLLM's -O0: no compilation, no CUDA graphs
    if getattr(args, "logits_processors", None):  # an unknown name fails before listening
        from modelport.logits_processor import load_logits_processors

        try:
            load_logits_processors(args.logits_processors)
        except ValueError as e:
            raise SystemExit(f"modelport serve: --logits-processors: {e}") from None
    if getattr(args, "max_parallel_loading_workers", None) is not None:
        logger.warning("--max-parallel-loading-workers is ignored (as vLLM V1 does)")


# -- the app and uvicorn -------------------------------------------------------------------
def fastapi_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if getattr(args, "disable_fastapi_docs", False):
        kw.update(docs_url=None, redoc_url=None, openapi_url=None)
    return kw


def uvicorn_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"log_level": getattr(args, "uvicorn_log_level", None) or args.log_level}
    for name in ("root_path", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        if getattr(args, name, None):
            kw[name] = getattr(args, name)
    if getattr(args, "log_config_file", None):
        kw["log_config"] = args.log_config_file
    if getattr(args, "disable_uvicorn_access_log", False):
        kw["access_log"] = False
    return kw


def configure_app(app: Any, args: argparse.Namespace) -> None:
    """Middleware and routes the flags ask for (CORS, --middleware, request ids, load, logs)."""
    for path in getattr(args, "middleware", None) or []:
        _add_user_middleware(app, path)
    if not getattr(args, "no_cors", False):  # as vLLM's server: CORS, all origins by default
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=getattr(args, "allowed_origins", None) or ["*"],
            allow_credentials=bool(getattr(args, "allow_credentials", False)),
            allow_methods=getattr(args, "allowed_methods", None) or ["*"],
            allow_headers=getattr(args, "allowed_headers", None) or ["*"],
        )
    if getattr(args, "enable_request_id_headers", False):
        app.add_middleware(RequestIdHeader)
    requests, outputs = (bool(getattr(args, k, False))
                         for k in ("enable_log_requests", "enable_log_outputs"))
    if requests or outputs:
        app.add_middleware(LogRequests, max_len=getattr(args, "max_log_len", None),
                           requests=requests, outputs=outputs)
    if getattr(args, "enable_server_load_tracking", False):
        app.state.server_load = 0
        app.add_middleware(LoadTracking)

        @app.get("/load", include_in_schema=False)
        async def load() -> dict[str, int]:
            return {"server_load": app.state.server_load}


def _add_user_middleware(app: Any, path: str) -> None:
    import importlib
    import inspect

    module, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"modelport serve: --middleware {path}: {e}") from None
    if inspect.isclass(obj):
        app.add_middleware(obj)
    elif inspect.iscoroutinefunction(obj):
        app.middleware("http")(obj)
    else:
        raise SystemExit(f"modelport serve: --middleware {path}: not a middleware class or an "
                         "async function (module.name)")


class RequestIdHeader:
    """X-Request-Id on every HTTP answer: the request's own, else a new one (vLLM's)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id")
        rid = given or uuid.uuid4().hex.encode()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class LoadTracking:
    """app.state.server_load: the /v1 requests in flight (answers streamed to their end)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope["app"].state
        state.server_load += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.server_load -= 1


class LogRequests:
    """--enable-log-requests: each /v1 request's body; --enable-log-outputs: each response's
    body, or each event of a stream as it is sent (vLLM logs streamed deltas too). Each cut
    to --max-log-len characters."""

    def __init__(self, app: Any, max_len: int | None = None, requests: bool = True,
                 outputs: bool = False) -> None:
        self.app = app
        self.max_len = max_len
        self.requests = requests
        self.outputs = outputs

    def _log(self, what: str, body: bytes) -> None:
        text = body.decode("utf-8", "replace").strip()
        if self.max_len is not None:
            text = text[: self.max_len]
        request_logger.info("%s: %s", what, text)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        where = f"{scope['method']} {scope['path']}"
        chunks: list[bytes] = []
        sent: list[bytes] = []
        response = {"status": 0, "stream": False}

        async def receive_and_log() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self._log(where, b"".join(chunks))
            return message

        async def send_and_log(message: Any) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                kind = dict(message.get("headers") or ()).get(b"content-type", b"")
                response["stream"] = kind.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if response["stream"]:
                    if body.strip():
                        self._log(f"{where} response {response['status']} (stream)", body)
                else:
                    sent.append(body)
                    if not message.get("more_body", False):
                        self._log(f"{where} response {response['status']}", b"".join(sent))
            await send(message)

        await self.app(scope, receive_and_log if self.requests else receive,
                       send_and_log if self.outputs else send)
