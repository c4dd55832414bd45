"""The OpenAI-compatible server: `python -m modelport.entrypoints.openai.api_server --model PATH`.

`modelport serve` mounts the same routes through frontend.py; this module is the standalone
form with the same flags. The engine loads in the background once the server is up, so load
balancers see /health answer 503 (not a refused connection) until the model is ready; if
loading fails the process stops rather than serve 503s forever.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

from fastapi import FastAPI

from modelport.engine.async_llm import AsyncLLM
from modelport.entrypoints.openai.errors import install_error_handlers
from modelport.entrypoints.openai.metrics import ServerMetrics
from modelport.entrypoints.openai.routes import OPENAI_PATHS, POOLING_PATHS, ServerState, mount
from modelport.entrypoints.openai.sagemaker import SAGEMAKER_PATHS
from modelport.entrypoints.openai.tools import ToolSettings

logger = logging.getLogger("modelport.openai")


def add_openai_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags (vLLM names) plus the server's own; flags another frontend added are kept."""
    from modelport.engine.arg_utils import EngineArgs

    if "--model" not in parser._option_string_actions:
        EngineArgs.add_cli_args(parser)
    g = parser.add_argument_group("OpenAI server")
    if "--served-model-name" not in parser._option_string_actions:
        g.add_argument(
            "--served-model-name",
            nargs="+",
            default=None,
            help="name(s) clients use in 'model'; the first is reported (default: the --model "
            "string as given, and also the model's folder name or file stem)",
        )
    if "--api-key" not in parser._option_string_actions:
        g.add_argument(
            "--api-key",
            nargs="+",
            default=None,
            help="require one of these keys (Authorization: Bearer KEY) on /v1, /tokenize, "
            "/detokenize (default, as vLLM's: the VLLM_API_KEY environment variable, if set)",
        )
    if "--metrics-prefix" not in parser._option_string_actions:
        g.add_argument(
            "--metrics-prefix",
            choices=("modelport", "vllm"),
            default="modelport",
            help="namespace of the /metrics series: modelport:... (default), or vllm:... for "
            "dashboards built on vLLM's names (the same series)",
        )
    if "--enable-auto-tool-choice" not in parser._option_string_actions:
        from modelport.entrypoints.openai.tool_parsers import PARSERS

        g.add_argument(
            "--enable-auto-tool-choice",
            action=argparse.BooleanOptionalAction,
            default=False,
            help='serve tool_choice "auto" (the default when a request has tools): the model '
            "decides whether to call tools, found in its text by --tool-call-parser",
        )
        g.add_argument(
            "--tool-call-parser",
            choices=sorted(PARSERS),
            default=None,
            help="how the model writes tool calls: hermes (<tool_call>{...}</tool_call>, "
            "Hermes/Qwen), llama3_json (JSON after <|python_tag|>, Llama 3.x), mistral "
            "([TOOL_CALLS]), pythonic / llama4_pythonic ([f(a=1)], Llama 3.2/4), qwen3_coder "
            "/ qwen3_xml (<function=...> XML), deepseek_v3, deepseek_v31, granite "
            "(<|tool_call|>[...]), phi4_mini_json (functools[...]), internlm "
            "(<|action_start|><|plugin|>{...}), glm45 (<arg_key>/<arg_value>, GLM-4.5/4.6), "
            "kimi_k2 (<|tool_calls_section_begin|>), xlam (a JSON list of calls), seed_oss "
            "(<seed:tool_call>) or llama4_json (llama3_json's)",
        )
    if "--reasoning-parser" not in parser._option_string_actions:
        from modelport.entrypoints.openai.reasoning import REASONING_PARSERS

        g.add_argument(
            "--reasoning-parser",
            choices=sorted(REASONING_PARSERS),
            default=None,
            help="return a reasoning model's thinking (<think>...</think>) as the chat "
            "message's `reasoning`, apart from `content`: deepseek_r1 (DeepSeek-R1, QwQ), "
            "qwen3 (Qwen3; chat_template_kwargs {\"enable_thinking\": false} turns it off), "
            "mistral ([THINK]...[/THINK], Magistral), glm45 (GLM-4.5), granite (\"Here is "
            "my thought process:\" ... \"Here is my response:\", Granite 3.x), deepseek_v3 "
            "(DeepSeek-V3.1; chat_template_kwargs {\"thinking\": true} turns it on), seed_oss "
            "(<seed:think>...</seed:think>) or hunyuan_a13b (<think>...</think> then "
            "<answer>...</answer>)",
        )
    if "--default-chat-template-kwargs" not in parser._option_string_actions:
        g.add_argument(
            "--default-chat-template-kwargs",
            type=_json_object,
            default=None,
            metavar="JSON",
            help="chat template variables every chat request gets, under its own "
            "chat_template_kwargs (a request's keys win), e.g. '{\"enable_thinking\": false}' "
            "for Qwen3",
        )
    if "--chat-template" not in parser._option_string_actions:
        g.add_argument(
            "--chat-template",
            default=None,
            metavar="FILE_OR_TEMPLATE",
            help="the chat template to render chat, /tokenize and Responses requests with, in "
            "place of the model's: a file's path, or the Jinja template itself",
        )
        g.add_argument(
            "--trust-request-chat-template",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="render a request's own chat_template (chat completions, /tokenize and "
            "/v1/embeddings messages) instead of refusing it with a 400; the template is the "
            "caller's code (run sandboxed), so only for trusted clients",
        )
    if "--lora-modules" not in parser._option_string_actions:
        from modelport.entrypoints.openai.lora import parse_lora_module

        g.add_argument(
            "--lora-modules",
            nargs="+",
            type=parse_lora_module,
            default=None,
            metavar="NAME=PATH",
            help="LoRA adapters (PEFT folders) to serve under their names, with --enable-lora: "
            "name=path or '{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'",
        )
    if "--max-waiting-requests" not in parser._option_string_actions:
        g.add_argument(
            "--max-waiting-requests",
            type=int,
            default=None,
            help="bound on queued requests; past it requests get 503 with Retry-After",
        )
    from modelport.entrypoints.vllm_compat import add_vllm_compat_args

    add_vllm_compat_args(parser)  # the other vLLM serve flags: served, accepted or refused


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def engine_args_from(args: argparse.Namespace) -> Any:
    from modelport.engine.arg_utils import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    names = _served_names(args)
    engine_args.served_model_name = names[0] if names else getattr(args, "model", None)
    return engine_args


