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
from typing import Any

from modelport.entrypoints.vllm_engine_flags import (
    ENGINE_REFUSALS,
    Refusal,
    _falsy,
    _is,
    add_engine_compat_args,
    first_refusal,
    json_list,
)
from modelport.entrypoints.vllm_engine_flags import apply as apply_engine_flags

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


# -- the flags -----------------------------------------------------------------------------
_SAME = "accepted: modelport already "  # help text of an accepted no-op
_BOOL = argparse.BooleanOptionalAction  # vLLM's bool flags all have a --no- form


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
    a("--allow-credentials", action=_BOOL, default=False, help="CORS: allow credentials")
    a("--no-cors", action="store_true", default=False,
      help="send no CORS headers (modelport's own; vLLM always sends them)")
    a("--disable-fastapi-docs", action=_BOOL, default=False,
      help="no /docs, /redoc or /openapi.json")
    a("--middleware", action="append", default=[], metavar="MODULE.NAME",
      help="ASGI middleware to add (repeatable): a class is added with app.add_middleware, "
           "a function with @app.middleware('http')")
    a("--enable-request-id-headers", action=_BOOL, default=False,
      help="answer with an X-Request-Id header (the request's own, or a new one)")
    a("--enable-server-load-tracking", action=_BOOL, default=False,
      help="count the requests in flight under /v1 and serve the count at GET /load "
           '({"server_load": N})')
    a("--disable-log-requests", action=_BOOL, default=False,
      help=_SAME + "does not log requests unless --enable-log-requests")
    a("--enable-log-requests", action=_BOOL, default=False,
      help="log each /v1 request's JSON body (prompt and sampling parameters) at INFO on "
           "the modelport.requests logger")
    a("--max-log-len", type=int, default=None,
      help="with --enable-log-requests / --enable-log-outputs: log at most this many "
           "characters of a body")
    a("--disable-uvicorn-access-log", action=_BOOL, default=False,
      help="no access log line per HTTP request (uvicorn's)")
    a("--enable-log-outputs", action=_BOOL, default=False,
      help="log each /v1 response body, and each event of a stream, on the "
           "modelport.requests logger (cut to --max-log-len)")
    a("--disable-log-stats", action="store_true", default=False,
      help=_SAME + "logs no periodic engine statistics (they are at /metrics)")
    # OpenAI responses
    a("--response-role", default="assistant",
      help="role of the generated chat message when add_generation_prompt is true (else, as "
           "vLLM's, the last message's role)")
    a("--return-tokens-as-token-ids", action=_BOOL, default=False,
      help="logprobs name tokens as 'token_id:N' instead of their text")
    a("--enable-force-include-usage", action=_BOOL, default=False,
      help="every stream ends with a usage chunk, as if stream_options.include_usage")
    a("--enable-prompt-tokens-details", action=_BOOL, default=False,
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
    a("--uds", default=None, metavar="PATH",
      help="listen on this Unix domain socket instead of --host / --port (uvicorn's uds)")
    a("--ssl-cert-reqs", type=int, default=0,
      help="whether a client certificate is required (the ssl module's CERT_NONE 0, "
           "CERT_OPTIONAL 1, CERT_REQUIRED 2; uvicorn's ssl_cert_reqs)")
    a("--enable-ssl-refresh", action=_BOOL, default=False,
      help="refused: the certificate files are read at start-up (restart to renew them)")
    a("--h11-max-incomplete-event-size", type=int, default=None,
      help="largest incomplete HTTP event (headers) in bytes (uvicorn's h11 setting; "
           "default 4 MiB as vLLM's)")
    a("--h11-max-header-count", type=int, default=256,
      help="256 (vLLM's default) only: uvicorn sets no header count limit of its own; "
           "refused otherwise")
    a("--log-error-stack", action=_BOOL, default=False,
      help="log each error response (4xx too) with its stack trace on modelport.openai")
    a("--enable-log-deltas", action=_BOOL, default=True,
      help=_SAME + "logs each streamed event with --enable-log-outputs; accepted")
    a("--exclude-tools-when-tool-choice-none", action=_BOOL, default=False,
      help='with tool_choice "none", the chat template gets no tools (else it gets them, '
           "as OpenAI's and vLLM's defaults)")
    a("--tool-parser-plugin", default="",
      help="refused unless empty: vLLM's plugin API is not loaded here; --tool-call-parser "
           "names the built-in parsers")
    a("--enable-tokenizer-info-endpoint", action=_BOOL, default=False,
      help="serve GET /tokenizer_info (alias /get_tokenizer_info): the tokenizer's "
           "configuration, chat template included (off: 404)")
    a("--tokens-only", action=_BOOL, default=False,
      help="refused: the OpenAI endpoints are always served")
    a("--grpc", action="store_true", default=False,
      help="refused: vLLM's gRPC server (KServe v2 gRPC is --allow-grpc's, for repositories)")
    a("--shutdown-timeout", type=float, default=0,
      help="seconds open responses get to finish at shutdown (uvicorn's graceful timeout); "
           "0 (vLLM's default, which aborts them): modelport lets them finish")
    a("--disable-frontend-multiprocessing", action=_BOOL, default=False,
      help=_SAME + "runs the engine core in its own process, as vLLM V1 always does; "
           "accepted and unused")
    a("--api-server-count", "-asc", type=int, default=1,
      help="1 only: one API server process (refused otherwise)")
    a("--headless", action="store_true", default=False,
      help="refused: no multi-node serving (engines without an API server)")
    add_engine_compat_args(parser)


# -- refusals as data ----------------------------------------------------------------------
_FRONTEND_REFUSALS: tuple[Refusal, ...] = (
    Refusal("--headless", _falsy, "multi-node serving is not supported; run one "
            "`modelport serve` per host behind a load balancer"),
    Refusal("--api-server-count", _is(1, None), "one API server process serves all requests "
            "here"),
    Refusal("--tool-server", _is(None), "the Responses API has no built-in tool server; give "
            "the tools in the request"),
    Refusal("--tool-parser-plugin", _is("", None), "vLLM's tool parser plugins are not "
            "loaded here; --tool-call-parser names the built-in parsers"),
    Refusal("--enable-ssl-refresh", _falsy, "the certificate files are read once at "
            "start-up; restart the server to renew them"),
    Refusal("--h11-max-header-count", _is(256, None), "uvicorn sets no header count limit; "
            "bound the header size with --h11-max-incomplete-event-size"),
    Refusal("--tokens-only", _falsy, "the OpenAI endpoints are always served"),
    Refusal("--grpc", _falsy, "vLLM's gRPC server is not served; the OpenAI API is HTTP "
            "(KServe v2 gRPC serves model repositories)"),
)
REFUSALS: tuple[Refusal, ...] = ENGINE_REFUSALS + _FRONTEND_REFUSALS


def check(args: argparse.Namespace) -> None:
    """Refuse, at start-up, a vLLM flag whose value asks for what modelport does not do;
    map the implemented engine flags onto EngineArgs' fields (vllm_engine_flags.apply)."""
    hit = first_refusal(args, REFUSALS)
    if hit is not None:
        r, value = hit
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        shown = "" if value is True else f" {shown}"
        raise SystemExit(f"modelport serve: {r.flag}{shown} is not supported: {r.why(args)}")
    try:
        apply_engine_flags(args)
    except ValueError as e:
        raise SystemExit(f"modelport serve: {e}") from None
    if getattr(args, "logits_processors", None):  # an unknown name fails before listening
        from modelport.logits_processor import load_logits_processors

        try:
            load_logits_processors(args.logits_processors)
        except ValueError as e:
            raise SystemExit(f"modelport serve: --logits-processors: {e}") from None


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
    if getattr(args, "uds", None):  # vLLM's --uds: the socket instead of --host / --port
        kw["uds"] = args.uds
    if getattr(args, "ssl_cert_reqs", 0):
        kw["ssl_cert_reqs"] = args.ssl_cert_reqs
    if getattr(args, "h11_max_incomplete_event_size", None) is not None:
        kw["h11_max_incomplete_event_size"] = args.h11_max_incomplete_event_size
    if getattr(args, "shutdown_timeout", 0):  # else open responses finish, however long
        kw["timeout_graceful_shutdown"] = args.shutdown_timeout
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