def _served_names(args: argparse.Namespace) -> list[str] | None:
    names = getattr(args, "served_model_name", None)
    if isinstance(names, str):
        return [names]
    return list(names) if names else None


def served_names(args: argparse.Namespace, source_name: str) -> list[str]:
    """The names clients may send in 'model'; the first is the one listed first and echoed.

    --served-model-name: exactly those. Otherwise vLLM's default, the --model string as the
    user typed it ("./tiny"), then `source_name`, the loader's name for the model (folder
    basename or file stem: "tiny"), which modelport served alone before; clients of either
    server keep working, while /v1/models lists the first alone, as vLLM does. Without
    --model (the embedded default) only `source_name`.
    """
    given = _served_names(args)
    if given:
        return given
    model = getattr(args, "model", None)
    return list(dict.fromkeys(n for n in (model, source_name) if n))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelport")
    except PackageNotFoundError:
        return "0.0.0"


class OpenAIService:
    """Owns the engine of one served model: loads it in the background, shuts it down."""

    def __init__(self, args: argparse.Namespace, state: ServerState, *, exit_on_failure: bool):
        self.args = args
        self.state = state
        self.exit_on_failure = exit_on_failure
        self.http_server: Any = None  # the uvicorn.Server to stop when loading fails
        self.load_failed = False
        self.engine_died = False
        self._task: asyncio.Task | None = None
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        if not self.state.serve_own_engine:
            self.loaded.set()
            return
        self._task = asyncio.create_task(self._load(), name="openai-engine-load")

    async def _load(self) -> None:
        try:
            engine = await AsyncLLM.from_engine_args(engine_args_from(self.args))
        except Exception as e:
            self._failed_to_load(e)
            return
        reasoning_parser = getattr(self.args, "reasoning_parser", None)
        if reasoning_parser is not None:
            from modelport.entrypoints.openai.reasoning import think_token_ids

            try:  # vLLM refuses to start when the think tags are not single tokens
                think_token_ids(reasoning_parser, engine.tokenizer)
            except RuntimeError as e:
                await asyncio.to_thread(engine.shutdown)
                self._failed_to_load(e, traceback=False)
                return
        if self.state.chat_template is not None:  # --chat-template: in place of the model's
            engine.tokenizer.chat_template = self.state.chat_template
        # --chat-template-content-format: how message content reaches the template
        engine.tokenizer.chat_template_content_format = getattr(
            self.args, "chat_template_content_format", None) or "auto"
        # the loader's name for the model is known only now, once --model is resolved
        engine.served_model_names = served_names(self.args, engine.engine_config.model_source.name)
        if not _served_names(self.args):  # vLLM lists the --model string alone
            engine.listed_model_names = engine.served_model_names[:1]
        # /v1/models' "root": vLLM's is the --model string as given (with or without
        # --served-model-name)
        engine.model_root = getattr(self.args, "model", None) or None
        lora_modules = getattr(self.args, "lora_modules", None) or []
        if lora_modules:
            from modelport.entrypoints.openai.lora import add_lora

            try:  # vLLM refuses to start with an adapter it cannot load
                for m in lora_modules:
                    await asyncio.to_thread(add_lora, engine, m.name, m.path, m.base_model_name)
            except ValueError as e:
                await asyncio.to_thread(engine.shutdown)
                self._failed_to_load(ValueError(f"--lora-modules {m.name}: {e}"),
                                     traceback=False)
                return
        lora_config = getattr(engine.engine_config, "lora_config", None)
        cache = engine.engine_config.cache_config
        metrics = ServerMetrics(
            engine.served_model_names[0],
            prefix=getattr(self.args, "metrics_prefix", "modelport"),
            max_loras=lora_config.max_loras if lora_config else None,
            max_model_len=engine.max_model_len,
            cache_info={
                "block_size": cache.block_size,
                "cache_dtype": cache.kv_cache_dtype,
                "enable_prefix_caching": cache.enable_prefix_caching,
                "gpu_memory_utilization": cache.gpu_memory_utilization,
                "num_gpu_blocks": engine.ready.num_kv_blocks if engine.ready else "",
            },
            # one engine label per data-parallel replica ("0" .. "N-1")
            num_engines=engine.engine_config.parallel_config.data_parallel_size,
        )
        engine.stat_logger = metrics
        # vLLM's --return-tokens-as-token-ids / --enable-force-include-usage (serving_common)
        engine.return_tokens_as_token_ids = bool(
            getattr(self.args, "return_tokens_as_token_ids", False))
        engine.force_include_usage = bool(getattr(self.args, "enable_force_include_usage", False))
        # vLLM's --response-role / --enable-prompt-tokens-details (serving_chat, serving_common)
        engine.response_role = getattr(self.args, "response_role", None) or "assistant"
        engine.enable_prompt_tokens_details = bool(
            getattr(self.args, "enable_prompt_tokens_details", False))
        self.state.metrics = metrics
        self.state.engine = engine
        engine.on_dead = self._engine_died
        self.loaded.set()
        _log_loaded(engine, self.args)

    def _failed_to_load(self, e: Exception, traceback: bool | None = None) -> None:
        self.state.load_error = f"{type(e).__name__}: {e}"
        # a ValueError is a bad model or setting, told in its message (no traceback)
        if traceback is None:
            traceback = not isinstance(e, ValueError)
        logger.error("failed to load the model: %s", self.state.load_error,
                     exc_info=e if traceback else None)
        self.loaded.set()
        if self.exit_on_failure:
            self.load_failed = True  # the process exits with status 1 after a clean shutdown
            self._stop_serving()

    @property
    def failed(self) -> bool:
        """The process should end with status 1: the model did not load, or its engine died."""
        return self.load_failed or self.engine_died

    def _stop_serving(self) -> None:
        if self.http_server is not None:
            self.http_server.should_exit = True  # uvicorn finishes the open responses first
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    def _engine_died(self, reason: str) -> None:
        """As vLLM: a dead engine core ends the server (status 1) for a supervisor to restart,
        once the requests it failed have their errors. MODELPORT_KEEP_ALIVE_ON_ENGINE_DEATH=1,
        or other frontends in the process, keep it up: /health and requests then get 503."""
        if not self.exit_on_failure or os.environ.get("MODELPORT_KEEP_ALIVE_ON_ENGINE_DEATH") == "1":
            return
        logger.error("engine core died (%s): shutting the server down, exit status 1 "
                     "(MODELPORT_KEEP_ALIVE_ON_ENGINE_DEATH=1 keeps it up, answering 503)", reason)
        self.engine_died = True
        self._stop_serving()

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.state.engine is not None:
            await asyncio.to_thread(self.state.engine.shutdown)


def _log_loaded(engine: AsyncLLM, args: argparse.Namespace) -> None:
    cfg = engine.engine_config
    ready = engine.ready
    src = cfg.model_source
    where = getattr(src, "path", None) or getattr(src, "name", src)
    mc = cfg.model_config
    logger.info(
        "loaded %s (%s, %.0fM params, %s) from %s on %s in %.1fs (engine core pid %s)",
        engine.served_model_names[0], mc.architecture, mc.num_params / 1e6, cfg.dtype, where,
        ready.device if ready else cfg.device, ready.load_seconds if ready else 0.0,
        ", ".join(map(str, getattr(engine.client, "pids", [getattr(engine.client, "pid", None)]))),
    )  # fmt: skip
    dp = cfg.parallel_config.data_parallel_size
    if dp > 1:
        logger.info("data parallel: %d replicas, each request to the one with the fewest in "
                    "flight; the KV cache below is their sum", dp)
    if ready is not None:
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens; max_model_len %d, max_num_seqs %d",
            ready.num_kv_blocks, ready.block_size, ready.num_kv_blocks * ready.block_size,
            engine.max_model_len, engine.max_num_seqs,
        )  # fmt: skip
    host = getattr(args, "host", "127.0.0.1")
    where = (f"unix:{args.uds} (/v1)" if getattr(args, "uds", None)
             else f"http://{host}:{getattr(args, 'port', 8000)}/v1")
    logger.info("OpenAI API ready at %s", where)


def attach(
    app: FastAPI,
    args: argparse.Namespace,
    *,
    exit_on_failure: bool,
    own_engine: bool = True,
    all_paths: bool = False,
) -> OpenAIService:
    """Mount the routes and error handlers on `app`; the returned service loads the engine.

    own_engine=False mounts the routes for engines other frontends register (a model
    repository's `llm` models) without loading one of this server's own. all_paths: no other
    frontend shares `app`, so every error (an unknown path's 404 too) is OpenAI-shaped.
    """
    from modelport.entrypoints import vllm_compat

    vllm_compat.check(args)  # a vLLM flag asking for what is not served ends serve here
    if own_engine and getattr(args, "model", None):
        from modelport.loader.source import resolve_model

        try:  # a path or cached id that is not there ends serve before any port opens
            resolve_model(args.model)
        except ValueError as e:
            raise SystemExit(f"modelport serve: {e}") from None
    try:
        tool_settings = ToolSettings(
            enable_auto_tools=bool(getattr(args, "enable_auto_tool_choice", False)),
            tool_call_parser=getattr(args, "tool_call_parser", None),
            exclude_tools_when_none=bool(
                getattr(args, "exclude_tools_when_tool_choice_none", False)),
        )
    except ValueError as e:  # vLLM refuses these at startup too
        raise SystemExit(f"modelport serve: {e}") from None
    reasoning_parser = getattr(args, "reasoning_parser", None)
    if reasoning_parser is not None:
        from modelport.entrypoints.openai.reasoning import get_reasoning_parser

        try:
            get_reasoning_parser(reasoning_parser)
        except ValueError as e:
            raise SystemExit(f"modelport serve: {e}") from None
    chat_template = getattr(args, "chat_template", None)
    if chat_template is not None:
        from modelport.entrypoints.openai.chat_template import load_chat_template

        try:  # a missing file or a template that does not compile ends serve at once
            chat_template = load_chat_template(chat_template)
        except ValueError as e:
            raise SystemExit(f"modelport serve: {e}") from None
    # as vLLM: --api-key (one or more keys), else the VLLM_API_KEY environment variable
    api_keys = getattr(args, "api_key", None) or os.environ.get("VLLM_API_KEY") or None
    state = ServerState(version=_version(), api_key=api_keys,
                        serve_own_engine=own_engine, tool_settings=tool_settings,
                        reasoning_parser=reasoning_parser,
                        default_chat_template_kwargs=getattr(
                            args, "default_chat_template_kwargs", None) or {},
                        trust_request_chat_template=bool(
                            getattr(args, "trust_request_chat_template", False)),
                        chat_template=chat_template,
                        enable_tokenizer_info_endpoint=bool(
                            getattr(args, "enable_tokenizer_info_endpoint", False)))
    # vLLM's SageMaker paths, unless TorchServe's own /ping and /invocations share the app
    sagemaker = ("modelport.entrypoints.torchserve.frontend"
                 not in getattr(args, "serve_frontends", ()))
    paths = OPENAI_PATHS + POOLING_PATHS + (SAGEMAKER_PATHS if sagemaker else ())
    install_error_handlers(app, ("/",) if all_paths else paths,
                           log_stack=bool(getattr(args, "log_error_stack", False)))
    mount(app, state, sagemaker)
    vllm_compat.configure_app(app, args)  # CORS, --middleware, request ids, /load, logs
    return OpenAIService(args, state, exit_on_failure=exit_on_failure)


def build_app(args: argparse.Namespace) -> tuple[FastAPI, OpenAIService, Any]:
    """The app, its service and the stop that the app's shutdown (or a failure) runs once."""
    from modelport.entrypoints.cli_serve import stop_at_shutdown, stopper
    from modelport.entrypoints.vllm_compat import fastapi_kwargs

    services: list[OpenAIService] = []
    stop_all = stopper(services)
    app = FastAPI(title="modelport OpenAI-compatible server", version=_version(),
                  lifespan=stop_at_shutdown(stop_all), **fastapi_kwargs(args))
    services.append(attach(app, args, exit_on_failure=True, all_paths=True))
    return app, services[0], stop_all


async def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from modelport.entrypoints.vllm_compat import uvicorn_kwargs

    app, service, stop_all = build_app(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, **uvicorn_kwargs(args))
    server = uvicorn.Server(config)
    service.http_server = server
    await service.start()
    try:
        await server.serve()
    finally:
        await stop_all()
    return 1 if service.failed else 0


def make_parser() -> argparse.ArgumentParser:
    from modelport.entrypoints.cli_serve import add_common_args
    from modelport.entrypoints.vllm_compat import ConfigFileParser

    parser = ConfigFileParser(
        prog="python -m modelport.entrypoints.openai.api_server",
        description="OpenAI-compatible server for one LLM",
    )
    add_common_args(parser)
    add_openai_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from modelport.entrypoints.cli_serve import run_event_loop

    return run_event_loop(run_server(args))


if __name__ == "__main__":
    sys.exit(main())
